"""C4's line and page rules (Raffel et al. 2020; the TFDS `c4_utils.py` code) and FineWeb's
extra rules (Penedo et al. 2024).

C4 keeps a page's good lines and drops the page when too few sentences remain. Its defaults
are the TFDS values (a line needs 5 words, a page 3 sentences); datatrove swaps the two numbers
(3 words, 5 sentences) and also accepts "'" as an end mark: that is the named preset
`preset = "datatrove"`. Explicit keys override the preset.
"""

from __future__ import annotations

import os

import regex

from sourcelm.config import ConfigError
from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step
from sourcelm.data.steps import textutil
from sourcelm.data.steps.gopher import duplicates

_CITATION = regex.compile(r"\[\d*\]|\[edit\]|\[citation needed\]")
_POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# a sentence end: terminal punctuation (with closing quotes/brackets) before a space or the end
_SENTENCE_END = regex.compile(r"[.!?]+[\"'”’)\]]*(?=\s|$)")

C4_PRESETS = {
    "tfds": {"min_words_per_line": 5, "min_sentences": 3, "end_marks": [".", "?", "!", '"']},
    "datatrove": {"min_words_per_line": 3, "min_sentences": 5, "end_marks": [".", "?", "!", '"', "'"]},
}


class C4Quality(Step):
    name = "c4"

    def __init__(self, preset: str = "tfds", min_words_per_line: int | None = None,
                 min_sentences: int | None = None, end_marks: list[str] | None = None,
                 max_word_length: int = 1000, remove_citations: bool = True,
                 filter_javascript: bool = True, filter_policy: bool = True,
                 filter_lorem_ipsum: bool = True, filter_curly_bracket: bool = True,
                 max_page_chars: int | None = None, badwords_file: str | None = None,
                 filter_no_terminal_punct: bool = True):
        super().__init__()
        if preset not in C4_PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {sorted(C4_PRESETS)}")
        p = C4_PRESETS[preset]
        self.min_words = p["min_words_per_line"] if min_words_per_line is None else min_words_per_line
        self.min_sentences = p["min_sentences"] if min_sentences is None else min_sentences
        self.end_marks = tuple(p["end_marks"] if end_marks is None else end_marks)
        self.max_word_length = max_word_length
        self.remove_citations, self.filter_javascript = remove_citations, filter_javascript
        self.filter_policy, self.filter_lorem = filter_policy, filter_lorem_ipsum
        self.filter_curly = filter_curly_bracket
        self.max_page_chars = max_page_chars
        # FineWeb runs C4 with this off: lines without an end mark are kept
        self.filter_no_end_mark = filter_no_terminal_punct
        self.badwords = None
        if badwords_file:  # LDNOOBW-style list, one word or phrase a line
            if not os.path.isfile(badwords_file):
                raise ConfigError(f"c4.badwords_file = {badwords_file!r}: no such file; give the path of a "
                                  f"word list (one word or phrase a line) or leave it out")
            with open(badwords_file, encoding="utf-8") as f:
                words = sorted({w.strip().lower() for w in f if w.strip()}, key=len, reverse=True)
            if words:
                self.badwords = regex.compile(r"(?<!\w)(?:" + "|".join(map(regex.escape, words)) + r")(?!\w)")

    def process(self, doc: Document) -> Document | str:
        if self.max_page_chars is not None and len(doc.text) > self.max_page_chars:
            return "page_too_long"
        kept = []
        n_sentences = 0
        counters = self.counters
        for line in doc.text.splitlines():
            line = line.strip()
            words = line.split()
            if self.max_word_length and any(len(w) > self.max_word_length for w in words):
                counters["lines_too_long_word"] += 1
                continue
            if self.remove_citations:
                line = _CITATION.sub("", line)
            if self.filter_no_end_mark and (not line.endswith(self.end_marks) or line.endswith("...")):
                counters["lines_no_end_mark"] += 1
                continue
            if len(words) < self.min_words:
                counters["lines_too_few_words"] += 1
                continue
            lower = line.lower()
            if self.filter_lorem and "lorem ipsum" in lower:
                return "lorem_ipsum"
            if self.filter_javascript and "javascript" in lower:
                counters["lines_javascript"] += 1
                continue
            if self.filter_curly and "{" in line:
                return "curly_bracket"
            if self.filter_policy and any(p in lower for p in _POLICY):
                counters["lines_policy"] += 1
                continue
            n_sentences += max(1, len(_SENTENCE_END.findall(line)))
            kept.append(line)
        if n_sentences < self.min_sentences:
            return "too_few_sentences"
        text = "\n".join(kept).strip()
        if self.badwords is not None and self.badwords.search(text.lower()):
            return "bad_words"
        doc.text = text
        return doc


_STERM_AT_END = regex.compile(r"\p{Sentence_Terminal}$")

FINEWEB_PRESETS = {"fineweb_code": {"char_duplicates_ratio": 0.01}, "fineweb_blog": {"char_duplicates_ratio": 0.1}}


class FineWebQuality(Step):
    """Drops lists and boilerplate-like pages: few lines ending in terminal punctuation, mostly
    short lines, characters in duplicated lines, many newlines per word. The released code's
    duplicated-line threshold (0.01) is the default; the blog's (0.1) is `preset = "fineweb_blog"`."""

    name = "fineweb"

    def __init__(self, preset: str = "fineweb_code", line_punct_thr: float = 0.12,
                 short_line_thr: float = 0.67, short_line_length: int = 30,
                 char_duplicates_ratio: float | None = None, new_line_ratio: float = 0.3):
        super().__init__()
        if preset not in FINEWEB_PRESETS:
            raise ValueError(f"preset={preset!r}: choose one of {sorted(FINEWEB_PRESETS)}")
        self.line_punct_thr = line_punct_thr
        self.short_line_thr, self.short_line_length = short_line_thr, short_line_length
        self.char_dup = (FINEWEB_PRESETS[preset]["char_duplicates_ratio"] if char_duplicates_ratio is None
                         else char_duplicates_ratio)
        self.new_line_ratio = new_line_ratio

    def process(self, doc: Document) -> Document | str:
        text = doc.text
        lines = [line for line in text.split("\n") if line.strip()]
        if not lines:
            return "empty"
        n = len(lines)
        if sum(1 for line in lines if _STERM_AT_END.search(line)) / n < self.line_punct_thr:
            return "line_punct_ratio"
        if sum(1 for line in lines if len(line) <= self.short_line_length) / n > self.short_line_thr:
            return "short_line_ratio"
        if duplicates(lines)[1] / max(1, len(text) - text.count("\n")) > self.char_dup:
            return "char_dup_ratio"
        toks = textutil.tokens(text)
        if not toks or text.count("\n") / len(toks) > self.new_line_ratio:
            return "list_ratio"
        return doc
