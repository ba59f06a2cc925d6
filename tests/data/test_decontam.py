"""Decontamination: 13-gram overlap with user evaluation texts, robust to case and punctuation."""

import gzip
import json

import pytest

from sourcelm.config import ConfigError
from sourcelm.data.pipeline.document import Document
from sourcelm.data.steps.decontam import Decontaminate

QUESTION = ("Which of the following best explains why the sky appears blue to an observer standing "
            "on the surface of the Earth at noon")  # 23 words


@pytest.fixture
def eval_dir(tmp_path):
    d = tmp_path / "evals"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "q.txt").write_text(QUESTION)
    rows = [json.dumps({"text": "the quick brown fox jumps over the lazy dog while the cat sleeps all day"}),
            "{not json",
            json.dumps({"question": "missing the text field"}),
            json.dumps({"text": "too short to match"})]
    with gzip.open(d / "set.jsonl.gz", "wt") as f:
        f.write("\n".join(rows) + "\n")
    return d


def doc(text, i=0):
    return Document(id=f"d{i}", text=text, source="test")


def test_drops_documents_sharing_a_13_gram(eval_dir):
    step = Decontaminate(eval_paths=str(eval_dir))
    assert step.eval_stats == {"eval_texts": 3, "eval_lines_skipped": 2, "eval_texts_too_short": 1,
                               "eval_ngrams": 11 + 3}  # 23 and 15 words
    # 13 consecutive words of the question, with other case, punctuation and line breaks around them
    leaked = "Intro text. WHY the sky appears blue, to an observer\nstanding on the surface of the earth! More."
    assert step.process(doc(leaked)) == "contaminated"
    twelve = "why the sky appears blue to an observer standing on the surface"  # 12 words only
    assert step.process(doc(twelve)) == doc(twelve)
    assert step.process(doc("THE QUICK brown fox jumps over the lazy dog while the cat sleeps all")) == "contaminated"
    assert step.process(doc("too short to match")) == doc("too short to match")
    assert step.counters["contaminated"] == 2
    assert step.counters["docs_checked"] == 4
    assert step.counters["matched_ngrams"] == 3 + 2  # 15 and 14 leaked words hold 3 and 2 13-grams


def test_min_matches_and_ngram_size(eval_dir):
    step = Decontaminate(eval_paths=[str(eval_dir / "sub" / "q.txt")], ngram=8, min_matches=3)
    assert step.matches("the sky appears blue to an observer standing on") == 2
    assert step.process(doc("the sky appears blue to an observer standing on")).id == "d0"
    assert step.process(doc("the sky appears blue to an observer standing on the")) == "contaminated"


@pytest.mark.parametrize("kwargs,field", [({"eval_paths": []}, "eval_paths"),
                                          ({"eval_paths": "/nonexistent/evals"}, "eval_paths"),
                                          ({"ngram": 0}, "ngram"), ({"min_matches": 0}, "min_matches")])
def test_bad_config_names_the_field(eval_dir, kwargs, field):
    kwargs = {"eval_paths": str(eval_dir), **kwargs}
    with pytest.raises(ConfigError, match=f"decontaminate.{field}"):
        Decontaminate(**kwargs)


def test_no_usable_evaluation_text_is_a_config_error(tmp_path):
    (tmp_path / "e.txt").write_text("only five words in here")
    with pytest.raises(ConfigError, match="no evaluation text"):
        Decontaminate(eval_paths=str(tmp_path))
