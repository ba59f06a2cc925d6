"""A small chat set for SFT from the demo corpus: Python-docs sections as question / answer pairs.

    python -m sourcelm.data.corpus.chats --curated RUN/curated --corpus RUN/raw --output RUN/sft_chats

Each section of a Python doc page becomes one conversation: its heading as the user's question ("What does the
Python documentation say about "HEADING"?", or the heading itself when it is a question; the page title beside
the heading of a subsection), its first paragraph as the assistant's answer.

Why the curated documents and not the raw pages: they are what the demo pretrained on, after its filters, dedup,
PII masking and decontamination. The demo's evaluation tasks are built from Python FAQ and HOWTO pages, and the
decontamination step removes the pages that share text with them; chats from the raw pages would bring that text
back through SFT.

How a section is found: extraction writes a page as one block per line and drops some headings, so the curated
text alone does not say where sections start. The page's reStructuredText source (the corpus' gold/python/, keyed
by URL path in pages.json) does: its section titles and each section's paragraphs. A paragraph's curated copy is
the curated line that begins like it (its first MATCH_CHARS characters with inline markup, typography and case set
aside). The answer is the curated copy (the text the demo trained on) of the section's first paragraph that is
prose of MIN_ANSWER..MAX_ANSWER characters ending a sentence; the question is made from the rst title.

Skipped and counted by reason in report.json (with examples): curated records that cannot be read, Python pages
without an rst source, sections without a paragraph (a title followed by a subsection), sections none of whose
paragraphs is in the curated text (extraction or filters removed them), and sections whose paragraphs found are
all too short, too long or do not end a sentence (e.g. the colon before a code block).

Output: chats.jsonl, one `{"messages": [...], "source": {"document", "page", "heading"}}` a line, pages in URL
order and sections in page order, so the same inputs give the same bytes; report.json; manifest.json, whose
inputs are the curated documents' and the corpus' manifests. The held-out split is `sourcelm sft
--valid-fraction`'s: by a hash of each line, so it depends on nothing else.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from sourcelm.artifacts import MANIFEST_NAME, atomic_write_bytes, write_manifest

MIN_ANSWER, MAX_ANSWER = 80, 600  # characters: a real paragraph, short enough for a small model's row
MATCH_CHARS = 60  # a curated line is an rst paragraph's when it begins with the paragraph's first characters
EXAMPLES_PER_REASON = 5  # skipped items kept per reason in the report

_ADORNMENT = re.compile(r"^([!-/:-@\[-`{-~])\1+\s*$")  # a line of one repeated punctuation character
_NOT_PROSE = re.compile(r"^(\.\.|[-*+] |#\. |\d+\. |:[^`:]+:(\s|$)|>>>)")  # directive, list, field, doctest
_ROLE = re.compile(r":[\w:.+-]+:`[~!]?([^`<]*?)\s*(?:<[^`>]*>)?`")  # :ref:`text <target>`, :mod:`~a.b` -> the text
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]*>`_{1,2}")  # `text <url>`_ -> text
_EMPHASIS = re.compile(r"(\*\*|\*|``)(\S(?:.*?\S)?)\1")  # **bold**, *emphasis*, ``literal`` -> the text
_SECTION_NUMBER = re.compile(r"^\d+(\.\d+)*\.\s+")  # Sphinx numbers the sections of numbered pages
_TYPOGRAPHY = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                             "\u2014": "-", "\u2026": "..."})
_SENTENCE_END = re.compile(r"[.!?][\"')\u2019\u201d]*$")


def rst_text(rst: str) -> str:
    """The text Sphinx renders from a line of reStructuredText, as far as matching needs (roles, links, inline
    markup and escapes removed)."""
    text = _EMPHASIS.sub(r"\2", _LINK.sub(r"\1", _ROLE.sub(r"\1", rst)))
    text = text.replace("---", "\u2014").replace("--", "\u2013")  # Sphinx's smart dashes
    return re.sub(r"\\(.)", r"\1", text)


def text_key(text: str) -> str:
    """The form in which a rendered line and its curated copy are equal: typography (curly quotes, dashes) and
    whitespace set aside, case folded."""
    text = re.sub(r"-{2,}", "-", text.translate(_TYPOGRAPHY))
    return re.sub(r"\s+", " ", text).strip().casefold()


def rst_sections(rst: str) -> list[tuple[str, list[str]]]:
    """(title, its paragraphs' rendered text) of each section of a reStructuredText page, in order. A title is
    underlined (and maybe overlined) with one punctuation character at least as long as it; a paragraph is a block
    of unindented lines that is not a directive, a list, a field or a doctest."""
    lines = rst.splitlines() + ["", ""]  # blank lines close the last block
    sections: list[tuple[str, list[str]]] = []
    block: list[str] = []
    for line, after in zip(lines, lines[1:]):
        text = line.strip()
        if text and not _ADORNMENT.match(text) and _ADORNMENT.match(after) and len(after.strip()) >= len(text):
            sections.append((rst_text(text), []))
            block = []
        elif not text or _ADORNMENT.match(text):
            if block and sections and not _NOT_PROSE.match(block[0]) and not block[0][0].isspace():
                sections[-1][1].append(rst_text(" ".join(b.strip() for b in block)))
            block = []
        else:
            block.append(line)
    return sections


def answer_problem(line: str) -> str | None:
    """Why a curated paragraph is not a usable answer, or None when it is prose of a fitting length."""
    if len(line) < MIN_ANSWER:
        return "is too short"
    if len(line) > MAX_ANSWER:
        return "is too long"
    if not _SENTENCE_END.search(line):
        return "does not end a sentence"
    return None


def question(heading: str, page_title: str) -> str:
    if heading.endswith("?"):
        return heading
    where = "" if heading == page_title else f' (on the page "{page_title}")'
    return f'What does the Python documentation say about "{heading}"{where}?'


def page_chats(text: str, rst: str, skipped: Counter, examples: dict, where: str) -> list[tuple[str, str]]:
    """(question, answer) of each section of one page: the answer is the curated copy of the section's first
    paragraph that is usable (`answer_problem`); sections without one are counted in `skipped`."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    keys = [text_key(line) for line in lines]
    sections = rst_sections(rst)
    out = []
    for heading, paragraphs in sections:
        curated = []  # the curated copies of the section's paragraphs that are found, in order
        for p in paragraphs:
            start = text_key(p)[:MATCH_CHARS]
            curated += [lines[i] for i, k in enumerate(keys) if k.startswith(start)][:1]
        problems = [answer_problem(c) for c in curated]
        if None in problems:
            out.append((question(heading, sections[0][0]), curated[problems.index(None)]))
        else:
            reason = (f"no usable paragraph (the first found {problems[0]})" if problems
                      else "no paragraph in the curated text" if paragraphs else "a section without a paragraph")
            _skip(skipped, examples, reason, f"{where}: {heading}")
    return out


def _skip(skipped: Counter, examples: dict, reason: str, what: str) -> None:
    skipped[reason] += 1
    if len(examples.setdefault(reason, [])) < EXAMPLES_PER_REASON:
        examples[reason].append(what)


def curated_pages(curated: Path, prefix: str, skipped: Counter, examples: dict) -> dict[str, dict]:
    """{URL path: curated document} of the pages under `prefix`; unreadable records counted by their reason."""
    from sourcelm.data.formats.readers import Rejected, read_jsonl

    pages = {}
    for shard in sorted((curated / "documents").glob("*.jsonl.zst")):
        for doc in read_jsonl(shard, shard.name, "text", "url", max_line_bytes=64 << 20):
            if isinstance(doc, Rejected):
                _skip(skipped, examples, f"curated record: {doc.reason}", f"{shard.name}: {doc.id}")
                continue
            path = urlsplit(doc.url or "").path
            if path.startswith(prefix + "/"):
                pages[path] = {"id": doc.metadata.get("input_id", doc.id), "text": doc.text}
    return pages


def build_chats(curated: str | Path, corpus: str | Path, out: str | Path, prefix: str = "/python") -> dict:
    """Writes OUT/chats.jsonl, report.json and manifest.json (module doc); returns the report."""
    curated, corpus, out = Path(curated), Path(corpus), Path(out)
    gold = corpus / "gold" / "python"
    index = json.loads((gold / "pages.json").read_text())
    skipped: Counter = Counter()
    examples: dict[str, list[str]] = {}
    pages = curated_pages(curated, prefix, skipped, examples)
    lines = []
    for path, doc in sorted(pages.items()):
        if path not in index:
            _skip(skipped, examples, "page without an rst source", path)
            continue
        rst = (gold / index[path]).read_text(encoding="utf-8")
        for q, a in page_chats(doc["text"], rst, skipped, examples, path):
            record = {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                      "source": {"document": doc["id"], "page": path, "heading": q}}
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    if not lines:
        raise ValueError(f"{curated}: no Python doc section gave a conversation ({dict(skipped) or 'no pages'})")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "chats.jsonl", "".join(lines).encode())
    report = {"pages": len(pages), "conversations": len(lines), "skipped": dict(sorted(skipped.items())),
              "skipped_examples": dict(sorted(examples.items()))}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode())
    write_manifest(out, "chats", ["chats.jsonl", "report.json"],
                   inputs=[curated / MANIFEST_NAME, corpus / MANIFEST_NAME],
                   config={"prefix": prefix, "min_answer": MIN_ANSWER, "max_answer": MAX_ANSWER})
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sourcelm.data.corpus.chats", description=__doc__.splitlines()[0])
    p.add_argument("--curated", required=True, help="a `sourcelm curate` output holding the corpus' Python pages")
    p.add_argument("--corpus", required=True, help="the `sourcelm corpus fetch` folder (its gold/python/ is read)")
    p.add_argument("--output", required=True, help="where chats.jsonl, report.json and manifest.json go")
    args = p.parse_args(argv)
    report = build_chats(args.curated, args.corpus, args.output)
    print(f"{report['conversations']} conversations from {report['pages']} Python pages -> "
          f"{Path(args.output) / 'chats.jsonl'}; skipped: {report['skipped'] or 'none'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
