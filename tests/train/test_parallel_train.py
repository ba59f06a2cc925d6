"""Expert + data parallel training on gloo: layouts agree with the single-process run, ZeRO-1 equals
plain AdamW, and checkpoints reshard across layouts."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

from sourcelm.parallel.local_ranks import run_ranks
from sourcelm.train.optim import FlatAdamW
from tests.train.conftest import assert_same_run


def _params(seed=0):
    # 3 ranks get one 65,536-element block each; the decay boundary falls inside the last one
    g = torch.Generator().manual_seed(seed)
    return [("a", nn.Parameter(torch.randn(300, 500, generator=g))), ("b", nn.Parameter(torch.randn(13, generator=g))),
            ("c", nn.Parameter(torch.randn(123, 360, generator=g)))]


def _steps(params, opt):
    """Four clipped steps on seeded gradients; a parameter with a compute copy gets its gradient in bf16 there."""
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        for n, p in params:
            grad = torch.randn(p.shape, generator=g)
            if n in opt.copies:
                opt.copies[n].grad = grad.bfloat16()
            else:
                p.grad = grad
        opt.step(lr=1e-2, grad_scale=0.7)
        opt.zero_grad()


def _zero1_worker(rank, world, copies):
    import torch.distributed as dist

    params = _params()
    opt = FlatAdamW(params, weight_decay=0.1, group=dist.group.WORLD, copies=copies)
    _steps(params, opt)
    return ({n: p.detach().clone() for n, p in params}, opt.state_dict(), opt.memory_bytes(),
            {n: c.detach().clone() for n, c in opt.copies.items()})


@pytest.mark.parametrize("copies", [(), ("a", "c")])
def test_zero1_sharded_adamw_is_bit_identical_to_unsharded(copies):
    """Also with bf16 compute copies (where the native kernel runs): every rank's copies are its gathered
    masters rounded, including the slices other ranks updated."""
    ref = _params()
    opt = FlatAdamW(ref, weight_decay=0.1, copies=copies)
    assert set(opt.copies) == (set(copies) if opt.native else set())
    _steps(ref, opt)
    results = run_ranks(_zero1_worker, 3, copies)
    for weights, state, memory, rank_copies in results:
        for name, p in ref:
            assert torch.equal(weights[name], p.detach())
        for key, value in opt.state_dict().items():
            assert torch.equal(state[key], value)
        assert memory < opt.memory_bytes()  # each rank keeps a third of the moments (padded)
        assert rank_copies.keys() == opt.copies.keys()
        for name, copy in rank_copies.items():
            assert torch.equal(copy, weights[name].bfloat16())


def _train(args, run_dir, *extra, nproc=1, rpn=0, ep=1):
    # fp32: layouts agree to rounding (1e-5); in bf16 the experts' weight gradients, summed over rows in the
    # order each layout receives them, round differently
    cmd = [sys.executable, "-m", "sourcelm", "train", *args, f"parallel.ep={ep}", "schedule.micro_batch=1",
           "train.dtype=float32", *extra, "--run-dir", str(run_dir)]
    if nproc > 1:
        cmd += ["--nproc", str(nproc), "--ranks-per-node", str(rpn)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


@pytest.mark.slow
def test_expert_parallel_layouts_match_single_process(small_args, tmp_path):
    steps = ["schedule.steps=20", "checkpoint.every=100"]
    single = _train(small_args, tmp_path / "single", *steps)
    for name, rpn in (("2x2", 2), ("1x4", 4)):
        ep = _train(small_args, tmp_path / name, *steps, nproc=4, rpn=rpn, ep=4)
        assert len(ep) == len(single) == 20
        assert_same_run(single, ep, name, routes_per_token=4)  # SMALL's experts per token
        if name == "2x2":  # tokens crossed pretend nodes, and were counted
            assert ep[-1]["a2a_inter_node_bytes"] > 0 and ep[-1]["a2a_intra_node_bytes"] > 0
        else:
            assert ep[-1]["a2a_inter_node_bytes"] == 0


@pytest.mark.slow
def test_checkpoint_from_ep4_resumes_at_ep2_and_on_one_process(small_args, tmp_path):
    single = _train(small_args, tmp_path / "single")
    for name, nproc, ep in (("ep2", 2, 2), ("one", 1, 1)):
        run = tmp_path / name
        _train(small_args, run, "schedule.steps=6", "checkpoint.every=3", nproc=4, rpn=2, ep=4,)
        # throw away the final checkpoint: resume from step 3, written by 4 ranks at EP 4
        import shutil
        shutil.rmtree(run / "checkpoints" / "step_000006")
        (run / "metrics.jsonl").write_text("")
        resumed = _train(small_args, run, nproc=nproc, rpn=nproc, ep=ep)
        assert [r["step"] for r in resumed] == [4, 5, 6]
        for a, b in zip(single[3:], resumed):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (name, a["step"])


def test_impossible_layout_fails_once_before_any_rank_starts(small_args, tmp_path):
    cmd = [sys.executable, "-m", "sourcelm", "train", *small_args, "schedule.micro_batch=1", "parallel.ep=4",
           "--nproc", "3", "--run-dir", str(tmp_path / "run")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "schedule.global_batch = 4 must be a multiple of schedule.micro_batch × processes = 1 × 3" in out.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_chunked_two_hop_trains_bit_identically_to_two_hop(small_args, tmp_path):
    """parallel.dispatcher = two_hop_chunked (hop 2 forwards each chunk as it lands) changes no bit of training:
    the same checkpoint after 6 steps at EP 4 over 2 pretend nodes, and the same bytes on each link class."""
    steps = ["schedule.steps=6", "checkpoint.every=6"]
    plain = _train(small_args, tmp_path / "plain", *steps, nproc=4, rpn=2, ep=4)
    chunked = _train(small_args, tmp_path / "chunked", *steps, "parallel.dispatcher=two_hop_chunked",
                     "parallel.dispatch_chunk_rows=16", nproc=4, rpn=2, ep=4)
    assert [r["a2a_inter_node_bytes"] for r in plain] == [r["a2a_inter_node_bytes"] for r in chunked]
    final = "checkpoints/step_000006/model.safetensors"
    assert (tmp_path / "plain" / final).read_bytes() == (tmp_path / "chunked" / final).read_bytes()


@pytest.mark.slow
def test_training_on_shaped_links_gives_the_same_bits(small_args, tmp_path):
    """`sourcelm train --links`: the ranks run in shaped pretend nodes (network namespaces, 3.2 : 1 links); the
    slower links change no bit of training, and nothing is left behind."""
    from sourcelm.parallel.netns import setup_problem

    problem = setup_problem()
    if problem is not None:
        pytest.skip(f"shaped links unavailable: {problem}")
    steps = ["schedule.steps=4", "checkpoint.every=4"]
    _train(small_args, tmp_path / "plain", *steps, nproc=4, rpn=2, ep=4)
    cmd = [sys.executable, "-m", "sourcelm", "train", *small_args, "parallel.ep=4", "schedule.micro_batch=1",
           "train.dtype=float32", *steps, "--run-dir", str(tmp_path / "shaped"), "--nproc", "4", "--ranks-per-node",
           "2", "--links", "ib=400mbit"]
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
    final = "checkpoints/step_000004/model.safetensors"
    assert (tmp_path / "plain" / final).read_bytes() == (tmp_path / "shaped" / final).read_bytes()
