"""Tamper tests: each kind of change to a finished run is found by `verify`, at the stage that owns
the changed artifact, naming the file; an untouched run verifies."""

from __future__ import annotations

import io
import json

import pytest
import zstandard

from sourcelm import artifacts as manifest_mod
from sourcelm.artifacts import sha256_file
from sourcelm.cli import main as cli
from sourcelm.provenance.graph import walk
from sourcelm.provenance.verify import root_hash, verify

from .conftest import MODEL, TRAIN, VOCAB, export


def failures(run):
    return [(c.stage, c.path, c.what) for c in walk(run).failures]


def flip_byte(path, offset_fraction=0.5):
    data = bytearray(path.read_bytes())
    i = int(len(data) * offset_fraction)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def test_untouched_run_verifies(built_run, capsys):
    report = walk(built_run)
    assert report.ok, report.failures
    kinds = {n.kind for n in report.nodes.values()}
    assert kinds == {"corpus", "curate", "tokenizer", "tokenize", "checkpoint", "export"}
    # the final artifact reaches every checkpoint through the previous-checkpoint links
    assert [n.manifest["step"] for n in next(iter(report.checkpoint_runs().values()))] == [2, 4, 6]
    root = root_hash(report)
    assert root == sha256_file(built_run / "hf" / "manifest.json")
    assert cli(["verify", str(built_run), "--expect-root", root, "--quiet"]) == 0
    assert cli(["verify", str(built_run), "--expect-root", "0" * 64, "--quiet"]) == 1
    assert "verified" in capsys.readouterr().out


def test_flipped_byte_in_checkpoint_weights(run_copy):
    flip_byte(run_copy / "train" / "checkpoints" / "step_000004" / "model.safetensors")
    found = failures(run_copy)
    assert found, "a flipped weight byte went unnoticed"
    assert {stage for stage, _, _ in found} == {"checkpoint step_000004"}
    assert all(path.endswith("step_000004/model.safetensors") for _, path, _ in found)


def test_flipped_byte_in_exported_weights(run_copy):
    shard = next((run_copy / "hf").glob("model-*.safetensors"))
    flip_byte(shard, 0.9)
    assert failures(run_copy) == [("export", f"hf/{shard.name}", "output")]
    assert cli(["verify", str(run_copy), "--quiet"]) == 1


def test_edited_curated_document(run_copy):
    doc_file = min((run_copy / "curated" / "documents").glob("*.jsonl.zst"))
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(doc_file.read_bytes())).read()
    lines = raw.decode().splitlines()
    doc = json.loads(lines[0])
    doc["text"] = doc["text"].replace("river", "ocean", 1)
    assert json.dumps(doc) != lines[0]
    lines[0] = json.dumps(doc)
    doc_file.write_bytes(zstandard.ZstdCompressor().compress(("\n".join(lines) + "\n").encode()))
    assert failures(run_copy) == [("curate", f"curated/documents/{doc_file.name}", "output")]


def test_edited_raw_input(run_copy):
    raw = run_copy / "raw" / "docs" / "part1.jsonl"
    raw.write_text(raw.read_text().replace("barley", "barely", 1))
    found = failures(run_copy)
    # the corpus's own hash of it, and the curation's link to it: both name the corpus
    assert sorted(found) == [("corpus", "raw/docs/part1.jsonl", "input link"),
                             ("corpus", "raw/docs/part1.jsonl", "output")]


def test_changed_training_config_value(run_copy):
    state = run_copy / "train" / "checkpoints" / "step_000004" / "state.json"
    data = json.loads(state.read_text())
    data["config"]["optim"]["lr"] = 1e-3  # claim another learning rate than the one used
    state.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    found = failures(run_copy)
    assert ("checkpoint step_000004", "train/checkpoints/step_000004/state.json", "output") in found
    assert {stage for stage, _, _ in found} == {"checkpoint step_000004"}


def test_changed_tokenizer_config_in_its_manifest(run_copy):
    path = run_copy / "tokenizer" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["min_frequency"] = 1
    path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    found = failures(run_copy)
    # the token shards (both splits and the top manifest) were made from the original manifest
    assert found and {stage for stage, _, _ in found} == {"tokenizer"}
    assert {path for _, path, _ in found} == {"tokenizer/manifest.json"}


def test_changed_config_in_the_final_manifest(run_copy):
    """Nothing links to the export's manifest (it is the root), but its config must still be the
    checkpoint's, and its hash is the published root."""
    path = run_copy / "hf" / "manifest.json"
    m = json.loads(path.read_text())
    m["config"]["schedule"]["steps"] = 600
    path.write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    assert failures(run_copy) == [("export", "hf/manifest.json", "config")]


