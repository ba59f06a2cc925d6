"""The model card and the config TOML it writes, on the session's built run."""

from __future__ import annotations

import json
import shutil

import pytest

from sourcelm.artifacts import sha256_file
from sourcelm.config import load_config
from sourcelm.model.flops import model_stats
from sourcelm.provenance.card import write_card
from sourcelm.provenance.toml_config import config_toml, flatten_toml


def test_card_reports_the_run(built_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(built_run, run)
    text = write_card(run).read_text()
    root = sha256_file(run / "hf" / "manifest.json")
    assert f"sha256:{root}" in text and f"--expect-root {root}" in text
    # the funnel rows are the curation's statistics
    stats = json.loads((run / "curated" / "stats.json").read_text())
    dedup = stats["steps"]["exact_dedup"]
    assert (f"| exact_dedup | {dedup['docs_in']:,} | {dedup['docs_out']:,} | "
            f"{dedup['docs_in'] - dedup['docs_out']:,} |") in text
    assert "![curation funnel](curated/funnel.png)" in text and "![loss](train/plots/loss.png)" in text
    # size from the FLOP/parameter accounting, for the config of the last checkpoint
    state = json.loads((run / "train" / "checkpoints" / "step_000006" / "state.json").read_text())
    cfg = load_config(state["config"])
    s = model_stats(cfg.model, cfg.data.seq_len, cfg.train.dtype)
    assert f"{s['total_params']:,} total, {s['active_params']:,} active per token" in text
    tok_report = json.loads((run / "tokenizer" / "report.json").read_text())
    assert f"{tok_report['bytes_per_token']} bytes per token" in text
    # the reproduce commands name the recorded settings, and the TOML they use is the run's config
    assert "sourcelm tokenizer train --input $RUN/curated --vocab-size 400" in text
    assert "--run-dir $RUN/train --nproc 1 --ranks-per-node 1" in text
    assert load_config(run / "train_config.toml").to_dict() == state["config"]
    for section in ("## Training data", "## Curation funnel", "## Tokenizer", "## Architecture and size",
                    "## Training", "## Provenance", "## Reproduce"):
        assert section in text


def test_config_toml_round_trip_and_refusal():
    cfg = load_config("tiny", ["optim.lr=1.5e-4", "data.train=['a/b', 'c']", "schedule.steps=7"]).to_dict()
    import tomllib

    assert load_config(tomllib.loads(config_toml(cfg))).to_dict() == cfg
    cfg["model"]["q_lora_rank"] = None  # TOML has no null and the default is 96: refuse, naming it
    with pytest.raises(ValueError, match="model.q_lora_rank"):
        config_toml(cfg)


def test_flatten_toml(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text('seed = 3\n[schedule]\nsteps = 5\n[parallel]\ndispatcher = "flat"\n')
    assert flatten_toml(p) == ["seed=3", "schedule.steps=5", 'parallel.dispatcher="flat"']
    assert load_config("tiny", flatten_toml(p)).parallel.dispatcher == "flat"
