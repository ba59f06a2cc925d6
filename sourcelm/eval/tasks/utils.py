"""Loaders of sourcelm's offline tasks for lm-evaluation-harness (`custom_dataset: !function utils.NAME`).

The harness imports this file by its path, beside the task YAMLs, so it stands alone: the data is the
shipped JSONL in `data/` (built by `python -m sourcelm.eval.build_tasks`), read into memory; nothing is
downloaded or cached.
"""

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"


def _load(name: str):
    import datasets

    with open(DATA / f"{name}.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def pydoc_cloze(**_):
    return _load("pydoc_cloze")


def udhr_langid(**_):
    return _load("udhr_langid")


def fortune_nextline(**_):
    return _load("fortune_nextline")
