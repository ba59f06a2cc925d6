"""Gopher (MassiveText) quality and repetition rules, Rae et al. 2021, Appendix A / Table A1.

Where the paper leaves a detail open, the choice follows datatrove's widely used implementation
so results can be compared with it: the stop-word test is case-sensitive, bullets are "•" or
"-", a top n-gram's characters are counted with its inner spaces, a duplicated n-gram's without.

Repetition runs on integer hashes of the tokens with numpy (n-gram hashes by rolling
multiply-add), so the per-word Python work of the straightforward version is gone; only the
positions whose n-gram occurs more than once are walked in Python.
"""

from __future__ import annotations

import re

import numpy as np

from sourcelm.data import textutil
from sourcelm.data.document import Document
from sourcelm.data.step import Step

STOP_WORDS = ("the", "be", "to", "of", "and", "that", "have", "with")


class GopherQuality(Step):
    name = "gopher_quality"

    def __init__(self, min_words: int | None = 50, max_words: int | None = 100_000,
                 min_mean_word_length: float | None = 3, max_mean_word_length: float | None = 10,
                 max_symbol_word_ratio: float | None = 0.1, max_bullet_lines_ratio: float | None = 0.9,
                 max_ellipsis_lines_ratio: float | None = 0.3, min_alpha_words_ratio: float | None = 0.8,
                 min_stop_words: int | None = 2, stop_words: list[str] | None = None,
                 bullets: list[str] | None = None):
        super().__init__()
        self.min_words, self.max_words = min_words, max_words
        self.min_mean, self.max_mean = min_mean_word_length, max_mean_word_length
        self.max_symbol_ratio = max_symbol_word_ratio
        self.max_bullet_ratio = max_bullet_lines_ratio
        self.max_ellipsis_ratio = max_ellipsis_lines_ratio
        self.min_alpha_ratio = min_alpha_words_ratio
        self.min_stop_words = min_stop_words
        self.stop_words = frozenset(STOP_WORDS if stop_words is None else stop_words)
        self.bullets = tuple(bullets if bullets is not None else ("•", "-"))

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        toks = textutil.tokens(text)
        n_tokens = len(toks)
        words = textutil.non_symbol_words(toks)
        n_words = len(words)
        if self.min_words is not None and n_words < self.min_words:
            return "too_few_words"
        if self.max_words is not None and n_words > self.max_words:
            return "too_many_words"
        if n_words:
            mean = sum(map(len, words)) / n_words
            if self.min_mean is not None and mean < self.min_mean:
                return "short_mean_word_length"
            if self.max_mean is not None and mean > self.max_mean:
                return "long_mean_word_length"
        if not n_tokens:
            return "no_words"
        if self.max_symbol_ratio is not None:
            if text.count("#") / n_tokens > self.max_symbol_ratio:
                return "too_many_hashes"
            if (text.count("...") + text.count("…")) / n_tokens > self.max_symbol_ratio:
                return "too_many_ellipses"
        lines = text.splitlines() or [""]
        if self.max_bullet_ratio is not None:
            bullets = sum(1 for line in lines if line.lstrip().startswith(self.bullets))
            if bullets / len(lines) > self.max_bullet_ratio:
                return "too_many_bullet_lines"
        if self.max_ellipsis_ratio is not None:
            ell = sum(1 for line in lines if line.rstrip().endswith(("...", "…")))
            if ell / len(lines) > self.max_ellipsis_ratio:
                return "too_many_ellipsis_lines"
        if self.min_alpha_ratio is not None:
            alpha = n_tokens - textutil.count_tokens_without_letter(toks)
            if alpha / n_tokens < self.min_alpha_ratio:
                return "few_alphabetic_words"
        if self.min_stop_words is not None and len(self.stop_words.intersection(toks)) < self.min_stop_words:
            return "few_stop_words"
        return doc


_PARAGRAPH_SPLIT = re.compile(r"\n{2,}")
_LINE_SPLIT = re.compile(r"\n+")
# odd 64-bit multiplier for the rolling n-gram hash
_MULT = np.uint64(0x9E3779B97F4A7C15)


