"""Pretend nodes with shaped links: one Linux network namespace per node, joined by a bridge.

    hub namespace:   br0 ── n0 ── n1 ── ...        (one bridge port per node, shaped: the node's inbound link)
    node namespace i: ib0 (10.213.0.<i+1>/24)      (shaped: the node's outbound link, + optional delay)
                      lo                           (shaped: the traffic between the node's ranks)

A rank of node i runs inside namespace i with GLOO_SOCKET_IFNAME=ib0, so gloo advertises the node's ib0
address. Ranks of the same node reach each other at that local address, which the kernel carries over
the namespace's loopback: intra-node traffic crosses `lo` (the NVLink rate), inter-node traffic crosses
the veth pair and the bridge (the IB rate, once leaving, once arriving). The rendezvous store is rank 0's,
at node 0's ib0 address, reachable from every node over the bridge. Every address lives inside namespaces
created here, so nothing reaches any other network, and the ports are free (fresh namespaces).

One link per node stands for the node's NICs together, and `lo` for its NVLink fabric: the per-node
ratio is the per-GPU ratio of the report when every GPU has its own NIC.

Teardown (`ShapedNodes.close`, also on failure and on SIGINT/SIGTERM through `run_in_nodes`) kills the
processes still inside the namespaces, then deletes the namespaces, which removes their links. Namespaces
left by a launcher that was killed outright (SIGKILL) carry its pid in their names and are removed by the
next launcher.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time

from sourcelm.parallel.links import LinkSpec, tc_rate

PREFIX = "slmnet"
IFNAME = "ib0"
SUBNET = "10.213.0"
STORE_PORT = 29500
_CLONE_NEWNET = 0x40000000
_PR_SET_PDEATHSIG = 1


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {r.stderr.strip()}")


def _tc(ns: str, *args: str) -> None:
    r = subprocess.run(["tc", "-n", ns, *args], capture_output=True, text=True)
    if r.returncode:
        hint = " (the sch_netem module is missing here: drop delay= from --links)" if "netem" in args else ""
        raise RuntimeError(f"`tc -n {ns} {' '.join(args)}` failed: {r.stderr.strip()}{hint}")


def setup_problem() -> str | None:
    """Why shaped nodes cannot be created on this machine, or None when they can."""
    if not sys.platform.startswith("linux"):
        return "shaped links need Linux network namespaces"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode:
        return (f"cannot create a network namespace ({r.stderr.strip() or 'ip netns add failed'}); shaped links "
                f"need root or CAP_NET_ADMIN + CAP_SYS_ADMIN")
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ours() -> list[str]:
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX + "-")]


def _pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def _kill_inside(ns: str) -> None:
    """SIGKILLs the processes still inside namespace `ns` (all started by a launcher of ours)."""
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    for pid in map(int, r.stdout.split()):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _delete(ns: str) -> None:
    _kill_inside(ns)
    subprocess.run(["ip", "netns", "delete", ns], capture_output=True)


def remove_stale() -> list[str]:
    """Deletes namespaces left by launchers that died without tearing down (their pid is in the name)."""
    gone = []
    for ns in _ours():
        owner = ns.split("-")[1]
        if owner.isdigit() and int(owner) != os.getpid() and not _pid_alive(int(owner)):
            _delete(ns)
            gone.append(ns)
    return gone


def _shape(ns: str, dev: str, bits: float, delay_ms: float = 0.0) -> None:
    """tbf at `bits`/s on dev's egress; netem delay below it when asked. The bucket holds 2 ms of traffic
    (at least 64 KiB: loopback's segments are that large) and the queue 100 ms, so TCP keeps the link busy."""
    burst = max(int(bits / 8 * 0.002), 65536)
    _tc(ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", "tbf", "rate", tc_rate(bits), "burst", str(burst),
        "latency", "100ms")
    if delay_ms:
        _tc(ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", "netem", "delay", f"{delay_ms}ms")


def enter_namespace(name: str) -> None:
    """Moves the calling thread (and the threads it starts later) into network namespace `name`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class ShapedNodes:
    """Context manager: `n_nodes` namespaces with shaped links; `.names[i]`, `.addr(i)`; torn down on exit."""

    def __init__(self, n_nodes: int, spec: LinkSpec):
        if not 1 <= n_nodes <= 200:
            raise ValueError(f"{n_nodes} pretend nodes: use 1..200")
        self.spec = spec
        self.tag = f"{PREFIX}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
        self.hub = f"{self.tag}-hub"
        self.names = [f"{self.tag}-n{i}" for i in range(n_nodes)]
        self.created: list[str] = []

    @staticmethod
    def addr(node: int) -> str:
        return f"{SUBNET}.{node + 1}"

    def __enter__(self) -> ShapedNodes:
        remove_stale()
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        s = self.spec
        self._add_ns(self.hub)
        _ip("-n", self.hub, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.hub, "link", "set", "br0", "up")
        for i, ns in enumerate(self.names):
            self._add_ns(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "add", IFNAME, "type", "veth", "peer", "name", f"n{i}", "netns", self.hub)
            _ip("-n", self.hub, "link", "set", f"n{i}", "master", "br0")
            _ip("-n", self.hub, "link", "set", f"n{i}", "up")
            _ip("-n", ns, "addr", "add", f"{self.addr(i)}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", IFNAME, "up")
            _shape(ns, "lo", s.nvlink_bits)
            _shape(ns, IFNAME, s.ib_bits, s.delay_ms)  # leaving node i
            _shape(self.hub, f"n{i}", s.ib_bits)  # arriving at node i

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)
        # IPv4 only: gloo takes the interface's first address, which must not be an IPv6 link-local one
        subprocess.run(["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1",
                        "net.ipv6.conf.default.disable_ipv6=1"], capture_output=True)

    def close(self) -> None:
        """Kills what still runs inside, then deletes the namespaces (and with them every link)."""
        for ns in reversed(self.created):
            _delete(ns)
        self.created = []

    def rank_env(self, rank: int, world: int, ranks_per_node: int) -> dict[str, str]:
        """The environment torch.distributed's env:// rendezvous and gloo need in rank `rank`."""
        return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank % ranks_per_node),
                "LOCAL_WORLD_SIZE": str(ranks_per_node), "MASTER_ADDR": self.addr(0),
                "MASTER_PORT": str(STORE_PORT), "GLOO_SOCKET_IFNAME": IFNAME}

    def spawn(self, node: int, argv: list[str], env: dict[str, str]) -> subprocess.Popen:
        """Starts argv inside node `node`'s namespace, in its own session (Ctrl-C reaches the launcher
        only, which stops the ranks in order) and killed if the launcher dies."""
        def die_with_parent():
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)

        return subprocess.Popen(["ip", "netns", "exec", self.names[node], *argv], env={**os.environ, **env},
                                start_new_session=True, preexec_fn=die_with_parent)


