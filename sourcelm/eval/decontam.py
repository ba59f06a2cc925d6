"""The curation step that decontaminates training data against the packaged offline tasks.

`type = "sourcelm.eval.decontam:DecontaminateEvalTasks"` in a pipeline TOML: the `decontaminate`
step (word 13-grams, `sourcelm/data/steps/decontam.py`) with the evaluation texts set to every
task's data file in `sourcelm/eval/tasks/data/` (each item's `text`: its context and right
answer; the wrong answers are other items' right answers). The files are found from this module,
so the pipeline works from any folder; their SHA-256 go into every evaluation result
(`sourcelm eval`) and the model card.
"""

from __future__ import annotations

from sourcelm.data.steps.decontam import Decontaminate
from sourcelm.eval.build_tasks import TASK_DATA


class DecontaminateEvalTasks(Decontaminate):
    def __init__(self, ngram: int = 13, min_matches: int = 1) -> None:
        super().__init__([str(f) for f in sorted(TASK_DATA.glob("*.jsonl"))], ngram=ngram, min_matches=min_matches)
