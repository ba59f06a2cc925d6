"""verify --replay on another layout: the layout choice and its refusals, the verdicts (exact, within a calibrated
tolerance), the report, --sample's seed and odds, and the separation of honest replays from dishonest variants."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sourcelm.cli import main as cli
from sourcelm.provenance import distance as dist
from sourcelm.provenance.graph import walk
from sourcelm.provenance.layouts import ConfigError, choose_layout, parse_layout
from sourcelm.provenance.verify import verify
from sourcelm.provenance.vreport import pass_probability, sample_seed, sample_segments

from .conftest import MODEL, TRAIN, VOCAB


def ep4_state(**parallel):
    return {"launch": {"nproc": 4, "ranks_per_node": 2},
            "config": {"parallel": {"pp": 1, "ep": 4, "pp_schedule": "1f1b", "dispatcher": "two_hop", "zero1": True,
                                    **parallel}}}


def test_layout_choice():
    st = ep4_state()
    assert choose_layout(st, None, None, None).nproc == 4  # nothing asked: the recorded layout
    # fewer processes dividing the recorded 4: the recorded partition, its ranks hosted as threads
    for n in (1, 2):
        v = choose_layout(st, n, None, None)
        assert (v.nproc, v.virtual, v.world, v.ranks_per_node) == (n, 4 // n, 4, 2)
        assert v.parallel == st["config"]["parallel"]
        assert f"hosting {4 // n} virtual ranks each" in v.describe()
    assert choose_layout(st, 3, None, None).virtual == 1  # 3 does not divide 4: a real layout
    # a real layout of N ranks: asked for, or with --layout / --ranks-per-node
    one, two = choose_layout(st, 1, None, None, virtual=False), choose_layout(st, 2, None, None, virtual=False)
    assert (one.nproc, one.virtual, one.ranks_per_node, one.parallel["ep"]) == (1, 1, 1, 1)
    assert (two.nproc, two.ranks_per_node, two.parallel["ep"]) == (2, 2, 2)  # EP 4 shrinks to what divides 2
    assert choose_layout(st, 2, None, "ep=1").virtual == 1
    assert choose_layout(st, 4, 4, "ep=2").parallel["ep"] == 2
    assert choose_layout(ep4_state(pp=2, ep=2), 1, None, None, virtual=False).parallel["pp"] == 1
    assert parse_layout("pp=2,ep=4,pp_schedule=dualpipev") == {"pp": 2, "ep": 4, "pp_schedule": "dualpipev"}
    with pytest.raises(ConfigError, match="tp"):
        parse_layout("tp=2")


def test_pass_probability_and_seed():
    assert pass_probability(10, 3, 0.1) == pytest.approx(math.comb(9, 3) / math.comb(10, 3))  # 0.7
    assert pass_probability(10, 10, 0.1) == 0.0  # every segment checked: a forgery cannot pass
    assert pass_probability(4, 1, 0.5) == 0.5
    root = "ab" * 32
    assert sample_seed(root) == int("ab" * 8, 16)
    assert sample_segments(10, 3, sample_seed(root)) == sample_segments(10, 3, sample_seed(root))
    assert sample_segments(10, 3, sample_seed(root)) != sample_segments(10, 3, sample_seed("cd" * 32))


def test_distance_is_relative_to_the_segment_update():
    start = {"w": torch.zeros(4)}
    stored = {"w": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    near = {"w": torch.tensor([1.0, 0.0, 0.0, 1e-3])}
    d = dist.distance(near, stored, start)
    assert d.rel_l2 == pytest.approx(1e-3) and d.max_abs == pytest.approx(1e-3) and d.tensors[0]["name"] == "w"
    assert dist.distance(stored, stored, start).rel_l2 == 0.0
    t = dist.calibrate(d, "x vs y", margin=10)
    assert t.rel_l2 == pytest.approx(1e-2) and t.admits(d)
    assert not t.admits(dist.distance({"w": torch.tensor([1.0, 0.0, 0.0, 0.1])}, stored, start))
    assert math.isinf(dist.distance({}, stored, start).rel_l2)  # a missing tensor is infinitely far


def test_loss_trajectory_band_is_calibrated_per_step_and_names_the_first_step_out():
    from sourcelm.provenance.segment_check import judge_trajectory

    assert dist.loss_gaps([2.0, None, 3.0], [2.0, None, 2.0]) == [0.0, 0.0, 0.5]  # skipped on both sides: no gap
    assert dist.loss_gaps([2.0, None], [2.0, 1.0]) == [0.0, math.inf]  # skipped on one side only
    assert dist.loss_gaps([2.0], [2.0, 1.0]) == [0.0, math.inf]  # a step missing
    floor = 10 * dist.LOSS_FLOOR
    band = dist.calibrate_trajectory([0.0, 1e-8, 5e-7, 1e-7], margin=10)
    assert band.per_step == pytest.approx([floor, floor, 5e-6, 5e-6])  # the largest honest gap so far, x 10
    a = [4.0, 3.9, 3.8, 3.7]  # the honest replay judged; b: the calibration replay
    b = [x * (1 + g) for x, g in zip(a, [0.0, 1e-8, 5e-7, 1e-7])]
    honest = [x * (1 + g) for x, g in zip(a, [1e-8, 0.0, 2e-6, 4e-6])]
    r = judge_trajectory("steps 10→14", 10, a, b, honest, margin=10)
    assert r["ratio"] < 1 and "first_step_over" not in r
    forged = [a[0], a[1] * (1 + 1e-4), a[2], a[3]]  # another learning rate shows from the second step
    r = judge_trajectory("steps 10→14", 10, a, b, forged, margin=10)
    assert r["ratio"] > 1 and r["first_step_over"] == 12 and r["detail"].startswith("steps 10→14: from step 12")
    assert judge_trajectory("s", 0, a, b, None) is None  # a checkpoint without losses: not judged


def replay_checks(report):
    return [c for c in report.checks if c.what == "replay"]


def test_layout_that_cannot_hold_the_model_is_refused(run_copy):
    report = verify(run_copy, replay=[2], nproc=1, max_memory=2**20, show_progress=False)
    [check] = replay_checks(report)
    assert not check.ok and check.detail.startswith("not run: layout refused")
    assert "GiB" in check.detail and "needs about" in check.detail
    record = json.loads((run_copy / "verification" / "report.json").read_text())["checks"][0]
    assert record["verdict"] == "not run" and record["memory_estimate"] > 2**20
    from sourcelm.provenance.card import write_card

    card = write_card(run_copy).read_text()  # the model card links the report and shows the verdict
    assert "(verification/report.md)" in card and "steps 2→4: not run" in card


def test_missing_inputs_are_named_and_not_run(run_copy):
    (run_copy / "train" / "checkpoints" / "step_000002" / "optimizer.safetensors").unlink()
    shard = next((run_copy / "tokens" / "train").glob("*.bin"))
    shard.unlink()
    report = verify(run_copy, replay=[2], nproc=1, show_progress=False)
    [check] = replay_checks(report)
    assert not check.ok and check.detail.startswith("not run: cannot replay, missing")
    assert "step_000002" in check.detail and "optimizer.safetensors missing" in check.detail
    assert shard.name in check.detail
    md = (run_copy / "verification" / "report.md").read_text()
    assert "**not run**" in md and "passed" not in md


@pytest.fixture(scope="module")
def ep4_run(built_run, tmp_path_factory):
    """The provenance run's data trained as the demo trains: EP 4 on 4 processes as 2 pretend nodes x 2."""
    run = tmp_path_factory.mktemp("ep4") / "train"
    train = [t for t in TRAIN if not t.startswith(("schedule.global_batch", "schedule.steps", "logging.valid"))]
    assert cli(["train", "tiny", *MODEL, *train, f"model.vocab_size={VOCAB}", "schedule.global_batch=8",
                "schedule.steps=4", "logging.valid_every=0", "parallel.ep=4", "train.dtype=float32",
                f"data.train=['{built_run / 'tokens' / 'train'}']",
                "--run-dir", str(run), "--nproc", "4", "--ranks-per-node", "2"]) == 0
    return run


