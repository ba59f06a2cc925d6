"""Decontamination: drop training documents that share a word 13-gram with evaluation texts.

The user gives the evaluation texts as files or folders (pipeline TOML key `eval_paths`, a path or
a list of paths; folders are read recursively, in sorted order):
  *.jsonl, *.jsonl.gz  one text per line, taken from `text_field` ("text" by default); a line
                       that is not JSON or lacks the field is skipped and counted
  anything else        one text per file (UTF-8; undecodable bytes replaced)
Texts are normalised like MinHash's words (NFKC, lowercase, Unicode `\\w+` runs), so case,
punctuation and spacing cannot hide an overlap. Every run of `ngram` (13, as GPT-3 and
"Lee et al.") consecutive words of every evaluation text is hashed to 64 bits and kept in one
sorted numpy array; a document is checked with one `np.isin`-style binary search over all of its
13-gram hashes. Evaluation texts shorter than `ngram` words cannot be matched this way: they are
counted (`eval_texts_too_short`) and logged, not silently used. A document with at least
`min_matches` (default 1) matching 13-grams is dropped as "contaminated".

Counters (per document, so they add up across tasks): docs_checked, contaminated, matched_ngrams
(summed over dropped documents). What was loaded (eval_texts, eval_ngrams, eval_texts_too_short,
eval_lines_skipped) is in `eval_stats` and logged once when the step is built.
"""

from __future__ import annotations

import collections
import gzip
import json
import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sourcelm.config import ConfigError
from sourcelm.data.dedup.minhash import ngram_hashes, words
from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step

log = logging.getLogger(__name__)


def _files(paths: list[Path]) -> Iterator[Path]:
    for p in paths:
        if p.is_dir():
            yield from sorted(f for f in p.rglob("*") if f.is_file())
        else:
            yield p


class Decontaminate(Step):
    name = "decontaminate"

    def __init__(self, eval_paths: str | list[str], ngram: int = 13, min_matches: int = 1,
                 text_field: str = "text") -> None:
        super().__init__()
        if isinstance(eval_paths, str):
            eval_paths = [eval_paths]
        if not eval_paths or not all(isinstance(p, str) for p in eval_paths):
            raise ConfigError("decontaminate.eval_paths: give a path or a list of paths to the evaluation texts")
        paths = [Path(p) for p in eval_paths]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise ConfigError(f"decontaminate.eval_paths: {missing} do not exist; fix the paths")
        if not isinstance(ngram, int) or ngram < 1:
            raise ConfigError(f"decontaminate.ngram = {ngram!r}: must be a positive integer (13 is standard)")
        if not isinstance(min_matches, int) or min_matches < 1:
            raise ConfigError(f"decontaminate.min_matches = {min_matches!r}: must be a positive integer")
        self.ngram, self.min_matches, self.text_field = ngram, min_matches, text_field
        self.eval_stats: collections.Counter = collections.Counter()
        self.eval_hashes = self._load(paths)
        if self.eval_hashes.size == 0:
            raise ConfigError(f"decontaminate.eval_paths: no evaluation text of at least {ngram} words in "
                              f"{[str(p) for p in paths]}; nothing to decontaminate against")

    def _texts(self, path: Path) -> Iterator[str]:
        name = path.name.lower()
        if name.endswith((".jsonl", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)[self.text_field]
                        if not isinstance(text, str):
                            raise TypeError(f"{self.text_field!r} is not a string")
                    except (ValueError, KeyError, TypeError) as e:
                        self.eval_stats["eval_lines_skipped"] += 1
                        log.warning("decontaminate: %s:%d skipped (%s)", path, lineno, e)
                        continue
                    yield text
        else:
            yield path.read_bytes().decode("utf-8", errors="replace")

    def _load(self, paths: list[Path]) -> np.ndarray:
        parts = []
        for path in _files(paths):
            for text in self._texts(path):
                self.eval_stats["eval_texts"] += 1
                h = ngram_hashes(words(text), self.ngram, short_as_one=False)
                if h.size == 0:
                    self.eval_stats["eval_texts_too_short"] += 1
                    log.info("decontaminate: an evaluation text in %s has fewer than %d words; it cannot be matched",
                             path, self.ngram)
                parts.append(h)
        hashes = np.unique(np.concatenate(parts)) if parts else np.empty(0, dtype=np.uint64)
        self.eval_stats["eval_ngrams"] = int(hashes.size)
        log.info("decontaminate: %s", dict(self.eval_stats))
        return hashes

    def matches(self, text: str) -> int:
        """How many of the text's word n-grams occur in the evaluation texts."""
        h = ngram_hashes(words(text), self.ngram, short_as_one=False)
        if h.size == 0:
            return 0
        idx = np.searchsorted(self.eval_hashes, h)
        idx[idx == self.eval_hashes.size] = 0
        return int(np.count_nonzero(self.eval_hashes[idx] == h))

    def process(self, doc: Document) -> Document | str:
        self.counters["docs_checked"] += 1
        found = self.matches(doc.text)
        if found >= self.min_matches:
            self.counters["contaminated"] += 1
            self.counters["matched_ngrams"] += found
            return "contaminated"
        return doc