def _stop(procs: list[subprocess.Popen], grace: float = 3.0) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_in_nodes(argv: list[str], world: int, ranks_per_node: int, spec: LinkSpec, env: dict | None = None,
                 log=print) -> int:
    """Runs argv as `world` ranks on world / ranks_per_node shaped nodes; returns 0 when every rank exits 0.
    A failed or killed rank stops the others; SIGINT/SIGTERM stop everything. Teardown in every case."""
    if world % ranks_per_node:
        raise ValueError(f"--ranks-per-node {ranks_per_node} must divide --nproc {world}")
    problem = setup_problem()
    if problem:
        log(f"cannot run on shaped links: {problem}")
        return 2
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # SIGTERM unwinds like Ctrl-C
    procs: list[subprocess.Popen] = []
    try:
        with ShapedNodes(world // ranks_per_node, spec) as net:
            log(f"shaped nodes: {len(net.names)} x {ranks_per_node} ranks, {spec} (NVLink : IB = {spec.ratio:.2f}); "
                f"namespaces {net.tag}-*")
            for rank in range(world):
                procs.append(net.spawn(rank // ranks_per_node, argv,
                                       {**(env or {}), **net.rank_env(rank, world, ranks_per_node)}))
            try:
                while True:
                    codes = [p.poll() for p in procs]
                    bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                    if bad:
                        log(f"rank {bad[0][0]} exited with {bad[0][1]}; stopping the other ranks")
                        return 1
                    if all(c == 0 for c in codes):
                        return 0
                    time.sleep(0.2)
            finally:
                _stop(procs)
    except KeyboardInterrupt:
        log("interrupted: ranks stopped, shaped nodes removed")
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    """`python -m sourcelm.parallel.netns --nproc N --ranks-per-node R --links SPEC -- CMD ...`"""
    import argparse

    from sourcelm.parallel.links import LinkSpecError, parse_links

    ap = argparse.ArgumentParser(prog="python -m sourcelm.parallel.netns", description=main.__doc__)
    ap.add_argument("--nproc", type=int, required=True)
    ap.add_argument("--ranks-per-node", type=int, required=True)
    ap.add_argument("--links", required=True, help="ib=RATE,nvlink=RATE[,delay=MS]")
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    try:
        spec = parse_links(args.links)
    except LinkSpecError as e:
        print(e, file=sys.stderr)
        return 2
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd or args.nproc < 1 or args.ranks_per_node < 1:
        ap.error("give --nproc, --ranks-per-node >= 1 and a command after --")
    return run_in_nodes(cmd, args.nproc, args.ranks_per_node, spec, log=lambda m: print(m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    sys.exit(main())
