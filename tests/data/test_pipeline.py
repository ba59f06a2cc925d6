"""The pipeline end to end on a small mixed input: outputs, statistics, drop log, audit,
manifest, determinism across worker counts, resume after SIGKILL, bad configs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sourcelm.artifacts import read_manifest, sha256_file
from sourcelm.config import ConfigError
from sourcelm.data.formats.writers import read_jsonl_zst
from sourcelm.data.pipeline.audit import audit
from sourcelm.data.pipeline.executors import LocalExecutor
from sourcelm.data.pipeline.plan import load_plan
from sourcelm.data.pipeline.run import run_plan
from tests.data.pipeline_fixtures import make_inputs, output_bytes, write_pipeline

REPO = Path(__file__).resolve().parents[2]
# the data commands alone: `python -m sourcelm` would also import every other area's commands
DATA_CLI = [sys.executable, "-c", "import argparse, sys; from sourcelm.data import commands; "
            "p = argparse.ArgumentParser(); commands.register(p.add_subparsers()); "
            "a = p.parse_args(); sys.exit(a.func(a))"]


def curate(root, out, workers=1, pipeline=None):
    plan = load_plan(pipeline or root / "pipeline.toml")
    return run_plan(plan, out, LocalExecutor(workers), workers=workers, show_progress=False)


def all_records(out, folder):
    return [r for p in sorted((out / folder).rglob("*.jsonl.zst")) for r in read_jsonl_zst(p)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipe")
    make_inputs(root / "data")
    write_pipeline(root)
    stats = curate(root, root / "out")
    return root, root / "out", stats


def test_outputs_and_reasons(run_dir):
    root, out, stats = run_dir
    kept = all_records(out, "documents")
    drops = all_records(out, "drops")
    reasons = sorted({d["reason"] for d in drops})
    assert reasons == ["exact_dedup:exact_duplicate", "gopher_quality:too_few_words", "language:other_language",
                       "read:invalid_json", "read:text_not_a_string", "url_filter:blocked_domain"]
    # every input record is either kept or logged, once
    n_records = 8 + 3 * (12 + 2) + 1  # 8 HTML responses (the image is not a document)
    assert len(kept) + len(drops) == n_records
    ids = [r["id"] for r in kept + drops]
    assert len(set(ids)) == len(ids)
    # exact duplicates across files: english_text(k % 20) for 36 jsonl docs → 20 distinct texts
    texts = [r["text"] for r in kept]
    assert len(texts) == len(set(texts))
    assert all(set(r) == {"id", "text", "source", "url", "metadata"} for r in kept)
    assert {r["metadata"]["language"] for r in kept} == {"en"}
    pii = [r for r in kept if "<EMAIL>" in r["text"]]
    assert len(pii) == 1 and "<IP>" in pii[0]["text"] and "someone@example.org" not in pii[0]["text"]
    html = [r for r in kept if r["source"].endswith(".warc.gz")]
    assert len(html) == 6 and all("<p>" not in r["text"] and "Report number" in r["text"] for r in html)
    assert stats["documents_kept"] == len(kept)
    st = stats["steps"]
    assert st["read"]["docs_out"] == n_records - 6 and st["read"]["drops"] == {"invalid_json": 3,
                                                                               "text_not_a_string": 3}
    assert st["read"]["counters"] == {"skipped_content_type": 1}
    assert st["pii"]["counters"] == {"emails_replaced": 1, "ips_replaced": 1}
    for name in ("extract", "url_filter", "language", "gopher_repetition", "gopher_quality", "exact_dedup", "pii"):
        s = st[name]
        assert s["docs_in"] - s["docs_out"] == sum(s["drops"].values()), name
    order = list(st)
    assert order[:6] == ["read", "extract", "url_filter", "language", "gopher_quality", "gopher_repetition"]


def test_stats_plot_manifest(run_dir):
    root, out, stats = run_dir
    on_disk = json.loads((out / "stats.json").read_text())
    assert on_disk["documents_kept"] == stats["documents_kept"]
    assert (out / "funnel.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    m = read_manifest(out)
    assert m["stage"] == "curate"
    assert m["outputs"]["documents/00001.jsonl.zst"] == sha256_file(out / "documents/00001.jsonl.zst")
    assert {"stats.json", "funnel.png", "pipeline.json"} <= set(m["outputs"])
    assert sorted(Path(i["path"]).name for i in m["inputs"]) == ["crawl.warc.gz", "part0.jsonl", "part1.jsonl",
                                                                  "part2.jsonl"]
    assert m["config"]["steps"][2] == {"type": "language", "languages": ["en"]}
    assert not (out / "work" / "stage0").exists()  # documents between stages are removed at the end


def test_audit(run_dir):
    root, out, _ = run_dir
    kept = all_records(out, "documents")[0]
    code, text = audit(out, kept["id"])
    assert code == 0 and "KEPT in documents/" in text and kept["source"] in text
    drop = next(d for d in all_records(out, "drops") if d["reason"] == "language:other_language")
    code, text = audit(out, drop["id"])
    assert code == 0 and "DROPPED by step `language`: other_language" in text and "de.html" in text
    bad = next(d for d in all_records(out, "drops") if d["reason"].startswith("read:"))
    assert "while reading its input" in audit(out, bad["id"])[1]
    assert audit(out, "0000000000000000")[0] == 1
    cli = subprocess.run([*DATA_CLI, "audit", drop["id"], "--run", str(out)], capture_output=True, text=True,
                         cwd=REPO)
    assert cli.returncode == 0 and "other_language" in cli.stdout


def test_same_bytes_with_two_workers_and_rerun_is_a_no_op(run_dir, tmp_path):
    root, out, stats = run_dir
    stats2 = curate(root, tmp_path / "out2", workers=2)
    assert output_bytes(tmp_path / "out2") == output_bytes(out)
    strip = lambda s: {k: {kk: vv for kk, vv in v.items() if "time" not in kk and kk != "docs_per_s"}
                       for k, v in s["steps"].items()}
    assert strip(stats2) == strip(stats)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "out2" / "documents").iterdir()}
    again = curate(root, tmp_path / "out2", workers=2)  # every task has its marker: nothing is redone
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "out2" / "documents").iterdir()} == before
    assert strip(again) == strip(stats)


def test_resume_after_sigkill(tmp_path):
    root = tmp_path
    make_inputs(root / "data", n_jsonl_files=8, docs_per_file=10)
    steps = '[[step]]\ntype = "tests.data.pipeline_fixtures:SlowStep"\nseconds = 0.02\n'
    write_pipeline(root, extra_steps=steps)
    clean = tmp_path / "clean"
    curate(root, clean)
    out = tmp_path / "killed"
    cmd = [*DATA_CLI, "curate", str(root / "pipeline.toml"), "--output", str(out),
           "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    markers = out / ".done" / "stage1"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(markers.glob("*.json")) if markers.exists() else []) < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_done = len(list(markers.glob("*.json")))
    assert 2 <= n_done < 9, "the run was not killed in the middle of its last stage"
    assert not (out / "stats.json").exists()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert output_bytes(out) == output_bytes(clean)
    ids = [r["id"] for r in all_records(out, "documents") + all_records(out, "drops")]
    assert len(ids) == len(set(ids))


def test_split_by_language_and_parquet_output(tmp_path):
    make_inputs(tmp_path / "data", n_jsonl_files=1)
    text = """
