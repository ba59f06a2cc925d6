"""`sourcelm eval` through lm-evaluation-harness on a tiny exported model: the offline tasks load and score end to
end, the result files hold what the card needs, and bad input fails naming the fix without writing a result."""

import dataclasses
import json

import pytest

pytest.importorskip("lm_eval")

from sourcelm.cli import main  # noqa: E402
from sourcelm.config import load_config  # noqa: E402
from sourcelm.eval.harness import offline_tasks, read_results, task_files  # noqa: E402
from sourcelm.interop.hf import save_hf  # noqa: E402
from sourcelm.model import build_model  # noqa: E402

TASKS = sorted(offline_tasks())


def tiny_tokenizer(path, texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sourcelm.tokens.tokenizer import save_tokenizer, special_tokens

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=special_tokens(),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    path.mkdir()
    save_tokenizer(tok, path)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    texts = [json.loads(line)["text"] for t in TASKS
             for line in (offline_tasks()[t].parent / "data" / f"{t.removeprefix('sourcelm_')}.jsonl").open()]
    tiny_tokenizer(root / "tok", texts[::5])
    cfg = dataclasses.replace(load_config("tiny").model, vocab_size=400, hidden_size=64, intermediate_size=96,
                              moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                              qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=512)
    save_hf(build_model(cfg, seed=0), root / "hf", tokenizer_dir=root / "tok")
    return root / "hf"


@pytest.mark.slow
def test_offline_tasks_score_end_to_end(hf_dir, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["eval", str(hf_dir), "--tasks", ",".join(TASKS), "--limit", "6", "--out", str(out)]) == 0
    results = read_results(out)
    assert sorted(results) == TASKS
    for task, r in results.items():
        assert r["items"] == 6 and r["limit"] == 6
        assert 0.0 <= r["metrics"]["acc"] <= 1.0 and "acc_norm" in r["metrics"]
        assert r["chance"] == pytest.approx(0.25)  # four choices per item
        assert r["harness"]["lm_eval_version"] and len(r["harness"]["task_hash"]) == 64
        assert r["task_files"] == task_files(task) and len(r["task_files"]) == 3
        assert f"--tasks {task}" in r["harness"]["command"]
    # the untrained baseline of the same config goes beside the results
    assert main(["eval", str(hf_dir), "--tasks", TASKS[0], "--limit", "4", "--out", str(out), "--untrained"]) == 0
    base = read_results(out / "untrained")
    assert list(base) == [TASKS[0]] and base[TASKS[0]]["model"]["untrained"]


def test_unknown_task_names_the_offline_tasks(hf_dir, tmp_path):
    with pytest.raises(SystemExit, match="unknown task.*sourcelm_fortune_nextline"):
        main(["eval", str(hf_dir), "--tasks", "no_such_task", "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_model_dir_that_does_not_load_names_the_fix(hf_dir, tmp_path):
    with pytest.raises(SystemExit, match="sourcelm export"):
        main(["eval", str(tmp_path), "--tasks", TASKS[0]])
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in hf_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text("{not json")
    with pytest.raises(SystemExit, match="transformers cannot load it"):
        main(["eval", str(broken), "--tasks", TASKS[0], "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()


def test_missing_lm_eval_names_the_install(monkeypatch, hf_dir, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("No module named 'lm_eval'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(SystemExit, match=r"pip install 'sourcelm\[eval\]'"):
        main(["eval", str(hf_dir), "--tasks", TASKS[0], "--out", str(tmp_path / "r")])
    assert not (tmp_path / "r").exists()