def _check_record(run):
    return json.loads((run / "verification" / "report.json").read_text())["checks"][0]


@pytest.mark.slow
def test_ep4_run_replayed_exactly_on_one_and_two_processes(ep4_run):
    """The recorded EP 4 partition hosted as virtual ranks on fewer processes: every sum in the recorded order, so
    the stored checkpoint is reproduced bit for bit."""
    for nproc in (1, 2):
        report = verify(ep4_run, replay=[2], nproc=nproc, show_progress=False)
        assert report.ok, report.failures
        record = _check_record(ep4_run)
        assert record["layout"]["nproc"] == nproc and record["layout"]["virtual_ranks_per_process"] == 4 // nproc
        assert record["verdict"] == "exact", record["detail"]
        assert record["cost"]["seconds"] > 0 and record["cost"]["peak_rss"] > 0
        assert record["inputs"]["end_checkpoint"] and record["inputs"]["data"]
    md = (ep4_run / "verification" / "report.md").read_text()
    assert "| steps 2→4 | 2 process(es) hosting 2 virtual ranks each" in md


@pytest.mark.slow
def test_ep4_run_replayed_on_a_real_smaller_layout_is_within_tolerance(ep4_run):
    """EP 1 on one process: other summation orders, so not exact; the record names what breaks exactness and the
    calibrated tolerance verdict passes."""
    report = verify(ep4_run, replay=[2], nproc=1, layout="ep=1", show_progress=False)
    assert report.ok, report.failures
    record = _check_record(ep4_run)
    assert record["layout"]["virtual_ranks_per_process"] == 1 and record["layout"]["parallel"]["ep"] == 1
    assert record["verdict"] == "within tolerance", record["detail"]
    assert any(op.startswith("expert weight gradients") for op in record["exact_broken_by"])
    assert any(op.startswith("dense gradient reduction") for op in record["exact_broken_by"])
    assert record["threshold"]["margin"] == dist.MARGIN and "derivation" in record["threshold"]
    assert record["ratio"] < 1


