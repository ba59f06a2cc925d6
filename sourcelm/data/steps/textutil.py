"""Word splitting and the small text statistics several filters share.

Gopher's rules (Rae et al. 2021, Appendix A) count "words" but do not say how text is split into
them. sourcelm splits text as spaCy's English tokenizer does, the splitter datatrove's Gopher
filters (and so FineWeb's published numbers) use, because on code-heavy pages the split decides
the alphabetic-word ratio: "/etc/apt" is ["/etc", "/", "apt"], "main():" is ["main", "(", "):"],
"--help" and "x=1" stay whole, "e.g." and "sources.list" stay whole, "don't" is ["do", "n't"].
The algorithm is spaCy's, written here without spaCy: the text splits on white space; each chunk
is looked up in a table of special cases (`english_rules.SPECIAL_CASES`), else prefixes and
suffixes are peeled off one at a time (stopping early when what is left is a special case); what
remains is kept whole when it looks like a URL or host name, else split at infixes (hyphens,
slashes, ... between letters); last, adjacent pieces of one chunk that together spell a special
case are joined ("):", ":)").

Each chunk's split is cached (text has few distinct chunks), so a text costs one str.split plus
one dictionary look-up per chunk; the token list of the last text seen is cached too, because
Gopher quality, Gopher repetition and FineWeb each need it for the same document in turn.
Filters that count "words" count the tokens that hold a letter or digit (non-symbol words).
"""

from __future__ import annotations

import re

from sourcelm.data.steps.english_rules import (
    INFIX_RE,
    PREFIX_RE,
    SPECIAL_CASES,
    SUFFIX_RE,
    URL_RE,
)

_CHUNK_CACHE_MAX = 200_000  # distinct chunks remembered (about 50 MB at most)
_chunk_cache: dict[str, tuple[str, ...]] = {}


def _affix_split(chunk: str, specials: dict[str, tuple[str, ...]]) -> list[str]:
    """One white-space-free chunk -> its pieces, by the affix, URL and infix rules (special cases
    from `specials` are honoured at every step)."""
    if chunk in specials:
        return list(specials[chunk])
    prefixes: list[str] = []
    suffixes: list[str] = []
    s = chunk
    last = -1
    while s and len(s) != last:
        if s in specials:
            break
        last = len(s)
        m = PREFIX_RE.search(s)
        pre = m.end() if m else 0
        if pre and s[pre:] in specials:
            prefixes.append(s[:pre])
            s = s[pre:]
            break
        m = SUFFIX_RE.search(s, pre)
        suf = len(s) - m.start() if m else 0
        if suf and s[:-suf] in specials:
            suffixes.append(s[-suf:])
            s = s[:-suf]
            break
        if pre and suf and pre + suf <= len(s):
            prefixes.append(s[:pre])
            suffixes.append(s[-suf:])
            s = s[pre:-suf]
        elif pre:
            prefixes.append(s[:pre])
            s = s[pre:]
        elif suf:
            suffixes.append(s[-suf:])
            s = s[:-suf]
    out = prefixes
    if s:
        if s in specials:
            out.extend(specials[s])
        elif URL_RE.match(s):
            out.append(s)
        else:
            start = 0
            for m in INFIX_RE.finditer(s):
                if m.start() == 0:  # an infix at the very start is not a split point
                    continue
                if m.start() != start:
                    out.append(s[start:m.start()])
                if m.end() != m.start():
                    out.append(m.group())
                start = m.end()
            if s[start:]:
                out.append(s[start:])
    out.extend(reversed(suffixes))
    return out


# special cases that the affix rules would split ("):" -> ")", ":"): their pieces, to join again
_JOIN: dict[str, list[tuple[tuple[str, ...], tuple[str, ...]]]] = {}
for _text, _split in SPECIAL_CASES.items():
    _pieces = tuple(_affix_split(_text, {}))
    if len(_pieces) > 1:
        _JOIN.setdefault(_pieces[0], []).append((_pieces, _split))
for _options in _JOIN.values():
    _options.sort(key=lambda o: -len(o[0]))  # the longest match first


def split_chunk(chunk: str) -> tuple[str, ...]:
    """The tokens of one white-space-free chunk of text."""
    toks = _affix_split(chunk, SPECIAL_CASES)
    if len(toks) > 1 and any(t in _JOIN for t in toks):
        joined: list[str] = []
        i = 0
        while i < len(toks):
            for pieces, split in _JOIN.get(toks[i], ()):
                if tuple(toks[i:i + len(pieces)]) == pieces:
                    joined.extend(split)
                    i += len(pieces)
                    break
            else:
                joined.append(toks[i])
                i += 1
        toks = joined
    return tuple(toks)


_cache_text: str | None = None
_cache_tokens: list[str] = []


def tokens(text: str) -> list[str]:
    """All tokens of `text`, symbols included, in order."""
    global _cache_text, _cache_tokens
    if text is not _cache_text:
        cache = _chunk_cache
        if len(cache) > _CHUNK_CACHE_MAX:
            cache.clear()
        out: list[str] = []
        for chunk in text.split():
            toks = cache.get(chunk)
            if toks is None:
                toks = cache[chunk] = split_chunk(chunk)
            out += toks
        _cache_tokens = out
        _cache_text = text
    return _cache_tokens


# statistics over a token list run as one regex over the tokens joined by newlines (tokens never
# hold a newline), which keeps the per-token work in C
_NO_LETTER_LINE_RE = re.compile(r"^(?:[^\w\n]|[\d_])+$", re.MULTILINE)
_SYMBOL_LINE_RE = re.compile(r"^[^\w\n]+$", re.MULTILINE)
_WORDY_LINE_RE = re.compile(r"^[^\n]*\w[^\n]*$", re.MULTILINE)


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
