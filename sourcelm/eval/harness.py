"""lm-evaluation-harness on an exported model, offline, and the result files it leaves.

The model is evaluated through the harness's own `hf` model type on the Hugging Face directory that
`sourcelm export` wrote, so a score here is the score anyone gets with
`lm_eval --model hf --model_args pretrained=DIR --include_path sourcelm/eval/tasks --tasks T`.
Hub and dataset downloads are switched off (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) unless the caller
allows them, so the packaged offline tasks run anywhere and a standard task (hellaswag, arc_easy,
mmlu ...) runs only where its dataset is already in the Hugging Face cache, or with `online=True`.

Nothing is written until every task has finished: a failed or interrupted evaluation leaves no
result file. Each task's file records its metrics, the fraction right by chance (the mean of
1 / number of choices over the items scored), the harness version, the harness's task hash (over
every item's document, prompt and target, as `lm_eval --log_samples` computes it) and the SHA-256
of the task's packaged files.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes, sha256_file

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
INSTALL_HINT = "install it with `pip install 'sourcelm[eval]'` (or `pip install 'lm-eval>=0.4'`)"


def offline_tasks() -> dict[str, Path]:
    """The packaged tasks: name -> YAML file."""
    out = {}
    for path in sorted(TASKS_DIR.glob("*.yaml")):
        m = re.search(r"^task:\s*(\S+)", path.read_text(), re.M)
        if m:
            out[m.group(1)] = path
    return out


def task_files(task: str) -> dict[str, str]:
    """SHA-256 of a packaged task's YAML, loader and data file, by path under sourcelm/eval/tasks."""
    yaml = offline_tasks()[task]
    data = re.search(r"!function utils\.(\w+)", yaml.read_text()).group(1)
    files = [yaml, TASKS_DIR / "utils.py", TASKS_DIR / "data" / f"{data}.jsonl"]
    return {str(f.relative_to(TASKS_DIR)): sha256_file(f) for f in files}


def require_lm_eval() -> str:
    """The installed harness version, or a SystemExit that says how to install it."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise SystemExit(f"sourcelm eval needs lm-evaluation-harness, which is not installed: {INSTALL_HINT}") from None
    return importlib.metadata.version("lm_eval")


def check_model_dir(hf_dir: Path) -> None:
    """Fails, naming the fix, unless `hf_dir` holds an HF model and tokenizer that transformers loads."""
    fix = "export a checkpoint with `sourcelm export RUN/train/checkpoints/step_N --hf DIR --tokenizer TOKENIZER_DIR`"
    if not (hf_dir / "config.json").is_file():
        raise SystemExit(f"{hf_dir}: no config.json, so not a Hugging Face model directory; {fix}")
    if not any(hf_dir.glob("*.safetensors")):
        raise SystemExit(f"{hf_dir}: no *.safetensors weights; {fix}")
    if not (hf_dir / "tokenizer.json").is_file():
        raise SystemExit(f"{hf_dir}: no tokenizer.json (the harness tokenizes the prompts); re-export with "
                         "`--tokenizer TOKENIZER_DIR`")
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(hf_dir)
        AutoTokenizer.from_pretrained(hf_dir)
    except Exception as e:  # any reason transformers gives: the directory is not usable as it is
        raise SystemExit(f"{hf_dir}: transformers cannot load it ({type(e).__name__}: {e}); {fix}") from None


def check_tasks(tasks: list[str], task_manager) -> None:
    known = set(task_manager.all_tasks)
    unknown = [t for t in tasks if t not in known]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; the offline tasks are {sorted(offline_tasks())}, and "
                         "`lm_eval ls tasks` lists the harness's standard ones (they need their dataset downloaded)")


def harness_command(hf_dir: Path, tasks: list[str], limit: int | None, batch_size: int) -> str:
    """The lm_eval command line that gives the same numbers."""
    cmd = (f"HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 lm_eval --model hf --model_args pretrained={hf_dir},dtype=float32 "
           f"--include_path {TASKS_DIR} --tasks {','.join(tasks)} --batch_size {batch_size}")
    return cmd + (f" --limit {limit}" if limit else "")


def evaluate(hf_dir: str | Path, tasks: list[str], limit: int | None = None, batch_size: int = 16,
             device: str = "cpu", online: bool = False) -> dict[str, dict]:
    """Runs the harness; returns one record per task (see the module doc). Raises SystemExit on bad input."""
    hf_dir = Path(hf_dir).resolve()
    version = require_lm_eval()
    if not online:  # before the harness imports datasets / huggingface_hub, which read these once
        os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"
    check_model_dir(hf_dir)
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import hash_string

    # the harness's own task index takes ~15 s to build: read it only when a standard task is asked for
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=not set(tasks) <= set(offline_tasks()))
    check_tasks(tasks, manager)
    try:
        results = simple_evaluate(model="hf", model_args={"pretrained": str(hf_dir), "dtype": "float32"},
                                  tasks=list(tasks), task_manager=manager, limit=limit, batch_size=batch_size,
                                  device=device, log_samples=True, bootstrap_iters=1000)
    except Exception as e:  # nothing is written: name the failure and where to look
        raise SystemExit(f"lm-evaluation-harness failed on {hf_dir} ({type(e).__name__}: {e}); no result was "
                         "written. Check that transformers loads the directory and that the tasks' data is "
                         "available offline (packaged tasks always are)") from e
    missing = [t for t in tasks if t not in results.get("results", {})]
    if missing:
        raise SystemExit(f"the harness returned no result for {missing}; no result was written")
    manifest = hf_dir / "manifest.json"
    records = {}
    for task in tasks:
        samples = results["samples"][task]
        metrics = {k.split(",")[0]: v for k, v in results["results"][task].items() if k != "alias"}
        records[task] = {
            "task": task, "metrics": metrics, "items": len(samples), "limit": limit,
            "chance": sum(1 / len(s["doc"]["choices"]) for s in samples) / len(samples)
            if samples and "choices" in samples[0]["doc"] else None,
            "harness": {"lm_eval_version": version, "task_version": results["versions"].get(task),
                        "task_hash": hash_string("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"]
                                                         for s in samples)),
                        "command": harness_command(hf_dir, [task], limit, batch_size)},
            "task_files": task_files(task) if task in offline_tasks() else None,
            "model": {"dir": str(hf_dir), "manifest_sha256": sha256_file(manifest) if manifest.is_file() else None},
        }
    return records


def write_results(out_dir: str | Path, records: dict[str, dict]) -> list[Path]:
    """OUT/TASK.json for each task, each written atomically, after all of them were computed."""
    paths = []
    for task, record in records.items():
        path = Path(out_dir) / f"{task}.json"
        atomic_write_bytes(path, (json.dumps(record, indent=1, sort_keys=True) + "\n").encode())
        paths.append(path)
    return paths


def read_results(out_dir: str | Path) -> dict[str, dict]:
    """The task records in OUT (as `write_results` left them), by task name."""
    out = {}
    for path in sorted(Path(out_dir).glob("*.json")):
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "task" in record and "metrics" in record:
            out[record["task"]] = record
    return out
