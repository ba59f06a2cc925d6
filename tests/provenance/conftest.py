"""A small but real run for the provenance tests, built once per session through the real stages:
a synthetic raw corpus (two JSONL files, with a corpus manifest) → `sourcelm curate` (exact dedup,
PII) → `sourcelm tokenizer train` → `sourcelm tokenize` → `sourcelm train` (a tiny MoE, one
process, 6 steps, a checkpoint every 2) → `sourcelm export`. Tests copy it before changing it."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sourcelm.artifacts import write_manifest
from sourcelm.cli import main as cli

WORDS = ("the river runs south through a wide valley where farmers grow wheat and barley near old stone "
         "bridges while the town keeps its records of rain and harvest in a small library by the market "
         "square every spring the water rises and the mill turns faster than in summer").split()

PIPELINE = """
name = "provenance-test"
[[input]]
paths = ["raw/docs/*.jsonl"]
[tasks]
target_mb = 0.01
[[step]]
type = "exact_dedup"
[[step]]
type = "pii"
"""

# every DeepSeek-V3 feature on, small enough to train 6 steps in seconds
MODEL = ["model.hidden_size=64", "model.intermediate_size=128", "model.moe_intermediate_size=32",
         "model.num_hidden_layers=2", "model.num_attention_heads=2", "model.num_key_value_heads=2",
         "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8",
         "model.v_head_dim=16", "model.n_routed_experts=8", "model.num_experts_per_tok=4", "model.n_group=4",
         "model.topk_group=2"]
TRAIN = ["data.seq_len=32", "schedule.steps=6", "schedule.global_batch=4", "schedule.micro_batch=2",
         "schedule.warmup_steps=2", "checkpoint.every=2", "checkpoint.keep=0", "logging.valid_every=3",
         "logging.valid_batches=1", "logging.tensorboard=false", "logging.progress=false", "logging.plots=false",
         "optim.lr=3e-3"]
VOCAB = 400


def make_raw(root):
    rng = np.random.default_rng(0)
    (root / "docs").mkdir(parents=True)
    files = []
    for f in range(2):
        lines = []
        for i in range(120):
            words = rng.choice(WORDS, size=int(rng.integers(30, 80)))
            text = " ".join(words).capitalize() + f". Note {f}-{i}."
            lines.append(json.dumps({"id": f"{f}-{i}", "text": text}))
        lines += lines[:5]  # exact duplicates for the dedup step to drop
        path = root / "docs" / f"part{f}.jsonl"
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    write_manifest(root, "corpus", outputs=files, config={"selection": "synthetic test corpus"})


def build_run(run):
    make_raw(run / "raw")
    (run / "pipeline.toml").write_text(PIPELINE)
    assert cli(["curate", str(run / "pipeline.toml"), "--output", str(run / "curated"), "--workers", "1",
                "--no-progress"]) == 0
    assert cli(["tokenizer", "train", "--input", str(run / "curated"), "--vocab-size", str(VOCAB),
                "--output", str(run / "tokenizer"), "--no-progress"]) == 0
    assert cli(["tokenize", "--input", str(run / "curated"), "--tokenizer", str(run / "tokenizer"),
                "--output", str(run / "tokens"), "--no-progress", "--valid-fraction", "0.05"]) == 0
    assert cli(["train", "tiny", *MODEL, *TRAIN, f"model.vocab_size={VOCAB}",
                f"data.train=['{run / 'tokens' / 'train'}']", f"data.valid=['{run / 'tokens' / 'valid'}']",
                "logging.plots=true", "--run-dir", str(run / "train")]) == 0  # the card shows the plots
    export(run)


def export(run, step=6):
    shutil.rmtree(run / "hf", ignore_errors=True)
    assert cli(["export", str(run / "train" / "checkpoints" / f"step_{step:06d}"), "--hf", str(run / "hf"),
                "--tokenizer", str(run / "tokenizer")]) == 0


@pytest.fixture(scope="session")
def built_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("provenance") / "run"
    build_run(run)
    return run


@pytest.fixture
def run_copy(built_run, tmp_path):
    """A private copy of the built run (relative links keep working: every path in it moves together)."""
    dst = tmp_path / "run"
    shutil.copytree(built_run, dst)
    return dst
