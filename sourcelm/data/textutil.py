"""Word splitting and the small text statistics several filters share.

Words are split with one compiled regex that follows the shape of rule-based English
tokenizers (spaCy's, which datatrove uses): text splits on white space, punctuation at either
end of a chunk becomes its own token, punctuation inside stays ("3.14", "self.run(x", "U.S"),
hyphens between words split, an ellipsis is one token, a URL stays whole. So
"well-known, isn't it..." gives ["well", "-", "known", ",", "is", "n't", "it", "..."].
Filters that count "words" count the tokens that hold a letter or digit (non-symbol words).

The token list of the last text seen is cached, because Gopher quality, Gopher repetition
and FineWeb each need it for the same document, one after the other.
"""

from __future__ import annotations

import re



_CONTRACTION = r"(?i:n['’]t|['’](?:s|re|ve|ll|d|m))(?!\w)"
_TOKEN_RE = re.compile(
    r"https?://[^\s<>\"]*[^\s<>\".,;:!?)\]'’]"  # URL, trailing punctuation left out
    r"|" + _CONTRACTION +  # a contraction's second half: do|n't, it|'s
    r"|[^\W_](?:(?:(?!" + _CONTRACTION + r")[^\s\-–—])*(?!" + _CONTRACTION + r")[^\W_])?"  # from a letter
    # or digit to one: inner punctuation stays (a.b(c, 3.14, U.S), up to a contraction
    r"|\.\.\.|[^\w\s]|_",  # ellipsis, or one punctuation character (a leading or trailing one)
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