def test_checkpoint_from_another_code_version(run_copy, monkeypatch):
    """Steps 4→6 re-trained by 'other code': every hash is consistent, the code version is not."""
    other = dict(manifest_mod.code_version(), git_commit="0123456789abcdef" * 2 + "01234567", dirty_hash=None)
    monkeypatch.setattr(manifest_mod, "code_version", lambda: dict(other))
    ckpts = run_copy / "train" / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "step_000006")
    tokens = run_copy / "tokens"
    assert cli(["train", "tiny", *MODEL, *TRAIN, f"model.vocab_size={VOCAB}", f"data.train=['{tokens / 'train'}']",
                f"data.valid=['{tokens / 'valid'}']", "--run-dir", str(run_copy / "train")]) == 0
    monkeypatch.undo()
    export(run_copy)
    report = walk(run_copy)
    assert [(c.stage, c.what) for c in report.failures] == [("checkpoint step_000006", "code version")]
    assert "0123456789" in report.failures[0].detail


@pytest.mark.slow
def test_replay_is_bit_identical_and_catches_forged_weights(run_copy):
    report = verify(run_copy, replay=[2], show_progress=False)
    replays = [c for c in report.checks if c.what == "replay"]
    assert report.ok and len(replays) == 1 and "bit-identical" in replays[0].detail

    # forge step 6: nudge one weight and rewrite every hash after it, as a careful forger would
    import torch
    from safetensors.torch import load_file, save_file

    ckpt = run_copy / "train" / "checkpoints" / "step_000006"
    tensors = load_file(ckpt / "model.safetensors")
    name = min(tensors)
    tensors[name] = tensors[name] + torch.full_like(tensors[name], 1e-3)
    save_file(tensors, ckpt / "model.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    state["files"]["model.safetensors"] = sha256_file(ckpt / "model.safetensors")
    (ckpt / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    m = json.loads((ckpt / "manifest.json").read_text())
    manifest_mod.write_manifest(ckpt, "checkpoint", list(m["outputs"]),
                                inputs=[ckpt / i["path"] for i in m["inputs"]], config=m["config"], extra={"step": 6})
    export(run_copy)
    assert walk(run_copy).ok, "the forgery is hash-consistent, so the walk alone cannot see it"
    report = verify(run_copy, replay=[4], show_progress=False)
    assert [(c.stage, c.what) for c in report.failures] == [("checkpoint step_000006", "replay")]
    assert name in report.failures[0].detail and "model.safetensors differs" in report.failures[0].detail


@pytest.mark.slow
def test_sample_is_seeded(built_run, capsys):
    from sourcelm.provenance.replay import segments

    report = verify(built_run, sample=2, seed=7, show_progress=False)
    replays = [c for c in report.checks if c.what == "replay"]
    assert report.ok and len(replays) == 2
    import random

    picked = sorted(random.Random(7).sample(range(len(segments(walk(built_run)))), 2))
    steps = [[0, 2, 4][i] for i in picked]
    assert [r.detail.split(" ")[1] for r in replays] == [f"{a}→{a + 2}" for a in steps]


@pytest.mark.slow
def test_data_rerun_matches_and_catches_a_forged_curation(run_copy):
    report = verify(run_copy, data=True, show_progress=False)
    reruns = {c.stage: c for c in report.checks if c.what == "re-run"}
    assert report.ok, report.failures
    assert sorted(reruns) == ["curate", "tokenize (train)", "tokenize (valid)", "tokenizer"]

    # forge the curation: edit a document and re-hash the curation's manifest to match
    doc_file = min((run_copy / "curated" / "documents").glob("*.jsonl.zst"))
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(doc_file.read_bytes())).read()
    doc_file.write_bytes(zstandard.ZstdCompressor().compress(raw.replace(b"wheat", b"sugar", 1)))
    m = json.loads((run_copy / "curated" / "manifest.json").read_text())
    m["outputs"][f"documents/{doc_file.name}"] = sha256_file(doc_file)
    (run_copy / "curated" / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    report = verify(run_copy, data=True, show_progress=False)
    curate_rerun = next(c for c in report.checks if c.what == "re-run" and c.stage == "curate")
    assert not curate_rerun.ok and f"documents/{doc_file.name}" in curate_rerun.detail
    # and the walk names the curation as changed since the tokenizer was trained on it
    assert ("curate", "curated/manifest.json", "input link") in [(c.stage, c.path, c.what) for c in report.failures]
