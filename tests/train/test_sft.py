"""Supervised fine-tuning (`sourcelm sft`): the chat template, assistant-only labels at exact positions, bad lines
skipped and counted, the template error, padding that changes no conversation's loss, the sample order, and an
end-to-end run that resumes bit-identically, exports with its template and verifies down to the chat file."""

import json

import numpy as np
import pytest
import torch

from sourcelm.config import load_config
from sourcelm.interop.hf import save_hf
from sourcelm.model import build_model
from sourcelm.tokens import tokenizer as T
from sourcelm.tokens.chat import ChatRenderer, TemplateError, build_chat_dataset
from sourcelm.train.sft import ChatSamples
from tests.train.conftest import SMALL

CONVERSATION = [
    {"role": "system", "content": "You answer questions about Python."},
    {"role": "user", "content": "How do I run a script?"},
    {"role": "assistant", "content": "Type python script.py in a shell."},
    {"role": "user", "content": "And on Windows?"},
    {"role": "assistant", "content": "Type py script.py instead."},
]
TEXTS = ["How do I run a script? Type python script.py in a shell.", "And on Windows? Type py script.py instead.",
         "You answer questions about Python.", "The interpreter reads your script and runs it."] * 20


def train_small_tokenizer(out):
    """A small trained tokenizer (vocab < SMALL's 512), saved in `out` as `sourcelm tokenizer train` saves it."""
    from tokenizers import pre_tokenizers, trainers

    tok = T.new_tokenizer()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=T.special_tokens(), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    T.save_tokenizer(tok, out)
    return out


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return train_small_tokenizer(tmp_path_factory.mktemp("tok"))


def script_chats(n):
    """n one-turn conversations with two alternating answers: a pattern a few SFT steps start to learn."""
    answers = ["Type python script.py in a shell.", "Type py script.py instead."]
    return [[{"role": "user", "content": f"How do I run a script? {i}"},
             {"role": "assistant", "content": answers[i % 2]}] for i in range(n)]


def write_chats(path, conversations, extra_lines=()):
    lines = [json.dumps({"messages": c}) for c in conversations] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_trained_tokenizer_carries_the_documented_default_template(tok_dir):
    assert json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"] == T.CHAT_TEMPLATE
    r = ChatRenderer(tok_dir)
    assert r.render(CONVERSATION[1:3]) == ("<|begin_of_text|><|reserved_0|>user\nHow do I run a script?<|end_of_text|>"
                                           "<|reserved_0|>assistant\nType python script.py in a shell.<|end_of_text|>")
    assert r.render(CONVERSATION[1:2], add_generation_prompt=True).endswith("<|end_of_text|><|reserved_0|>assistant\n")


def test_labels_are_the_assistant_tokens_at_their_exact_positions(tok_dir):
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(tok_dir / "tokenizer.json"))
    # the rendering piece by piece, each piece tokenised alone: specials and the "\n" after a role are their own tokens
    pieces = [("<|begin_of_text|>", False)]
    for m in CONVERSATION:
        mine = m["role"] == "assistant"
        pieces += [(f"<|reserved_0|>{m['role']}\n", False), (m["content"] + "<|end_of_text|>", mine)]
    ids, flags = [], []
    for text, mine in pieces:
        piece = raw.encode(text, add_special_tokens=False).ids
        ids += piece
        flags += [mine] * len(piece)
    got_ids, got_flags = ChatRenderer(tok_dir).encode(CONVERSATION)
    assert got_ids.tolist() == ids and got_flags.tolist() == flags
    assert sum(flags) == 2 + len(raw.encode("Type python script.py in a shell.Type py script.py instead.").ids)

    x, labels, mask = ChatSamples.__new__(ChatSamples), None, None
    x.tokens, x.assistant = np.array(ids), np.array(flags)
    x.offsets, x.seq_len, x.pad_id, x.num_conversations = np.array([0, len(ids)]), len(ids) + 5, 2, 1
    inputs, labels, mask = x.row(0)
    targets = [p for p in range(len(ids) - 1) if flags[p + 1]]  # position p predicts token p + 1
    assert [p for p in range(len(labels)) if labels[p] != -100] == targets
    assert all(labels[p] == ids[p + 1] for p in targets)
    assert inputs[:len(ids)].tolist() == ids and (inputs[len(ids):] == 2).all()
    assert mask.tolist() == [True] * len(ids) + [False] * 5
    assert raw.decode([ids[p + 1] for p in targets], skip_special_tokens=False) == (
        "Type python script.py in a shell.<|end_of_text|>Type py script.py instead.<|end_of_text|>")