def duplicates(items: list[str]) -> tuple[int, int]:
    """(number of items equal to an earlier item, their total characters)."""
    seen: set[str] = set()
    n_dup = chars = 0
    for item in items:
        if item in seen:
            n_dup += 1
            chars += len(item)
        else:
            seen.add(item)
    return n_dup, chars


class GopherRepetition(Step):
    name = "gopher_repetition"

    def __init__(self, dup_line_frac: float | None = 0.3, dup_para_frac: float | None = 0.3,
                 dup_line_char_frac: float | None = 0.2, dup_para_char_frac: float | None = 0.2,
                 top_ngram_char_frac: dict | None = None, dup_ngram_char_frac: dict | None = None):
        super().__init__()
        self.dup_line_frac, self.dup_para_frac = dup_line_frac, dup_para_frac
        self.dup_line_char_frac, self.dup_para_char_frac = dup_line_char_frac, dup_para_char_frac
        top = top_ngram_char_frac or {2: 0.20, 3: 0.18, 4: 0.16}
        dup = dup_ngram_char_frac or {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
        # TOML keys are strings
        self.top = sorted((int(n), float(f)) for n, f in top.items())
        self.dup = sorted((int(n), float(f)) for n, f in dup.items())

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        if not text:
            return "empty"
        n_chars = len(text)
        paragraphs = _PARAGRAPH_SPLIT.split(text.strip())
        n_dup, dup_chars = duplicates(paragraphs)
        if self.dup_para_frac is not None and n_dup / len(paragraphs) > self.dup_para_frac:
            return "dup_para_frac"
        if self.dup_para_char_frac is not None and dup_chars / n_chars > self.dup_para_char_frac:
            return "dup_para_char_frac"
        lines = _LINE_SPLIT.split(text)
        n_dup, dup_chars = duplicates(lines)
        if self.dup_line_frac is not None and n_dup / len(lines) > self.dup_line_frac:
            return "dup_line_frac"
        if self.dup_line_char_frac is not None and dup_chars / n_chars > self.dup_line_char_frac:
            return "dup_line_char_frac"
        toks = textutil.tokens(text)
        if not toks:
            return doc
        ids = np.fromiter(map(hash, toks), dtype=np.int64, count=len(toks)).view(np.uint64)
        cum = np.zeros(len(toks) + 1, dtype=np.int64)
        np.cumsum(np.fromiter(map(len, toks), dtype=np.int64, count=len(toks)), out=cum[1:])
        hashes = ids.copy()
        max_n = max([n for n, _ in self.top + self.dup], default=1)
        top, dup = dict(self.top), dict(self.dup)
        for n in range(1, max_n + 1):
            if n > 1:  # hash of the n-gram starting at i, from the (n-1)-gram's
                hashes = hashes[:-1] * _MULT + ids[n - 1:]
            if not len(hashes):
                break
            if n in top and _top_ngram_chars(hashes, cum, n) / n_chars > top[n]:
                return f"top_{n}_gram"
            if n in dup and _duplicated_ngram_chars(hashes, cum, n) / n_chars > dup[n]:
                return f"duplicated_{n}_grams"
        return doc


def _top_ngram_chars(hashes: np.ndarray, cum: np.ndarray, n: int) -> int:
    """Characters (inner spaces included) of all occurrences of the most frequent n-gram; among
    equally frequent ones, the one seen first."""
    _, first, counts = np.unique(hashes, return_index=True, return_counts=True)
    best = counts.max()
    i = int(first[counts == best].min())
    return (int(cum[i + n] - cum[i]) + n - 1) * int(best)


def _duplicated_ngram_chars(hashes: np.ndarray, cum: np.ndarray, n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram, scanning left to right and jumping
    past each repeat (so overlapping repeats are not counted twice)."""
    _, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts[inverse] > 1)
    if not len(repeated):
        return 0
    seen: set[int] = set()
    chars = 0
    next_pos = 0
    for pos, h in zip(repeated.tolist(), hashes[repeated].tolist()):
        if pos < next_pos:  # inside a repeat just counted: skipped, not remembered
            continue
        if h in seen:
            chars += int(cum[pos + n] - cum[pos])
            next_pos = pos + n
        else:
            seen.add(h)
    return chars
