import math

import pytest

from sourcelm.config import OptimConfig, ScheduleConfig, load_config
from sourcelm.train.lr_schedule import (
    Progress,
    bias_update_speed,
    global_batch_size,
    learning_rate,
    mtp_weight,
    samples_before,
)


def lr_at(step, sched, optim, tokens=0, total=1):
    return learning_rate(Progress(step, tokens, total), sched, optim)


def test_lr_shape_warmup_constant_cosine_tail():
    s = ScheduleConfig(steps=100, warmup_steps=10, decay_start=0.5, decay_end=0.9)
    o = OptimConfig(lr=1.0, min_lr=0.1)
    assert lr_at(0, s, o) == pytest.approx(0.1)  # linear warmup: (step+1)/warmup
    assert lr_at(9, s, o) == pytest.approx(1.0)
    assert lr_at(10, s, o) == 1.0 and lr_at(49, s, o) == 1.0  # constant
    assert lr_at(70, s, o) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))  # cosine midpoint
    assert lr_at(90, s, o) == 0.1 and lr_at(99, s, o) == 0.1  # tail
    lrs = [lr_at(i, s, o) for i in range(50, 91)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # monotone decay


def test_report_schedule_in_tokens():
    """The report's numbers: constant 2.2e-4 until 10T tokens, cosine to 2.2e-5 by 14.3T (of 14.8T)."""
    s = ScheduleConfig(steps=240_000, unit="tokens", warmup_steps=2000, decay_start=10.0 / 14.8, decay_end=14.3 / 14.8)
    o = OptimConfig(lr=2.2e-4, min_lr=2.2e-5)
    total = int(14.8e12)
    assert learning_rate(Progress(5000, int(9.9e12), total), s, o) == 2.2e-4
    mid = learning_rate(Progress(200_000, int(12.15e12), total), s, o)
    assert mid == pytest.approx(2.2e-5 + 0.5 * (2.2e-4 - 2.2e-5), rel=1e-6)
    assert learning_rate(Progress(230_000, int(14.5e12), total), s, o) == 2.2e-5


def test_batch_ramp_and_samples():
    s = ScheduleConfig(steps=100, global_batch=64, micro_batch=4, batch_ramp_steps=10, ramp_start_batch=16)
    sizes = [global_batch_size(i, s, quantum=8) for i in range(12)]
    assert sizes[0] == 16 and sizes[10] == 64 and sizes[11] == 64
    assert all(x % 8 == 0 for x in sizes) and sizes == sorted(sizes)
    assert samples_before(12, s, 8) == sum(sizes)
    assert samples_before(3, ScheduleConfig(global_batch=8), 8) == 24


def test_mtp_weight_and_bias_speed_switch():
    s = ScheduleConfig(steps=100, mtp_switch=0.7, bias_freeze=0.97)
    assert mtp_weight(Progress(69, 0, 1), s) == 0.3 and mtp_weight(Progress(70, 0, 1), s) == 0.1
    assert bias_update_speed(Progress(96, 0, 1), s) == 1e-3 and bias_update_speed(Progress(97, 0, 1), s) == 0.0


def test_bad_schedule_config_names_field():
    with pytest.raises(ValueError, match="schedule.micro_batch"):
        load_config("tiny", ["schedule.global_batch=10", "schedule.micro_batch=4"])
    with pytest.raises(ValueError, match="schedule.unit"):
        load_config("tiny", ["schedule.unit=days"])
