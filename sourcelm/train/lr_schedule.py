"""The report's schedules, as pure functions of training progress.

DeepSeek-V3 (report §4.2) trains with: linear LR warmup over 2K steps, a constant LR until 10T
tokens, cosine decay to a tenth over the next 4.3T, then a constant tail; a batch-size ramp over
the first 469B tokens; the MTP weight λ = 0.3 then 0.1; the bias update speed γ = 0.001 then 0.
Positions are given as fractions of the run, measured in steps or in tokens (`schedule.unit`), so
a config scales from a 200-step demo to the 14.8T-token run without rewriting it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from sourcelm.config import OptimConfig, ScheduleConfig


@dataclass(frozen=True)
class Progress:
    step: int  # optimizer steps done before this one
    tokens: int  # tokens consumed before this step
    total_tokens: int  # tokens the whole run will consume

    def fraction(self, sched: ScheduleConfig) -> float:
        if sched.unit == "tokens":
            return self.tokens / max(self.total_tokens, 1)
        return self.step / sched.steps


def learning_rate(p: Progress, sched: ScheduleConfig, optim: OptimConfig) -> float:
    """Warmup (in steps, as the report) → constant → cosine to min_lr → constant tail."""
    if p.step < sched.warmup_steps:
        return optim.lr * (p.step + 1) / sched.warmup_steps
    f = p.fraction(sched)
    if f < sched.decay_start:
        return optim.lr
    if f >= sched.decay_end or sched.decay_end == sched.decay_start:
        return optim.min_lr
    t = (f - sched.decay_start) / (sched.decay_end - sched.decay_start)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * t))


def global_batch_size(step: int, sched: ScheduleConfig, quantum: int) -> int:
    """Sequences in optimizer step `step`: a linear ramp from ramp_start_batch to global_batch over
    batch_ramp_steps, rounded down to a multiple of `quantum` (micro_batch × data-parallel ranks)
    so every rank always runs whole micro-batches."""
    if sched.batch_ramp_steps <= 0 or step >= sched.batch_ramp_steps:
        return sched.global_batch
    start = max(sched.ramp_start_batch, quantum)
    size = start + (sched.global_batch - start) * step / sched.batch_ramp_steps
    return max(quantum, int(size) // quantum * quantum)


def samples_before(step: int, sched: ScheduleConfig, quantum: int) -> int:
    """Sequences consumed by steps 0..step-1 (closed form after the ramp, a sum during it)."""
    ramp = min(step, max(sched.batch_ramp_steps, 0))
    during = sum(global_batch_size(s, sched, quantum) for s in range(ramp))
    return during + (step - ramp) * sched.global_batch


def mtp_weight(p: Progress, sched: ScheduleConfig) -> float:
    return sched.mtp_weight if p.fraction(sched) < sched.mtp_switch else sched.mtp_weight_late


def bias_update_speed(p: Progress, sched: ScheduleConfig) -> float:
    return sched.bias_update_speed if p.fraction(sched) < sched.bias_freeze else 0.0
