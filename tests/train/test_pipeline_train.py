"""Pipeline parallel training on gloo: PP 2 and PP 4 under 1F1B and DualPipeV, and PP 2 x EP 2 over two pretend
nodes, against one process (fp32: losses, gradient norms and the balancer's bias updates within 1e-5, up to a
near-tie routing that parts the runs, `conftest.assert_same_run`); DualPipeV's
zero-bubble W split against full backwards (bit for bit); a SIGKILL mid-run then a resume gives the uninterrupted
run's bits; checkpoints are keyed by global names, so a PP run resumes on one process."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from sourcelm.plan import pipeline_sim
from sourcelm.train import checkpoint as ckpt
from sourcelm.train.pipeline import Lane, covered
from tests.train.conftest import assert_same_run

# 8 main layers (DualPipeV at PP 4 cuts 8 chunks) and 8 micro-batches a step (its minimum, 2 x PP)
PIPELINE = ["model.num_hidden_layers=8", "schedule.global_batch=8", "schedule.micro_batch=1", "train.dtype=float32"]


def _train(args, run_dir, *extra, nproc=1, rpn=0, timeout=900):
    cmd = [sys.executable, "-m", "sourcelm", "train", *args, *PIPELINE, *extra, "--run-dir", str(run_dir)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--ranks-per-node", str(rpn or nproc)]
    done = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


STEPS = ["schedule.steps=20", "checkpoint.every=100", "logging.valid_every=20"]
ROUTES = 4  # SMALL's experts per token


@pytest.fixture(scope="module")
def single(small_args, tmp_path_factory):
    """The one-process reference, 20 steps."""
    run = _train(small_args, tmp_path_factory.mktemp("single"), *STEPS)
    assert len(run) == 20 and "valid_loss" in run[-1]
    return run


def test_a_pairs_busy_time_is_when_either_thread_computed():
    f, b = Lane(), Lane()
    f.start, f.end, f.waits = 0.0, 10.0, [(1.0, 4.0), (6.0, 7.0)]  # computes 0-1, 4-6, 7-10
    b.start, b.end, b.waits = 0.5, 5.0, [(2.0, 3.5)]  # computes 0.5-2, 3.5-5
    assert f.busy() == [(0.0, 1.0), (4.0, 6.0), (7.0, 10.0)]
    assert covered(f.busy() + b.busy()) == pytest.approx(7.5)  # idle: 2-3.5 (both waiting), 6-7 (b done, f waits)
    assert covered([]) == 0.0


@pytest.mark.parametrize("kind, cut", [("1f1b", []), ("dualpipev", []), ("dualpipev", [1, 3, 3, 1])])
def test_pp2_matches_one_process(kind, cut, single, small_args, tmp_path):
    got = _train(small_args, tmp_path, *STEPS, "parallel.pp=2", f"parallel.pp_schedule={kind}",
                 f"parallel.pp_layers={cut}", nproc=2)
    assert_same_run(single, got, f"pp2 {kind} {cut or 'balanced'}", ROUTES)


def test_dualpipev_zero_bubble_split_gives_the_bits_of_full_backwards(small_args, tmp_path):
    """DualPipeV with its W split (the default) and without: the same losses and final weights, bit for bit (the
    deferred GEMMs are the ones autograd runs, and every parameter's gradients are folded in micro-batch order
    either way); only the split runs W ops."""
    layout = [*STEPS, "parallel.pp=2", "parallel.pp_schedule=dualpipev"]
    split = _train(small_args, tmp_path / "split", *layout, nproc=2)
    full = _train(small_args, tmp_path / "full", *layout, "parallel.pp_zero_bubble=false", nproc=2)
    assert [r["loss"] for r in split] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in split] == [r["grad_norm"] for r in full]
    final = "checkpoints/step_000020/model.safetensors"
    a, b = load_file(tmp_path / "split" / final), load_file(tmp_path / "full" / final)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for key in ("pp_bi_ms", "pp_w_ms"):  # per rank: every rank ran Bi and W ops with the split, none without
        assert min(split[-1][key]) > 0 and max(full[-1][key]) == 0, key
    # the chunk states each rank held at once: the schedule simulator's count for the same order (Table 2's PP + 1)
    sim = pipeline_sim.simulate(pipeline_sim.trainer_schedule("dualpipev", 2, 8), pipeline_sim.ChunkTimes(1, 2, 1))
    assert split[-1]["pp_in_flight"] == full[-1]["pp_in_flight"] == [r.peak_activations for r in sim.ranks] == [5, 5]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["1f1b", "dualpipev"])
def test_pp4_matches_one_process(kind, single, small_args, tmp_path):
    got = _train(small_args, tmp_path, *STEPS, "parallel.pp=4", f"parallel.pp_schedule={kind}", nproc=4, rpn=2)
    assert_same_run(single, got, f"pp4 {kind}", ROUTES)


@pytest.mark.slow
def test_pp2_by_ep2_over_two_nodes_matches_one_process(single, small_args, tmp_path):
    """Each stage is one pretend node of 2 ranks, EP 2 inside it (two-hop dispatch), data parallel 2; DualPipeV's
    pairs overlapped, and in order: the same bits."""
    layout = ["parallel.pp=2", "parallel.ep=2", "parallel.pp_schedule=dualpipev"]
    got = _train(small_args, tmp_path / "overlap", *STEPS, *layout, nproc=4, rpn=2)
    assert_same_run(single, got, "pp2 x ep2", ROUTES)
    assert got[-1]["a2a_intra_node_bytes"] > 0
    # DualPipeV's F&B pairs ran overlapped (two threads, two sets of groups): the same bits as run in order
    in_order = _train(small_args, tmp_path / "in_order", *STEPS, *layout, "parallel.pp_overlap=false", nproc=4, rpn=2)
    assert [r["loss"] for r in in_order] == [r["loss"] for r in got]
    final = "checkpoints/step_000020/model.safetensors"
    a, b = load_file(tmp_path / "overlap" / final), load_file(tmp_path / "in_order" / final)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    for record in (got[-1], in_order[-1]):  # per-rank timings: every rank ran pairs and waited on all-to-alls
        assert len(record["pp_fb_ms"]) == 4 and min(record["pp_fb_ms"]) > 0 and min(record["ep_wait_s"]) > 0


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_is_bit_identical_and_resumes_on_one_process(small_args, tmp_path):
    """PP 2 x EP 2 on 4 processes: killed after a few checkpoints, resumed, the final checkpoint equals the
    uninterrupted run's bit for bit. The PP checkpoint (global names) then resumes on one process."""
    layout = ["parallel.pp=2", "parallel.ep=2", "schedule.steps=10", "checkpoint.every=1", "logging.valid_every=0"]
    _train(small_args, tmp_path / "straight", *layout, nproc=4, rpn=2)
    cmd = [sys.executable, "-m", "sourcelm", "train", *small_args, *PIPELINE, *layout, "--run-dir",
           str(tmp_path / "killed"), "--nproc", "4", "--ranks-per-node", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    ckpts, deadline = tmp_path / "killed" / "checkpoints", time.time() + 600
    while time.time() < deadline and len(ckpt.list_checkpoints(ckpts)) < 4:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, wherever they are
    proc.wait()
    assert 0 < len(ckpt.list_checkpoints(ckpts)) < 10
    _train(small_args, tmp_path / "killed", *layout, nproc=4, rpn=2)
    final = "step_000010/model.safetensors"
    straight = load_file(tmp_path / "straight" / "checkpoints" / final)
    resumed = load_file(tmp_path / "killed" / "checkpoints" / final)
    assert straight.keys() == resumed.keys() and all(straight[k].equal(resumed[k]) for k in straight)
    # the same checkpoint, read by one process: two more steps from step 10
    one = _train(small_args, tmp_path / "killed", "schedule.steps=12", "checkpoint.every=1", "logging.valid_every=0")
    assert [r["step"] for r in one][-2:] == [11, 12]
