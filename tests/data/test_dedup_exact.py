"""Exact dedup on normalised text: the normalisation, first-copy-kept, and task independence."""

import itertools
import json

from sourcelm.data.dedup.exact import ExactDedup, normalize_for_exact
from sourcelm.data.pipeline.document import Document


def test_normalisation_folds_case_width_and_spacing_but_keeps_digits():
    assert normalize_for_exact("  Hello\t\tWORLD\n\u00a0again ") == "hello world again"
    assert normalize_for_exact("ＡＢＣ１２３") == "abc123"  # full-width forms fold under NFKC
    assert normalize_for_exact("version 2") != normalize_for_exact("version 3")
    assert normalize_for_exact("a, b") != normalize_for_exact("a b")  # punctuation is kept


def run(texts, splits, tmp_path, workers=1):
    step = ExactDedup()
    docs = [Document(id=f"d{i:03d}", text=t, source="test") for i, t in enumerate(texts)]
    tasks = [docs[a:b] for a, b in itertools.pairwise(splits)]
    for t, part in enumerate(tasks):
        step.collect(iter(part), tmp_path, t)
    step.resolve(tmp_path, len(tasks), workers)
    fresh = ExactDedup()  # decide may run in another process: only the files carry the decisions
    return {d.id: fresh.decide(d, tmp_path, t) for t, part in enumerate(tasks) for d in part}, fresh


def test_first_copy_kept_across_tasks(tmp_path):
    texts = ["The cat sat.", "Another text", "the  CAT sat.", "", "  ", "Another text", "the cat sat!"]
    decisions, step = run(texts, [0, 2, 5, 7], tmp_path)
    assert decisions == {"d000": None, "d001": None, "d002": "exact_duplicate", "d003": None, "d004": None,
                         "d005": "exact_duplicate", "d006": None}
    assert step.counters["exact_duplicate"] == 2
    drops = json.loads((tmp_path / "drop_00001.json").read_text())
    assert drops == {"d002": "d000"}  # the kept copy is named, for audit
    stats = json.loads((tmp_path / "exact_stats.json").read_text())
    assert stats["exact_duplicates"] == 2 and stats["empty"] == 2


def test_decisions_do_not_depend_on_task_split(tmp_path):
    texts = [f"text number {i % 37}" for i in range(300)]
    one, _ = run(texts, [0, 300], tmp_path / "a")
    many, _ = run(texts, [0, 10, 11, 150, 299, 300], tmp_path / "b")
    assert one == many
    assert sum(r is not None for r in one.values()) == 300 - 37
    assert all(one[f"d{i:03d}"] is None for i in range(37))
