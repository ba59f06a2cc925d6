"""Word splitting and the small text statistics several filters share.

Words are split with one compiled regex that follows the shape of rule-based English
tokenizers (spaCy's, which datatrove uses): a URL stays one token, punctuation becomes its own
token, an ellipsis is one token, digits keep their inner separators ("3.14", "1,000"). So
"well-known, isn't it..." gives ["well", "-", "known", ",", "isn't", "it", "..."].
Filters that count "words" count the tokens that hold a letter or digit (non-symbol words).

The token list of the last text seen is cached, because Gopher quality, Gopher repetition
and FineWeb each need it for the same document, one after the other.
"""

from __future__ import annotations

import re



_TOKEN_RE = re.compile(
    r"https?://[^\s<>\"]*[^\s<>\".,;:!?)\]'’]"  # URL, trailing punctuation left out
    r"|\w+(?:[.,:'’]\w+)*"  # word or number with inner separators
    r"|\.\.\.|[^\w\s]",  # ellipsis, or one punctuation character
)
# statistics over a token list run as one regex over the tokens joined by newlines (tokens never
# hold a newline), which keeps the per-token work in C
_NO_LETTER_LINE_RE = re.compile(r"^(?:[^\w\n]|[\d_])+$", re.MULTILINE)
_SYMBOL_LINE_RE = re.compile(r"^[^\w\n]+$", re.MULTILINE)
_WORDY_LINE_RE = re.compile(r"^[^\n]*\w[^\n]*$", re.MULTILINE)

_cache_text: str | None = None
_cache_tokens: list[str] = []


def tokens(text: str) -> list[str]:
    """All tokens of `text`, symbols included, in order."""
    global _cache_text, _cache_tokens
    if text is not _cache_text:
        _cache_tokens = _TOKEN_RE.findall(text)
        _cache_text = text
    return _cache_tokens


def count_symbol_tokens(toks: list[str]) -> int:
    """How many tokens are punctuation only (no letter, digit or underscore)."""
    if not toks:
        return 0
    return len(_SYMBOL_LINE_RE.findall("\n".join(toks)))


def count_tokens_without_letter(toks: list[str]) -> int:
    """How many tokens hold no alphabetic character (symbols and pure numbers)."""
    if not toks:
        return 0
    return len(_NO_LETTER_LINE_RE.findall("\n".join(toks)))


def non_symbol_words(toks: list[str]) -> list[str]:
    """The tokens that hold at least one letter, digit or underscore, in order."""
    if not toks:
        return []
    return _WORDY_LINE_RE.findall("\n".join(toks))
