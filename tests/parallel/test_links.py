"""Shaped pretend nodes: the link spec, the three dispatchers on shaped links, and teardown.

The shaped tests need network namespaces (root or CAP_NET_ADMIN + CAP_SYS_ADMIN, iproute2); without
them they are skipped with the reason `setup_problem()` gives.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sourcelm.parallel.links import FORMAT, LinkSpecError, parse_links
from sourcelm.parallel.local_ranks import run_ranks
from sourcelm.parallel.netns import PREFIX, setup_problem

from .dispatch_workers import roundtrip_worker

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
LINKS = "ib=200mbit,nvlink=640mbit"
SCENARIOS = ("random", "one_expert", "two_ranks_only", "with_none")
CASES = [(sc, False) for sc in SCENARIOS]
KINDS = ("flat", "two_hop", "two_hop_chunked")

_problem = setup_problem()
shaped = pytest.mark.skipif(_problem is not None, reason=f"shaped links unavailable: {_problem}")


def test_spec_parses_rates_units_and_default_ratio():
    s = parse_links("ib=200mbit,nvlink=640mbit,delay=2")
    assert (s.ib_bits, s.nvlink_bits, s.delay_ms, s.ratio) == (200e6, 640e6, 2.0, 3.2)
    assert parse_links("ib=1gbps").nvlink_bits == pytest.approx(8e9 * 3.2)  # bytes per second, ratio 3.2
    assert parse_links(str(s)) == s


@pytest.mark.parametrize("bad", ["", "ib", "ib=fast", "ib=0mbit", "ib=200mbit,nvlink=0bit", "nvlink=1gbit",
                                 "ib=1gbit,ib=2gbit", "ib=1gbit,pcie=1gbit", "ib=1gbit,delay=-3", "ib=10furlong"])
def test_bad_spec_names_the_format(bad):
    with pytest.raises(LinkSpecError, match=r"ib=RATE,nvlink=RATE\[,delay=MS\]"):
        parse_links(bad)


def _ours() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(PREFIX + "-")}


def _root_links() -> set[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return {line.split(":")[1].strip() for line in out.splitlines()}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@shaped
def test_zero_rate_fails_before_anything_is_created(tmp_path):
    before = _ours()
    for cmd in ([PY, "-m", "sourcelm.parallel.netns", "--nproc", "2", "--ranks-per-node", "1", "--links",
                 "ib=0mbit", "--", "true"],
                [PY, "-m", "sourcelm.cli", "train", "tiny", "--run-dir", str(tmp_path), "--nproc", "2",
                 "--ranks-per-node", "1", "--links", "ib=200mbit,nvlink=x"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode != 0 and FORMAT in r.stdout + r.stderr, r.stdout + r.stderr
    assert _ours() == before
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
@shaped
def test_chunked_two_hop_is_bit_identical_on_shaped_links():
    before = _ours()
    res = run_ranks(roundtrip_worker, 4, 2, CASES, KINDS, None, ranks_per_node=2, links=parse_links(LINKS),
                    timeout=300)
    assert _ours() == before  # the namespaces of the run are gone
    for r in range(4):
        for case in CASES:
            flat = res[r][("flat",) + case]
            for kind in KINDS[1:]:
                got = res[r][(kind,) + case]
                for key in ("out", "dx", "dw", "recv_x", "local", "recv_w"):
                    assert torch.equal(flat[key], got[key]), (r, case, kind, key)
            assert res[r][("two_hop",) + case]["stats_total"] == res[r][("two_hop_chunked",) + case]["stats_total"]
        assert res[r][("two_hop_chunked",) + CASES[0]]["chunk_rows"] >= 1  # measured, same on every rank
    assert len({res[r][("two_hop_chunked",) + CASES[0]]["chunk_rows"] for r in range(4)}) == 1


# each rank: join the group (the store is on node 0), one all-reduce, note its pid, then run or wait
RANK = """
import os, sys, time, torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(4)
dist.all_reduce(t)
open(os.path.join(sys.argv[1], str(dist.get_rank())), "w").write(str(os.getpid()))
if sys.argv[2] == "wait":
    time.sleep(120)
dist.barrier()
dist.destroy_process_group()
"""


def _launch(tmp_path, mode: str) -> subprocess.Popen:
    # SIGINT at its default in the launcher, as from a terminal: a test run started in the background of a
    # non-interactive shell ignores SIGINT, and the launcher would inherit that and never see the test's Ctrl-C
    return subprocess.Popen([PY, "-m", "sourcelm.parallel.netns", "--nproc", "4", "--ranks-per-node", "2",
                             "--links", LINKS, "--", PY, "-c", RANK, str(tmp_path), mode], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _rank_pids(tmp_path, launcher, n=4, timeout=120) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(list(tmp_path.iterdir())) < n:
        assert launcher.poll() is None, launcher.stdout.read()
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.2)
    time.sleep(0.2)  # the last file is complete
    return [int((tmp_path / str(r)).read_text()) for r in range(n)]


def _assert_all_gone(launcher, pids, links_before):
    assert not [ns for ns in _ours() if ns.startswith(f"{PREFIX}-{launcher.pid}-")]
    assert not [p for p in pids if _alive(p)]
    assert _root_links() == links_before


@pytest.mark.slow
@shaped
@pytest.mark.parametrize("how", ["normal", "rank_killed", "sigint"])
def test_teardown(tmp_path, how):
    links_before = _root_links()
    launcher = _launch(tmp_path, "run" if how == "normal" else "wait")
    pids = _rank_pids(tmp_path, launcher)
    assert [ns for ns in _ours() if ns.startswith(f"{PREFIX}-{launcher.pid}-")]  # it really made namespaces
    if how == "rank_killed":
        os.kill(pids[1], signal.SIGKILL)
    elif how == "sigint":
        launcher.send_signal(signal.SIGINT)
    rc = launcher.wait(timeout=60)
    assert rc == {"normal": 0, "rank_killed": 1, "sigint": 130}[how], launcher.stdout.read()
    _assert_all_gone(launcher, pids, links_before)
