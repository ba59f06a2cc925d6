"""The layout a segment is replayed on, and whether the verifier's machine can hold it.

A run records how it was launched (`state.json`: `launch` = processes, ranks per node and intra-op
threads per rank, which the replay runs with whatever the verifier's core count: the bits of torch's
weight-gradient matmuls depend on the thread count, not on the cores) and its parallel config
(`parallel.ep`, `parallel.pp`, ...). A verifier replays on any layout that fits the machine:
`--nproc N [--ranks-per-node R] [--layout pp=..,ep=..]`.

Without `--layout`, when N divides the recorded number of ranks W, the replay keeps the recorded
partition: each of the N processes hosts W / N of the recorded ranks as threads (virtual ranks,
`sourcelm/parallel/thread_ranks.py`), so every sum happens in the recorded order and the verdict can
be exact; it needs the memory the W ranks needed. Otherwise, and with `--layout`, the replay runs a
real layout of N ranks: the recorded parallel settings where they still divide N, else EP shrinks to
its largest divisor that divides N (EP 4 on 2 processes is EP 2, on 1 process EP 1) and PP falls back
to 1; its verdict is exact only where the arithmetic allows (`segment_check.exactness_breakers`). Checkpoints hold
full tensors under global names, so any layout resumes from any other (DESIGN invariant 3); the data
order is a function of the global sample index, so every layout trains on the same samples
(invariant 2).

Before anything runs, the layout is validated as the trainer would (`validate_layout`,
`check_batch_layout`) and its memory is estimated; a layout that cannot hold the model is refused
with the bytes it needs. The estimate (per process, fp32 on the CPU): parameters, their gradients
and the flat fp32 gradient buffer (3 copies), the AdamW moments (2 copies; ZeRO-1 shards the dense
ones over the data-parallel ranks, EP shards the experts'), the activations of one micro-batch kept
for backward, the logits, and a fixed interpreter + torch baseline. The replay measures the real
peak afterwards; the report shows both.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

from sourcelm.config import Config, ConfigError, check_batch_layout, load_config

PROCESS_BASELINE = 400 * 2**20  # a Python process with torch imported, before any tensor (measured RSS ~350 MB)
ACTIVATION_FLOATS_PER_HIDDEN = 40  # fp32 values kept for backward per token, layer and hidden unit (MLA + MoE)
LAYOUT_KEYS = {"pp": "parallel.pp", "ep": "parallel.ep", "pp_schedule": "parallel.pp_schedule",
               "dispatcher": "parallel.dispatcher", "zero1": "parallel.zero1"}


@dataclass
class ReplayLayout:
    nproc: int  # processes
    ranks_per_node: int  # ranks (not processes) per pretend node
    parallel: dict = field(default_factory=dict)  # parallel.* settings the replay runs with
    virtual: int = 1  # ranks each process hosts as threads (> 1: the recorded partition on fewer processes)
    threads: int | None = None  # intra-op threads per rank, as recorded (None: a run that did not record them)

    @property
    def world(self) -> int:
        return self.nproc * self.virtual

    def describe(self) -> str:
        p = self.parallel
        pp = f"PP {p['pp']} ({p.get('pp_schedule', '1f1b')}) x " if p.get("pp", 1) > 1 else ""
        hosts = (f"{self.nproc} process(es) hosting {self.virtual} virtual ranks each" if self.virtual > 1
                 else f"{self.nproc} process(es)")
        threads = f", {self.threads} thread(s) per rank" if self.threads else ""
        return (f"{hosts}, {self.ranks_per_node} per node, {pp}EP {p.get('ep', 1)}, {p.get('dispatcher', '?')} "
                f"dispatch{threads}")

    def to_dict(self) -> dict:
        return {"nproc": self.nproc, "virtual_ranks_per_process": self.virtual, "ranks_per_node": self.ranks_per_node,
                "threads_per_rank": self.threads, "parallel": dict(self.parallel), "description": self.describe()}

    def overrides(self) -> list[str]:
        return [f"parallel.{k}={json.dumps(v) if isinstance(v, str) else str(v).lower()}"
                for k, v in sorted(self.parallel.items())] + [f"parallel.ranks_per_node={self.ranks_per_node}"]


def recorded_layout(state: dict) -> ReplayLayout:
    """The layout the checkpoint was written by (what `--replay` without `--nproc` uses)."""
    launch = state.get("launch") or {"nproc": 1, "ranks_per_node": 1}
    par = state["config"]["parallel"]
    return ReplayLayout(int(launch.get("nproc", 1)), int(launch.get("ranks_per_node", 1)),
                        {k: par[k] for k in ("pp", "ep", "pp_schedule", "dispatcher", "zero1") if k in par},
                        threads=launch.get("threads"))


def parse_layout(spec: str | None) -> dict:
    """'pp=2,ep=2' -> {"pp": 2, "ep": 2}; names the key that is not a layout setting."""
    out: dict = {}
    for part in filter(None, (spec or "").split(",")):
        key, eq, value = part.partition("=")
        key = key.strip()
        if not eq or key not in LAYOUT_KEYS:
            raise ConfigError(f"--layout {spec!r}: '{part}' is not one of {sorted(LAYOUT_KEYS)} = value")
        value = value.strip()
        out[key] = (int(value) if value.isdigit() else value.lower() == "true" if value.lower() in ("true", "false")
                    else value)
    return out


def choose_layout(state: dict, nproc: int | None, ranks_per_node: int | None, spec: str | None,
                  virtual: bool = True) -> ReplayLayout:
    """The replay layout for `--nproc/--ranks-per-node/--layout` (all None: the recorded one); virtual=False
    never hosts the recorded ranks as threads (a real layout of `nproc` ranks)."""
    rec = recorded_layout(state)
    if nproc is None and ranks_per_node is None and not spec:
        return rec
    n = nproc or rec.nproc
    if virtual and not spec and ranks_per_node is None and n < rec.nproc and rec.nproc % n == 0:
        return ReplayLayout(n, rec.ranks_per_node, dict(rec.parallel), virtual=rec.nproc // n, threads=rec.threads)
    par = dict(rec.parallel)
    asked = parse_layout(spec)
    if "pp" not in asked and n % par.get("pp", 1):
        par["pp"] = 1
    if "ep" not in asked:
        par["ep"] = math.gcd(par.get("ep", 1), n // par.get("pp", 1))
    par.update(asked)
    rpn = ranks_per_node or (rec.ranks_per_node if n % rec.ranks_per_node == 0 and n >= rec.ranks_per_node else n)
    return ReplayLayout(n, rpn, par, threads=rec.threads)


def layout_config(state: dict, layout: ReplayLayout) -> Config:
    """The recorded config with the replay layout's parallel settings, validated as the trainer would."""
    from sourcelm.parallel.topology import validate_layout

    cfg = load_config(json.loads(json.dumps(state["config"])), layout.overrides())
    m, p = cfg.model, cfg.parallel
    validate_layout(layout.world, layout.ranks_per_node, p.ep, m.n_routed_experts, m.n_group, p.pp)
    if p.pp == 1 and layout.world % p.ep:
        raise ConfigError(f"parallel.ep = {p.ep} must divide --nproc {layout.world}")
    check_batch_layout(cfg, layout.world // p.pp)
    return cfg


def memory_needed(cfg: Config, layout: ReplayLayout) -> int:
    """Estimated peak bytes of the largest process of the replay (module docstring); a process hosting virtual ranks
    holds what each of them would, less the interpreter baseline they share."""
    import torch

    from sourcelm.model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg.model)
    expert = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    dense = sum(p.numel() for p in model.parameters()) - expert
    p = cfg.parallel
    dp = layout.world // p.pp
    params = dense / p.pp + expert / (p.ep * p.pp)  # a stage holds ~1/pp of the layers (the largest stage more)
    moments = 2 * (dense / p.pp / (dp if p.zero1 else 1) + expert / (p.ep * p.pp))
    tokens = cfg.schedule.micro_batch * cfg.data.seq_len
    layers = cfg.model.num_hidden_layers + cfg.model.num_nextn_predict_layers
    acts = tokens * layers / p.pp * cfg.model.hidden_size * ACTIVATION_FLOATS_PER_HIDDEN
    logits = 3 * tokens * cfg.model.vocab_size  # logits, their softmax and gradient (main head and MTP share a pass)
    return int(PROCESS_BASELINE + layout.virtual * 4 * (3 * params + moments + acts + logits))


def available_memory() -> int:
    """The memory this machine can give now (MemAvailable), in bytes."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def check_fits(cfg: Config, layout: ReplayLayout, budget: int | None = None) -> tuple[int, str | None]:
    """(bytes needed by all processes, None) when the layout fits in `budget` (default: available memory), else
    the refusal naming the memory it needs."""
    per_process = memory_needed(cfg, layout)
    total = per_process * layout.nproc
    budget = available_memory() if budget is None else budget
    if total > budget:
        return total, (f"layout {layout.describe()} needs about {total / 2**30:.2f} GiB ({per_process / 2**30:.2f} GiB "
                       f"per process: parameters, gradients, AdamW moments, activations) but {budget / 2**30:.2f} GiB "
                       f"is available; use more processes with a larger EP/PP, or a machine with more memory")
    return total, None