@pytest.mark.slow
def test_sample_is_seeded_by_the_root_and_reports_the_odds(ep4_run):
    report = verify(ep4_run, sample=1, nproc=4, show_progress=False)  # the recorded layout: exact
    assert report.ok, report.failures
    doc = json.loads((ep4_run / "verification" / "report.json").read_text())
    s = doc["sampling"]
    assert s["seed"] == sample_seed(doc["provenance_root"]) and s["seed_from"] == "the provenance root"
    assert doc["checks"][0]["verdict"] == "exact"
    starts = [0, 2]
    assert doc["checks"][0]["start_step"] == starts[sample_segments(2, 1, s["seed"])[0]]
    half = next(p for p in s["pass_probability"] if p["forged_fraction"] == 0.5)
    assert half["this_run"] == 0.5 and half["large_run"] == 0.5


@pytest.mark.slow
def test_dishonest_variants_fail_and_honest_replays_pass(ep4_run, tmp_path):
    from sourcelm.provenance.forgery import VARIANTS, separation

    report = walk(ep4_run)
    nodes = next(iter(report.checkpoint_runs().values()))
    result = separation(report, nodes[0], nodes[1], tmp_path, nproc=1)
    cases = {r["case"]: r for r in result["cases"]}
    assert set(cases) == {"stored checkpoint", *VARIANTS}
    assert cases["stored checkpoint"]["verdict"] != "failed" and cases["stored checkpoint"]["margin"] > 1
    assert cases["stored checkpoint"]["trajectory_ratio"] < 1
    for kind in VARIANTS:
        r = cases[kind]
        assert r["verdict"] == "failed" and r["ratio"] > 1, (kind, r)
        assert r["detail"].startswith("steps 2→4:"), (kind, r["detail"])
        if r["weights_ratio"] > 1:  # failed on its weights: the tensors that moved most are named
            assert r["distance"]["worst_tensors"][0]["name"] in r["detail"]
        else:  # failed on its losses: the first step out of the band is named
            assert f"from step {r['first_step_over']}" in r["detail"]
        # every variant's losses leave the band at the first step its change touches: the first of the segment,
        # the second for the learning rate (the first step's loss comes before the first update)
        assert r["trajectory_ratio"] > 1 and r["first_step_over"] == (4 if kind == "lr" else 3), (kind, r)
    assert result["all_separated"]


@pytest.mark.slow
def test_pipeline_run_replays_on_one_process(built_run, tmp_path):
    run = tmp_path / "pp"
    train = [t for t in TRAIN if not t.startswith(("schedule.global_batch", "schedule.steps", "logging.valid"))]
    assert cli(["train", "tiny", *MODEL, *train, f"model.vocab_size={VOCAB}", "schedule.global_batch=8",
                "schedule.steps=4", "logging.valid_every=0", "parallel.pp=2",
                f"data.train=['{built_run / 'tokens' / 'train'}']", "--run-dir", str(run), "--nproc", "2"]) == 0
    report = verify(run, replay=[2], nproc=1, show_progress=False)  # both stages as virtual ranks of one process
    assert report.ok, report.failures
    record = _check_record(run)
    assert record["layout"]["parallel"]["pp"] == 2 and record["layout"]["virtual_ranks_per_process"] == 2
    assert record["verdict"] == "exact", record["detail"]


@pytest.mark.slow
def test_replay_runs_the_recorded_thread_count(built_run, tmp_path, monkeypatch):
    """The bits of torch's weight-gradient matmuls and embedding backward depend on the intra-op thread count (they
    split their sums by it), so a run records its threads per rank and the replay runs with them: a run trained
    with 2 threads replays exactly from a verifier whose environment asks for 1. (fp32: torch's matmuls; the bf16
    AMX kernels are thread-count invariant by construction, tests/model/test_amx.py.)"""
    run = tmp_path / "threads2"
    train = [t for t in TRAIN if not t.startswith(("schedule.steps", "logging.valid"))]
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert cli(["train", "tiny", *MODEL, *train, f"model.vocab_size={VOCAB}", "schedule.steps=4",
                    "train.dtype=float32", "logging.valid_every=0", f"data.train=['{built_run / 'tokens' / 'train'}']",
                    "--run-dir", str(run)]) == 0
    finally:
        torch.set_num_threads(before)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    report = verify(run, replay=[2], show_progress=False)
    assert report.ok, report.failures
    record = _check_record(run)
    assert record["layout"]["threads_per_rank"] == 2 and record["verdict"] == "exact", record["detail"]