def test_bad_lines_are_skipped_and_counted_with_their_reason_and_line(tok_dir, tmp_path):
    good = CONVERSATION[1:3]
    bad = ['{"messages": [', "[1, 2]", '{"text": "no messages"}', '{"messages": [{"role": "user"}]}',
           json.dumps({"messages": [{"role": "user", "content": "only a question"}]}),
           json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]})]
    chats = write_chats(tmp_path / "chats.jsonl", [good] * 3, bad)
    report = build_chat_dataset(chats, tok_dir, tmp_path / "out", max_tokens=64)
    assert report["lines"] == 9 and report["conversations"] == {"train": 3, "valid": 0}
    assert report["skipped"] == {"not JSON": 1, "not a JSON object": 1, "no 'messages' list": 1,
                                 "a message without a string 'role' and 'content'": 1,
                                 "no non-empty assistant message": 2}
    assert report["skipped_lines"]["no non-empty assistant message"] == [8, 9]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    first = int(np.flatnonzero(ChatRenderer(tok_dir).encode(good)[1])[0])  # the answer's first token
    with pytest.raises(ValueError, match=f"'no assistant token within the first {first} tokens': 3"):
        build_chat_dataset(chats, tok_dir, tmp_path / "short", max_tokens=first)
    cut = build_chat_dataset(chats, tok_dir, tmp_path / "cut", max_tokens=first + 2)
    assert cut["truncated"] == 3 and cut["assistant_tokens"]["train"] == 6 and cut["conversations"]["train"] == 3
    with pytest.raises(ValueError, match="no usable conversation"):
        build_chat_dataset(write_chats(tmp_path / "bad.jsonl", [], bad), tok_dir, tmp_path / "none", 64)


def test_a_template_that_renders_no_assistant_token_is_an_error_naming_it(tok_dir, tmp_path):
    import shutil

    broken = tmp_path / "user_only_template"
    shutil.copytree(tok_dir, broken)
    config = json.loads((broken / "tokenizer_config.json").read_text())
    config["chat_template"] = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}"
                               "{% endfor %}")
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    chats = write_chats(tmp_path / "chats.jsonl", [CONVERSATION])
    with pytest.raises(TemplateError, match="user_only_template.*renders no assistant token"):
        build_chat_dataset(chats, broken, tmp_path / "out", 64)
    del config["chat_template"]
    (broken / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(TemplateError, match="has no chat template"):
        build_chat_dataset(chats, broken, tmp_path / "out", 64)


def test_padding_changes_no_conversations_loss_main_or_mtp(tok_dir, tmp_path):
    """A padded batch's summed losses equal those of each conversation alone (causal attention: no real token sees
    the padding after it; -100 labels ignored by the main and the MTP losses)."""
    chats = [CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:]]
    build_chat_dataset(write_chats(tmp_path / "c.jsonl", chats), tok_dir, tmp_path / "d", 64)
    data = ChatSamples(tmp_path / "d" / "train.safetensors", 63, seed=0, pad_id=2)
    cfg = load_config("tiny", SMALL)
    model = build_model(cfg.model, seed=0)

    def sums(inputs, labels, mask=None):
        out = model(inputs, labels=labels, token_mask=mask, mtp_weight=1.0, return_logits=False)
        n = (labels != -100).sum()
        return out.main_loss * n, out.mtp_loss * n

    batch = data.ordered_batch(0, 3)
    main, mtp = sums(batch.inputs, batch.labels, batch.token_mask)
    alone_main = alone_mtp = 0.0
    for c in range(3):
        a, b = int(data.offsets[c]), int(data.offsets[c + 1])
        inputs, labels, _ = data.row(c)
        n = b - a
        m, t = sums(torch.from_numpy(inputs[None, :n]), torch.from_numpy(labels[None, :n]))
        alone_main, alone_mtp = alone_main + m, alone_mtp + t
    assert torch.allclose(main, alone_main, rtol=1e-5) and torch.allclose(mtp, alone_mtp, rtol=1e-5)
    assert mtp > 0


