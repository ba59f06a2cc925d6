"""Virtual ranks (`sourcelm.parallel.thread_ranks`): ranks hosted as threads give the bits that processes give, for
the collectives training uses, and a failing rank is reported with its number instead of hanging."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from sourcelm.parallel.local_ranks import run_ranks

WORLD = 4


def collectives(rank: int, world: int) -> dict[str, torch.Tensor]:
    """What training does with gloo: a sum over all ranks (long enough for gloo to cut it into ring chunks), the
    same over a subgroup, an all-to-all of uneven splits and an all-gather."""
    g = torch.Generator().manual_seed(rank)
    grads = torch.randn(300_001, generator=g) * 10.0 ** torch.randint(-3, 4, (300_001,), generator=g)
    dist.all_reduce(grads)
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair = torch.randn(1000, generator=g)
    dist.all_reduce(pair, group=pairs[rank // 2])
    splits = [(rank + peer) % 3 + 1 for peer in range(world)]
    recv_splits = [(peer + rank) % 3 + 1 for peer in range(world)]
    rows = torch.randn(sum(splits), 8, generator=g)
    got = torch.empty(sum(recv_splits), 8)
    dist.all_to_all_single(got, rows, recv_splits, splits)
    gathered = [torch.empty(5) for _ in range(world)]
    dist.all_gather(gathered, torch.full((5,), float(rank)))
    return {"grads": grads, "pair": pair, "all_to_all": got, "gathered": torch.stack(gathered),
            "rank": torch.tensor([dist.get_rank(), dist.get_world_size()])}


def _script(tmp_path, body: str) -> str:
    """A fresh interpreter's program (the per-thread world stays installed for the life of a process): this module's
    `collectives`, the rendezvous file, then `body`."""
    return textwrap.dedent(f"""
        import importlib.util, sys
        sys.path[:0] = {sys.path!r}
        from safetensors.torch import save_file
        from sourcelm.parallel.thread_ranks import run_thread_ranks
        spec = importlib.util.spec_from_file_location("thread_ranks_test", {__file__!r})
        test = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(test)
        WORLD, collectives = test.WORLD, test.collectives
        init = "file://{tmp_path / 'rendezvous'}"
    """) + textwrap.dedent(body)


def _in_threads(tmp_path, body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _script(tmp_path, body)], capture_output=True, text=True,
                          timeout=300)


def test_threads_give_the_bits_of_processes(tmp_path):
    processes = run_ranks(collectives, WORLD)
    proc = _in_threads(tmp_path, f"""
        out = run_thread_ranks(lambda rank: collectives(rank, WORLD), range(WORLD), WORLD, init)
        for rank, tensors in enumerate(out):
            save_file(tensors, "{tmp_path}/rank%d.safetensors" % rank)
    """)
    assert proc.returncode == 0, proc.stderr
    for rank in range(WORLD):
        threads = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert threads["rank"].tolist() == [rank, WORLD]
        for name, value in processes[rank].items():
            assert torch.equal(threads[name], value), (rank, name)


def test_ranks_split_over_two_processes_give_the_same_bits(tmp_path):
    """Process p hosts ranks 2p and 2p + 1 of one world of 4 (what `verify --nproc 2` does for a 4-rank run)."""
    processes = run_ranks(collectives, WORLD)
    script = _script(tmp_path, f"""
        p = int(sys.argv[1])
        out = run_thread_ranks(lambda rank: collectives(rank, WORLD), range(2 * p, 2 * p + 2), WORLD, init)
        for rank, tensors in zip(range(2 * p, 2 * p + 2), out):
            save_file(tensors, "{tmp_path}/rank%d.safetensors" % rank)
    """)
    hosts = [subprocess.Popen([sys.executable, "-c", script, str(p)], stderr=subprocess.PIPE, text=True)
             for p in range(2)]
    for host in hosts:
        assert host.wait(timeout=300) == 0, host.stderr.read()
    for rank in range(WORLD):
        threads = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert all(torch.equal(threads[k], v) for k, v in processes[rank].items()), rank


def test_a_failing_rank_is_named_without_waiting_for_its_peers(tmp_path):
    proc = _in_threads(tmp_path, """
        import os, torch, torch.distributed as dist
        def fn(rank):
            if rank == 2:
                raise ValueError("bad shard on rank 2")
            dist.all_reduce(torch.ones(3))  # the peers wait for rank 2 in vain
        try:
            run_thread_ranks(fn, range(WORLD), WORLD, init, timeout_s=600)
        except RuntimeError as e:
            print(e, flush=True)
            os._exit(7)  # as train_virtual_ranks: the peers' gloo threads are still in their collective
    """)
    assert proc.returncode == 7, proc.stderr
    assert "virtual rank 2:" in proc.stdout and "bad shard on rank 2" in proc.stdout

