"""`verify --data`: re-run curation, tokenizer training and tokenization from the raw inputs the
manifests declare, in a temporary folder, and compare the results with the stored hashes.

The curation is rebuilt from what its manifest recorded: the resolved pipeline (steps, output
format, and the input files grouped into tasks with their document sources, which are part of
every document id) and the input files themselves, found through the manifest's input links
(already checked against their hashes by the walk). Run statistics hold timings, so stats.json
and the funnel plot are not compared; the documents, the drop log and the pipeline are.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from sourcelm.artifacts import sha256_file
from sourcelm.provenance.graph import Check, Node, Report

COMPARED_CURATE = ("documents/", "drops/", "pipeline.json")


def rebuild_plan(cur: Node):
    """The `Plan` the curation ran, from its manifest."""
    from sourcelm.data.pipeline.plan import InputFile, plan_from_dict

    cfg = cur.manifest["config"]
    files = [(cur.dir / i["path"]).resolve() for i in cur.manifest.get("inputs", [])
             if Path(i["path"]).name != "manifest.json"]
    if not files:
        raise ValueError("the curation manifest lists no input files")
    plan = plan_from_dict({"name": cfg["name"], "step": cfg["steps"], "output": cfg["output"],
                           "input": [{"paths": [str(files[0])]}]}, base=files[0].parent,
                          pipeline_file=cfg.get("pipeline_file"))
    tasks = []
    for task in cfg["tasks"]:
        group = []
        for entry in task:
            src = entry["source"]
            match = [f for f in files if f.as_posix().endswith("/" + src) or f.as_posix() == src]
            if len(match) != 1:
                raise ValueError(f"input source {src!r}: {len(match)} matching input files in the manifest")
            options = {k: v for k, v in entry.items() if k not in ("source", "format")}
            group.append(InputFile(str(match[0]), src, entry["format"], os.path.getsize(match[0]), options))
        tasks.append(group)
    plan.tasks = tasks
    return plan


def _compare(stage: str, path: str, stored: dict[str, str], rebuilt_dir: Path, names: list[str], what: str) -> Check:
    differ = [n for n in names if not (rebuilt_dir / n).is_file() or sha256_file(rebuilt_dir / n) != stored[n]]
    if differ:
        return Check(stage, path, "re-run", False,
                     f"{what}: {len(differ)} of {len(names)} file(s) differ: {', '.join(differ[:4])}")
    return Check(stage, path, "re-run", True, f"{what}: {len(names)} file(s) identical")


def replay_data(report: Report, show_progress: bool = True, workers: int | None = None) -> list[Check]:
    from sourcelm.data.pipeline.executors import make_executor
    from sourcelm.data.pipeline.run import run_plan
    from sourcelm.tokens.tokenize import tokenize
    from sourcelm.tokens.tokenizer import train_tokenizer

    cur, tok = report.of_kind("curate"), report.of_kind("tokenizer")
    splits = [n for n in report.of_kind("tokenize") if n.manifest.get("config", {}).get("split")]
    if len(cur) != 1 or len(tok) != 1 or not splits:
        return [Check("curate", str(report.run_dir), "re-run", False,
                      f"--data needs one curation, one tokenizer and token shards in the chain; found {len(cur)}, "
                      f"{len(tok)}, {len(splits)}")]
    cur, tok = cur[0], tok[0]
    workers = workers or min(2, os.cpu_count() or 1)
    checks = []
    with tempfile.TemporaryDirectory(prefix="sourcelm-data-") as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        try:
            plan = rebuild_plan(cur)
        except (ValueError, KeyError) as e:
            return [Check(cur.stage, report.rel(cur.path), "re-run", False, f"cannot rebuild the pipeline: {e}")]
        run_plan(plan, tmp / "curated", make_executor("local", workers, None), workers=workers,
                 show_progress=show_progress)
        names = [n for n in cur.manifest["outputs"] if n.startswith(COMPARED_CURATE)]
        checks.append(_compare(cur.stage, report.rel(cur.path), cur.manifest["outputs"], tmp / "curated", names,
                               f"curation re-run in {time.perf_counter() - t0:.0f} s, documents and drop log"))
        c = tok.manifest["config"]
        train_tokenizer(tmp / "curated", c["vocab_size"], tmp / "tokenizer", heldout_fraction=c["heldout_fraction"],
                        min_frequency=c["min_frequency"], show_progress=show_progress)
        checks.append(_compare(tok.stage, report.rel(tok.path), tok.manifest["outputs"], tmp / "tokenizer",
                               ["tokenizer.json"], "tokenizer re-trained"))
        valid_fraction = splits[0].manifest["config"]["valid_fraction"]
        tokenize(tmp / "curated", tmp / "tokenizer", tmp / "tokens", workers=workers, valid_fraction=valid_fraction,
                 show_progress=show_progress)
        for node in splits:
            split = node.manifest["config"]["split"]
            checks.append(_compare(node.stage, report.rel(node.path), node.manifest["outputs"], tmp / "tokens" / split,
                                   sorted(node.manifest["outputs"]), f"{split} token shards re-made"))
    return checks