def test_the_sample_order_is_a_pure_function_of_seed_and_index_whatever_the_ranks(tok_dir, tmp_path):
    chats = [[{"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": f"a {i}"}] for i in range(7)]
    build_chat_dataset(write_chats(tmp_path / "c.jsonl", chats), tok_dir, tmp_path / "d", 32)
    a = ChatSamples(tmp_path / "d" / "train.safetensors", 31, seed=5, pad_id=2)
    b = ChatSamples(tmp_path / "d" / "train.safetensors", 31, seed=5, pad_id=2)
    order = [a.conversation(i) for i in range(21)]
    assert sorted(order[:7]) == list(range(7)) and sorted(order[7:14]) == list(range(7)) and order[:7] != order[7:14]
    whole = a.batch(10, 4)
    halves = [b.batch(10, 4, rank, 2) for rank in (0, 1)]
    assert torch.equal(whole.inputs, torch.cat([h.inputs for h in halves]))
    assert torch.equal(whole.labels, torch.cat([h.labels for h in halves]))
    assert [a.conversation(i) for i in range(21)] == order  # no state: any index, any order
    assert order != [ChatSamples(tmp_path / "d" / "train.safetensors", 31, 6, 2).conversation(i) for i in range(21)]


@pytest.mark.slow
def test_sft_end_to_end_resumes_bit_identically_exports_its_template_and_verifies(tok_dir, tmp_path):
    from sourcelm.artifacts import sha256_file
    from sourcelm.cli import main
    from sourcelm.provenance.verify import verify
    from sourcelm.train.checkpoint import load_checkpoint

    cfg = load_config("tiny", SMALL)
    hf = tmp_path / "hf"
    save_hf(build_model(cfg.model, seed=3), hf, tokenizer_dir=tok_dir)
    data = write_chats(tmp_path / "chats.jsonl", script_chats(40), ["not json"])
    small = [a for a in SMALL if not a.startswith(("data.", "logging.valid_every"))]
    args = ["sft", "tiny", *small, "data.seq_len=63", "logging.valid_every=2", "--init-from", str(hf),
            "--data", str(data), "--valid-fraction", "0.2"]
    assert main([*args, "--run-dir", str(tmp_path / "whole")]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "split"), "--stop-after", "3"]) == 0
    assert main([*args, "--run-dir", str(tmp_path / "split")]) == 0
    final = "checkpoints/step_000006"
    a, b = (load_checkpoint(tmp_path / r / final)[0] for r in ("whole", "split"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    metrics = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    base = next(m for m in metrics if m.get("kind") == "base")
    last = [m for m in metrics if "valid_loss" in m and m.get("kind") != "base"][-1]
    assert base["valid_tokens"] == last["valid_tokens"] > 0 and last["valid_loss"] < base["valid_loss"]
    report = json.loads((tmp_path / "whole" / "sft_data" / "report.json").read_text())
    assert report["skipped"] == {"not JSON": 1} and sum(report["conversations"].values()) == 40

    out = tmp_path / "export"
    assert main(["export", str(tmp_path / "whole" / final), "--hf", str(out)]) == 0
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == T.CHAT_TEMPLATE
    sft_manifest = json.loads((tmp_path / "whole" / "sft_data" / "manifest.json").read_text())
    assert [i["sha256"] for i in sft_manifest["inputs"] if i["path"].endswith("chats.jsonl")] == [sha256_file(data)]
    ckpt_inputs = json.loads((tmp_path / "whole" / final / "manifest.json").read_text())["inputs"]
    assert any(i["path"].endswith("sft_data/manifest.json") for i in ckpt_inputs)
    assert not verify(tmp_path / "whole", show_progress=False).failures
    data.write_text(data.read_text().replace("shell", "terminal"))  # the chats changed after the run: verify says so
    failed = verify(tmp_path / "whole", show_progress=False).failures
    assert any("chats.jsonl" in c.path for c in failed)
