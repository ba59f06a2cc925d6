"""`sourcelm sft` on several processes (gloo; launched by `sourcelm sft --nproc`, or by torchrun as on a cluster):
expert parallelism over 2 processes and a 2-stage pipeline under 1F1B and DualPipeV give the one-process SFT run
(fp32: the base model's and every step's losses within 1e-5, gradient norms within 1e-4, the same routing)."""

import json
import os
import subprocess
import sys

import pytest

from sourcelm.config import load_config
from sourcelm.interop.hf import save_hf
from sourcelm.model import build_model
from tests.train.conftest import SMALL, assert_same_run
from tests.train.test_sft import script_chats, train_small_tokenizer, write_chats

# the model comes from the checkpoint's config.json, so only SMALL's training settings apply; 4 micro-batches of one
# conversation a step: DualPipeV at PP 2 needs 2 x PP of them
RUN = [a for a in SMALL if not a.startswith(("model.", "data.", "logging.valid_every"))] + [
    "data.seq_len=63", "train.dtype=float32", "schedule.micro_batch=1", "checkpoint.every=100",
    "logging.valid_every=2"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """An HF checkpoint of 4 layers (DualPipeV at PP 2 cuts 4 chunks) with the small tokenizer, and 40 chats."""
    root = tmp_path_factory.mktemp("sft_base")
    tok = train_small_tokenizer(root / "tok")
    cfg = load_config("tiny", SMALL + ["model.num_hidden_layers=4"])
    save_hf(build_model(cfg.model, seed=3), root / "hf", tokenizer_dir=tok)
    return root / "hf", write_chats(root / "chats.jsonl", script_chats(40))


def _sft(base, run_dir, *extra, nproc=1, torchrun=False):
    hf, chats = base
    args = ["sft", "tiny", *RUN, *extra, "--init-from", str(hf), "--data", str(chats), "--valid-fraction", "0.2",
            "--run-dir", str(run_dir)]
    launcher = []
    if torchrun:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    elif nproc > 1:
        args += ["--nproc", str(nproc)]
    done = subprocess.run([sys.executable, *launcher, "-m", "sourcelm", *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(base, tmp_path_factory):
    return _sft(base, tmp_path_factory.mktemp("single"))


def _assert_same_run(reference, got, name):
    before = [next(r for r in run if r.get("kind") == "base") for run in (reference, got)]
    assert before[1]["valid_loss"] == pytest.approx(before[0]["valid_loss"], rel=1e-5), name
    assert before[1]["valid_tokens"] == before[0]["valid_tokens"] > 0, name
    steps = [[r for r in run if "loss" in r] for run in (reference, got)]
    assert len(steps[0]) == 6, name
    assert_same_run(*steps, name, routes_per_token=4)  # the tiny preset's experts per token
    assert steps[0][-1]["valid_loss"] < before[0]["valid_loss"]  # it learnt something, the same in both


def test_sft_at_ep2_matches_one_process(base, single, tmp_path):
    got = _sft(base, tmp_path, "parallel.ep=2", nproc=2)  # sourcelm's own launcher
    _assert_same_run(single, got, "ep2")
    assert [r for r in got if "loss" in r][-1]["a2a_intra_node_bytes"] > 0  # tokens did cross ranks


@pytest.mark.parametrize("kind", ["1f1b", "dualpipev"])
def test_sft_at_pp2_matches_one_process(kind, base, single, tmp_path):
    got = _sft(base, tmp_path, "parallel.pp=2", f"parallel.pp_schedule={kind}", nproc=2, torchrun=True)
    _assert_same_run(single, got, f"pp2 {kind}")
