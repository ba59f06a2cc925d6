"""Tokenization into shards: content read back with the independent Megatron reader, the split by
id hash, skipped records, manifests, resume, the loader on the output, local vs Ray."""

import json

import pytest

from sourcelm.tokens.loader import TokenWindows
from sourcelm.tokens.stream import in_valid_split
from sourcelm.tokens.tokenize import tokenize
from sourcelm.tokens.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture
def corpus(tmp_path, curated_factory):
    docs = curated_factory(tmp_path / "cur")
    train_tokenizer(tmp_path / "cur", 600, tmp_path / "tok", show_progress=False)
    return tmp_path, docs


def shard_bytes(out):
    return {p.relative_to(out).as_posix(): p.read_bytes()
            for split in ("train", "valid") for p in sorted((out / split).glob("0*"))}


def test_shards_hold_each_document_then_eos(corpus, megatron_read):
    root, docs = corpus
    summary = tokenize(root / "cur", root / "tok", root / "out", valid_fraction=0.2, show_progress=False)
    tok = load_tokenizer(root / "tok")
    for f in range(3):
        file_docs = [d for d in docs if d["id"].startswith(f"f{f}d")]
        for split in ("train", "valid"):
            want = [d for d in file_docs if in_valid_split(d["id"].encode(), 0.2) == (split == "valid")]
            version, code, _, seqs = megatron_read(root / "out" / split / f"{f:05d}")
            assert (version, code) == (1, 8) and len(seqs) == len(want)
            for d, seq in zip(want, seqs):
                assert seq[-1] == 1  # <|end_of_text|>
                assert seq[:-1].tolist() == tok.encode(d["text"], add_special_tokens=False).ids
                assert tok.decode(seq[:-1].tolist()) == d["text"]
            recorded = json.loads((root / "out" / split / f"{f:05d}.sources.json").read_text())
            expanded = [recorded["names"][i] for i, n in recorded["runs"] for _ in range(n)]
            assert expanded == [d["source"] for d in want]
    n_valid = sum(in_valid_split(d["id"].encode(), 0.2) for d in docs)
    assert summary["splits"]["valid"]["documents"] == n_valid
    assert summary["splits"]["train"]["documents"] == len(docs) - n_valid
    assert summary["skipped"] == {"empty": 3, "invalid_utf8": 3, "invalid_unicode": 3, "malformed_json": 3}
    skip_log = [json.loads(line) for line in (root / "out" / "tasks" / "00000.skipped.jsonl").read_text().splitlines()]
    assert {r["reason"] for r in skip_log} == set(summary["skipped"])
    assert {"file", "line", "id", "reason"} <= set(skip_log[0])


def test_manifests_link_inputs_and_count_per_source(corpus):
    root, docs = corpus
    tokenize(root / "cur", root / "tok", root / "out", valid_fraction=0.2, show_progress=False)
    top = json.loads((root / "out" / "manifest.json").read_text())
    assert top["stage"] == "tokenize" and "train/manifest.json" in top["outputs"]
    assert [i["path"] for i in top["inputs"]] == ["../cur/manifest.json", "../tok/manifest.json"]
    train = json.loads((root / "out" / "train" / "manifest.json").read_text())
    assert train["dtype"] == "uint16" and train["eos_appended"] and train["eos_token_id"] == 1
    assert set(train["outputs"]) == {f"0000{f}{ext}" for f in range(3) for ext in (".bin", ".idx", ".sources.json")}
    assert train["tokenizer_sha256"] == json.loads((root / "tok" / "manifest.json").read_text())["tokenizer_sha256"]
    tok = load_tokenizer(root / "tok")
    want = {}
    for d in docs:
        if not in_valid_split(d["id"].encode(), 0.2):
            c = want.setdefault(d["source"], {"documents": 0, "tokens": 0})
            c["documents"] += 1
            c["tokens"] += len(tok.encode(d["text"], add_special_tokens=False).ids) + 1
    assert train["sources"] == want
    assert train["tokens"] == sum(s["tokens"] for s in train["shards"].values())


def test_rerun_skips_finished_tasks(corpus):
    root, _ = corpus
    out = root / "out"
    tokenize(root / "cur", root / "tok", out, valid_fraction=0.2, show_progress=False)
    before = shard_bytes(out)
    stamp = (out / "train" / "00000.bin").stat().st_mtime_ns
    (out / "tasks" / "00001.json").unlink()
    (out / "train" / "00001.bin").write_bytes(b"garbage")
    tokenize(root / "cur", root / "tok", out, valid_fraction=0.2, show_progress=False)
    assert shard_bytes(out) == before
    assert (out / "train" / "00000.bin").stat().st_mtime_ns == stamp, "a finished task is not redone"


def test_loader_reads_tokenize_output_with_mixture(corpus):
    root, _ = corpus
    tokenize(root / "cur", root / "tok", root / "out", valid_fraction=0.2, show_progress=False)
    tw = TokenWindows([str(root / "out")], seq_len=16, seed=0, mixture={"web": 0.5, "code": 0.5})
    assert tw.schedule.period == 2
    valid = TokenWindows([str(root / "out")], seq_len=16, seed=0, split="valid")
    assert valid.num_windows > 0 and valid.fingerprint != tw.fingerprint
    assert tw.batch(0, 4).shape == (4, 17)


def test_workers_do_not_change_shards(corpus):
    root, _ = corpus
    tokenize(root / "cur", root / "tok", root / "one", workers=1, valid_fraction=0.2, show_progress=False)
    tokenize(root / "cur", root / "tok", root / "two", workers=2, valid_fraction=0.2, show_progress=False)
    assert shard_bytes(root / "one") == shard_bytes(root / "two")


@pytest.mark.slow
def test_local_and_ray_give_identical_shards(corpus):
    pytest.importorskip("ray")
    root, _ = corpus
    tokenize(root / "cur", root / "tok", root / "local", workers=1, valid_fraction=0.2, show_progress=False)
    tokenize(root / "cur", root / "tok", root / "ray", workers=2, executor="ray", valid_fraction=0.2,
             show_progress=False)
    local = shard_bytes(root / "local")
    assert local and shard_bytes(root / "ray") == local


def test_changed_settings_redo_tasks_and_loader_follows_manifest(corpus):
    root, docs = corpus
    out = root / "out"
    tokenize(root / "cur", root / "tok", out, valid_fraction=0.2, show_progress=False)
    first = TokenWindows([str(out)], seq_len=8, seed=0).num_windows
    tokenize(root / "cur", root / "tok", out, valid_fraction=0.0, show_progress=False)
    assert not list((out / "valid").glob("*.idx")) and not (out / "valid" / "manifest.json").exists()
    train = json.loads((out / "train" / "manifest.json").read_text())
    assert train["documents"] == len(docs)
    everything = TokenWindows([str(out)], seq_len=8, seed=0)
    assert everything.num_windows > first
    # a stray shard in the directory is not part of the data: the manifest lists the shards
    (out / "train" / "zzz.idx").write_bytes((out / "train" / "00000.idx").read_bytes())
    (out / "train" / "zzz.bin").write_bytes((out / "train" / "00000.bin").read_bytes())
    assert TokenWindows([str(out)], seq_len=8, seed=0).state() == everything.state()
