"""The shipped demo pipeline on the real demo corpus (fetched once into the test cache)."""

import json

import pytest

from sourcelm.artifacts import read_manifest
from sourcelm.data.formats.writers import read_jsonl_zst
from sourcelm.data.pipeline.audit import audit
from sourcelm.data.pipeline.executors import LocalExecutor
from sourcelm.data.pipeline.plan import load_plan, shipped_pipeline
from sourcelm.data.pipeline.run import run_plan


@pytest.mark.slow
def test_demo_pipeline_on_the_demo_corpus(demo_corpus, tmp_path, monkeypatch):
    root = demo_corpus
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "raw").symlink_to(root)  # the demo's globs are data/raw/... from the CWD
    monkeypatch.chdir(tmp_path)
    plan = load_plan("demo")
    assert plan.pipeline_file == str(shipped_pipeline("demo"))
    # exact, then MinHash dedup as global stages (after extraction, decontamination against the eval tasks)
    assert [s.closes_with for s in plan.stages] == [8, 9, None]
    stats = run_plan(plan, tmp_path / "out", LocalExecutor(2), workers=2, show_progress=False)
    st = stats["steps"]
    assert stats["documents_kept"] > 300
    assert st["language"]["drops"]["other_language"] > 1000  # handbook translations, de/ru fortunes, UDHR
    assert st["exact_dedup"]["drops"].get("exact_duplicate", 0) > 10  # repeated fortunes, shared pages
    assert st["minhash_dedup"]["drops"].get("near_duplicate", 0) > 10  # partly translated handbook pages
    kept = [r for p in sorted((tmp_path / "out" / "documents").glob("*.jsonl.zst")) for r in read_jsonl_zst(p)]
    assert len(kept) == stats["documents_kept"]
    assert {r["metadata"]["language"] for r in kept} == {"en"}
    assert any(r["source"].endswith("python-docs.warc.gz") for r in kept)
    manifest = read_manifest(tmp_path / "out")
    assert any(i["path"].endswith("manifest.json") for i in manifest["inputs"])  # linked to the corpus manifest
    drop = next(r for p in sorted((tmp_path / "out" / "drops").glob("stage2-*.jsonl.zst")) for r in read_jsonl_zst(p))
    code, text = audit(tmp_path / "out", drop["id"])
    assert code == 0 and "minhash_dedup" in text
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["documents_kept"] == len(kept)