[[input]]
paths = ["data/warc/*.warc.gz"]
[output]
format = "parquet"
split_by = "language"
[[step]]
type = "extract"
[[step]]
type = "language"
"""
    curate(tmp_path, tmp_path / "out", pipeline=write_pipeline(tmp_path, text))
    import pyarrow.parquet as pq

    langs = sorted(p.parent.name for p in (tmp_path / "out" / "documents").rglob("*.parquet"))
    assert langs == ["de", "en"]
    de = pq.read_table(next((tmp_path / "out" / "documents" / "de").glob("*.parquet"))).to_pylist()
    assert len(de) == 1 and json.loads(de[0]["metadata"])["language"] == "de"


@pytest.mark.parametrize("text,needle", [
    ('[[input]]\npaths=["data/jsonl/*.jsonl"]\n[[step]]\ntype="nope"\n', "step type 'nope' is unknown"),
    ('[[input]]\npaths=["data/jsonl/*.jsonl"]\n[[step]]\ntype="gopher_quality"\nmin_wrds=3\n',
     "unknown key(s) ['min_wrds']"),
    ('[[input]]\npaths=["data/warc/*.warc.gz"]\n[[step]]\ntype="pii"\n', "add [[step]] type = \"extract\""),
    ('[[input]]\npaths=["nothing/*.jsonl"]\n[[step]]\ntype="pii"\n', "matches no file"),
    ('[[input]]\npaths=["data/jsonl/*.jsonl"]\n[[step]]\ntype="c4"\npreset="x"\n', "preset='x'"),
    ('[[input]]\npaths=["data/jsonl/*.jsonl"]\n[[step]]\ntype="pii"\n[[step]]\ntype="pii"\n', "used twice"),
    ('[[input]]\npaths=["data/jsonl/*.jsonl"]\n[output]\nformat="csv"\n[[step]]\ntype="pii"\n', "output.format"),
])
def test_bad_config_fails_at_once_naming_the_field(tmp_path, text, needle):
    make_inputs(tmp_path / "data", n_jsonl_files=1)
    with pytest.raises(ConfigError, match=None) as e:
        load_plan(write_pipeline(tmp_path, text))
    assert needle in str(e.value)


def test_a_step_named_by_its_module_path_before_the_subpackages_still_builds():
    """A pipeline TOML may name a built-in step "module:Class" by its flat path from before sourcelm/data/
    had subpackages; the registry maps it to where the module is now."""
    import importlib.util

    from sourcelm.data.pipeline.registry import FORMER_MODULES, STEP_TYPES, build_step

    step = build_step({"type": "sourcelm.data.minhash:MinhashDedup", "name": "near_dup"}, 0)
    assert type(step) is type(build_step({"type": "minhash_dedup"}, 1)) and step.name == "near_dup"
    assert type(build_step({"type": "sourcelm.data.exact_dedup:ExactDedup"}, 0)).__name__ == "ExactDedup"
    assert {spec.split(":")[0] for spec in STEP_TYPES.values()} == set(FORMER_MODULES.values())
    assert all(importlib.util.find_spec(old) is None for old in FORMER_MODULES)


def test_input_override_and_cli(tmp_path, capsys):
    make_inputs(tmp_path / "data", n_jsonl_files=2)
    pipeline = write_pipeline(tmp_path, '[[input]]\npaths=["nowhere/*.jsonl"]\n[[step]]\ntype="pii"\n')
    r = subprocess.run([*DATA_CLI, "curate", str(pipeline), "--output", str(tmp_path / "o"),
                        "--input", str(tmp_path / "data" / "jsonl" / "part1.jsonl"), "--workers", "1",
                        "--no-progress"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr
    kept = all_records(tmp_path / "o", "documents")
    assert len(kept) == 12 and {d["source"] for d in kept} == {"part1.jsonl"}
    from sourcelm.cli import main  # the real entry point, in this process: ConfigError → exit code 2

    assert main(["curate", str(pipeline), "--output", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "matches no file" in capsys.readouterr().err
