"""`python -m sourcelm.demo --quick --sft`: the demo's whole path (the same code as `make demo`, on a
corpus subset with a few training steps) ends in a run that verifies; the optional SFT stage fine-tunes the export
in a run of its own that verifies too."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sourcelm.data.corpus.demo import cache_dir


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "sourcelm.demo", "--quick", "--sft", "--out", str(out)]
    if (cache_dir() / "manifest.json").is_file():  # the corpus the data tests fetched; else the demo fetches it
        cmd += ["--corpus", str(cache_dir())]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for stage in ("1/10 corpus", "5/10 train", "8/10 verify", "9/10 card", "10/10 sft"):
        assert stage in proc.stdout
    assert "where everything is" in proc.stdout and "verified" in proc.stdout

    from sourcelm.demo import stage_done
    from sourcelm.provenance.graph import walk

    report = walk(out)
    assert report.ok, report.failures
    assert {n.kind for n in report.nodes.values()} == {"corpus", "curate", "tokenizer", "tokenize", "checkpoint",
                                                       "export"}
    replay = [c for c in report.checks if c.what == "replay"]
    assert replay == []  # the walk alone; the demo's own verify ran the replay:
    assert "bit-identical" in proc.stdout
    state = json.loads((out / "train" / "checkpoints" / "step_000008" / "state.json").read_text())
    assert state["launch"] == {"nproc": 4, "ranks_per_node": 2, "threads": 1}  # torchrun gives each rank 1 thread
    assert state["config"]["parallel"]["ep"] == 4 and state["config"]["parallel"]["dispatcher"] == "two_hop"
    tok = json.loads((out / "tokenizer" / "manifest.json").read_text())
    assert state["config"]["model"]["vocab_size"] == tok["vocab_size"]
    samples = json.loads((out / "samples.json").read_text())
    assert samples["agree"], samples  # transformers and sourcelm greedy decoding give the same text
    card = (out / "MODEL_CARD.md").read_text()
    assert "## Reproduce" in card and "## Curation funnel" in card
    for stage in ("curated", "tokenizer", "tokens", "hf"):  # a rerun would skip these
        assert stage_done(out / stage)

    sft = tmp_path / "demo-sft"  # beside the run: `verify OUT --replay` replays the one training run under OUT
    assert walk(sft).ok and stage_done(sft / "chats") and stage_done(sft / "hf")
    sample = json.loads((sft / "samples.json").read_text())
    assert sample["held_out_conversations"] > 0 and sample["valid_tokens"] > 0
    assert 0 < sample["valid_loss_after"] < sample["valid_loss_before"]
    assert sample["prompt"].endswith("<|reserved_0|>assistant\n") and sample["question"] in sample["prompt"]
