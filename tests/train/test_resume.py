"""Invariant 4: N steps straight == k steps + resume + N-k steps, bit for bit (CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from sourcelm.train import checkpoint as ckpt
from sourcelm.train.loop import TooManyBadSteps, Trainer


def straight(cfg, path):
    t = Trainer(cfg, path, progress=False)
    t.fit()
    return t


def test_resume_is_bit_identical_and_state_round_trips(small_config, digest, tmp_path):
    cfg = small_config()
    ref = straight(cfg, tmp_path / "straight")

    first = Trainer(cfg, tmp_path / "split", progress=False)
    first.fit(stop_after=4)
    second = Trainer(cfg, tmp_path / "split", progress=False)
    assert second.resume()
    # every piece of state came back: moments, step counters, expert biases, loader position
    assert second.state.step == 4 and second.state.consumed_samples == first.state.consumed_samples
    assert torch.equal(second.dense_opt.exp_avg, first.dense_opt.exp_avg)
    assert torch.equal(second.expert_opt.exp_avg_sq, first.expert_opt.exp_avg_sq)
    assert second.dense_opt.step_count == first.dense_opt.step_count
    for (_, a), (_, b) in zip(first.model.moe_layers(), second.model.moe_layers()):
        assert torch.equal(a.gate.e_score_correction_bias, b.gate.e_score_correction_bias)
        assert a.gate.e_score_correction_bias.abs().sum() > 0  # the balancer really moved them
    second.fit()
    assert digest(second.model) == digest(ref.model)
    # the resumed run's metrics continue where the first part stopped
    steps = [r["step"] for r in map(json.loads, (tmp_path / "split" / "metrics.jsonl").read_text().splitlines())
             if r.get("kind", "train") == "train"]
    assert steps == [1, 2, 3, 4, 5, 6]
    losses = [r["loss"] for r in map(json.loads, (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses[-1] < losses[0]


def test_damaged_newest_checkpoint_falls_back_and_completes(small_config, digest, tmp_path):
    cfg = small_config()
    ref = straight(cfg, tmp_path / "straight")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.fit(stop_after=4)  # checkpoints at 2 and 4
    newest = tmp_path / "run" / "checkpoints" / "step_000004" / "optimizer.safetensors"
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    resumed = Trainer(cfg, tmp_path / "run", progress=False)
    assert resumed.resume() and resumed.state.step == 2
    resumed.fit()
    assert digest(resumed.model) == digest(ref.model)


def test_non_finite_steps_are_skipped_then_the_run_stops(small_config, digest, tmp_path, monkeypatch):
    cfg = small_config("train.max_bad_steps=2")
    t = Trainer(cfg, tmp_path / "run", progress=False)
    t.fit(stop_after=1)
    before = digest(t.model)
    original = type(t.model).forward

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(type(t.model), "forward", poisoned)
    record = t.train_step()
    assert record["skipped"] and t.state.skipped_steps == 1 and digest(t.model) == before
    with pytest.raises(TooManyBadSteps, match="non-finite"):
        t.train_step()
    assert ckpt.newest_valid_checkpoint(tmp_path / "run" / "checkpoints").name == "step_000003"


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical(small_config, small_args, digest, tmp_path):
    args = [*small_args, "schedule.steps=12", "checkpoint.every=1", "logging.plots=true"]
    cfg = small_config("schedule.steps=12", "checkpoint.every=1")
    ref = straight(cfg, tmp_path / "straight")
    cmd = [sys.executable, "-m", "sourcelm", "train", *args, "--run-dir", str(tmp_path / "killed")]
    # the subprocess on this process's thread count: torch's CPU matmuls may give other bits with other counts
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(torch.get_num_threads()))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while time.time() < deadline and len(ckpt.list_checkpoints(ckpts)) < 4:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # from outside, wherever it is (possibly mid-write)
    proc.wait()
    assert 0 < len(ckpt.list_checkpoints(ckpts))
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = Trainer(cfg, tmp_path / "killed", progress=False)
    assert resumed.resume() and resumed.state.step == 12
    assert digest(resumed.model) == digest(ref.model)
    # the run that completed drew its curves (`logging.plots`; the other tests turn them off, to save time)
    assert (tmp_path / "killed" / "plots" / "loss.png").read_bytes()[:4] == b"\x89PNG"
