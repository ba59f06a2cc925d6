"""`sourcelm plan --search`: every layout that exists and fits, ranked by predicted step time; and, for a
layout that does not fit, the one-field changes that would make it fit.

The search varies what a team chooses: pipeline ranks and schedule, expert-parallel degree, micro-batch
size and recomputation, keeping the model, the cluster, the global batch, the sequence length and the
dtype. Layouts that cannot exist (a ConfigError from `layout.resolve`) are skipped silently; layouts that
exist but do not fit are counted.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sourcelm.config import ConfigError, ModelConfig, divisors
from sourcelm.plan.cluster import Cluster
from sourcelm.plan.estimate import Assumptions, Plan, plan_layout
from sourcelm.plan.layout import PlanLayout
from sourcelm.plan.model_costs import effective_recompute
from sourcelm.plan.pipeline_sim import SCHEDULES

RECOMPUTE_CHOICES = ((), ("norm_up_proj",), ("norm_up_proj", "swiglu"), ("full",))


@dataclass
class SearchResult:
    fitting: list[Plan]  # fastest first
    not_fitting: int
    impossible: int


def candidates(model: ModelConfig, cluster: Cluster, base: PlanLayout, max_micro_batch: int = 8):
    """Layouts around `base`: every PP dividing the world, schedule, EP dividing the experts, power-of-two
    micro-batch up to `max_micro_batch`, and each recomputation choice."""
    eps = [d for d in divisors(model.n_routed_experts) if d <= cluster.world]
    mbs = [m for m in (1, 2, 4, 8, 16) if m <= max_micro_batch and base.global_batch % m == 0]
    for pp in divisors(cluster.world):
        for schedule in (SCHEDULES if pp > 1 else ("1f1b",)):
            for ep in eps:
                for mb in mbs:
                    for rc in _distinct_recompute_choices(base.dtype):
                        yield dataclasses.replace(base, pp=pp, schedule=schedule, ep=ep, micro_batch=mb, recompute=rc)


def _distinct_recompute_choices(dtype: str) -> list[tuple[str, ...]]:
    """The recomputation choices that give different runs in `dtype` (under FP8 "swiglu" is always on)."""
    seen: dict[tuple[str, ...], tuple[str, ...]] = {}
    for rc in RECOMPUTE_CHOICES:
        seen.setdefault(tuple(sorted(effective_recompute(dtype, rc))), rc)
    return list(seen.values())


def search(model: ModelConfig, cluster: Cluster, base: PlanLayout, assumptions: Assumptions, top: int = 10,
           max_micro_batch: int = 8) -> SearchResult:
    fitting, not_fitting, impossible = [], 0, 0
    for lay in candidates(model, cluster, base, max_micro_batch):
        try:
            plan = plan_layout(model, cluster, lay, assumptions)
        except ConfigError:
            impossible += 1
            continue
        if plan.fits:
            fitting.append(plan)
        else:
            not_fitting += 1
    fitting.sort(key=lambda p: p.step_time)
    return SearchResult(fitting[:top], not_fitting, impossible)


def fixes(model: ModelConfig, cluster: Cluster, layout: PlanLayout, assumptions: Assumptions,
          limit: int = 4) -> list[tuple[str, Plan]]:
    """One-field changes of `layout` that fit, as ("field = value", plan), fastest first: more EP,
    more PP, recomputation, a smaller micro-batch, ZeRO-1, or more nodes."""
    trials: list[tuple[str, PlanLayout, Cluster]] = []
    for ep in divisors(model.n_routed_experts):
        if ep > layout.ep:
            trials.append((f"parallel.ep = {ep}", dataclasses.replace(layout, ep=ep), cluster))
    for pp in divisors(cluster.world):
        if pp > layout.pp:
            sched = layout.schedule if layout.pp > 1 else "1f1b"
            changed = dataclasses.replace(layout, pp=pp, schedule=sched)
            trials.append((f"parallel.pp = {pp} ({sched})", changed, cluster))
    for rc in _distinct_recompute_choices(layout.dtype):
        if set(effective_recompute(layout.dtype, rc)) - set(effective_recompute(layout.dtype, layout.recompute)):
            trials.append((f"plan.recompute = {'+'.join(rc)}", dataclasses.replace(layout, recompute=rc), cluster))
    for mb in (1, 2, 4):
        if mb < layout.micro_batch:
            trials.append((f"schedule.micro_batch = {mb}", dataclasses.replace(layout, micro_batch=mb), cluster))
    if not layout.zero1:
        trials.append(("parallel.zero1 = true", dataclasses.replace(layout, zero1=True), cluster))
    for factor in (2, 4):
        trials.append((f"--nodes {cluster.nodes * factor}", layout, cluster.with_nodes(cluster.nodes * factor)))
    found = []
    for label, lay, cl in trials:
        try:
            plan = plan_layout(model, cl, lay, assumptions)
        except ConfigError:
            continue
        if plan.fits:
            found.append((label, plan))
    found.sort(key=lambda lp: (lp[1].step_time, lp[1].worst_memory.total))
    return found[:limit]
