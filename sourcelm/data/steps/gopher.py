"""Gopher (MassiveText) quality and repetition rules, Rae et al. 2021, Appendix A / Table A1.

Where the paper leaves a detail open, the choice follows datatrove's widely used implementation
so results can be compared with it: text is split into words as spaCy's English tokenizer splits
it (`textutil.tokens`; punctuation tokens count as words in the alphabetic-word, hash and
ellipsis ratios), the stop-word test is case-sensitive, bullets are "•" or "-", a top n-gram's
characters are counted with its inner spaces, a duplicated n-gram's without.
One deliberate difference: the word count and mean word length use the tokens holding a letter,
digit or underscore, as the paper's "words" read; datatrove counts every token with a character
outside its punctuation list, so "•", "→", "©" or "‘" are words there. On the demo corpus's 636
English pages this changes the word count of 485 pages and no keep/drop decision
(bench/RESULTS_curate.md).

Repetition works on integer hashes of the tokens (n-gram hashes by a vectorised rolling
multiply-add) instead of joined strings, groups them with one stable argsort per n, and stops looking
at longer n-grams once every n-gram is unique (no longer one can repeat then).
"""

from __future__ import annotations

import re

import numpy as np

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step
from sourcelm.data.steps import textutil

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
        cum_list = cum.tolist()
        hashes = ids
        top, dup = dict(self.top), dict(self.dup)
        all_unique = False  # once every n-gram is unique, every longer one is too
        for n in range(2, max([*top, *dup], default=1) + 1):
            hashes = hashes[:-1] * _MULT + ids[n - 1:]  # hash of the n-gram at i, from the (n-1)-gram's
            if not len(hashes):
                break
            if not all_unique:
                order, starts, lengths = _runs(hashes)
                all_unique = len(starts) == len(hashes)
            if n in top:
                if all_unique:  # each n-gram occurs once: the first one counts as the most frequent
                    first, best = 0, 1
                else:
                    best = int(lengths.max())
                    first = int(order[starts[lengths == best]].min())
                if (cum_list[first + n] - cum_list[first] + n - 1) * best / n_chars > top[n]:
                    return f"top_{n}_gram"
            if n in dup and not all_unique:
                repeated = np.sort(order[np.repeat(lengths > 1, lengths)])
                if _duplicated_ngram_chars(repeated.tolist(), hashes, cum_list, n) / n_chars > dup[n]:
                    return f"duplicated_{n}_grams"
        return doc


def _runs(hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups equal hashes: (stable sort order, start of each group in it, group sizes). With a
    stable sort, order[start] is the first position of that n-gram in the document."""
    order = np.argsort(hashes, kind="stable")
    s = hashes[order]
    starts = np.flatnonzero(np.concatenate(([True], s[1:] != s[:-1])))
    lengths = np.diff(np.append(starts, len(s)))
    return order, starts, lengths


def _duplicated_ngram_chars(repeated: list[int], hashes: np.ndarray, cum: list[int], n: int) -> int:
    """Characters in n-grams that repeat an earlier n-gram, scanning left to right and jumping
    past each repeat (so overlapping repeats are not counted twice). Only the positions whose
    n-gram occurs more than once (`repeated`, ascending) can change the result."""
    seen: set[int] = set()
    chars = 0
    next_pos = 0
    for pos, h in zip(repeated, hashes[repeated].tolist()):
        if pos < next_pos:  # inside a repeat just counted: skipped, not remembered
            continue
        if h in seen:
            chars += cum[pos + n] - cum[pos]
            next_pos = pos + n
        else:
            seen.add(h)
    return chars
