"""The demo's SFT chat set (`sourcelm.data.corpus.chats`): rst sections matched to curated text, every unusable
section or record skipped and counted by reason, the same bytes from the same inputs; and on the real corpus, the
curated Python pages give conversations whose answers are the curated text itself."""

import json

import pytest
import zstandard

from sourcelm.artifacts import write_manifest
from sourcelm.data.corpus.chats import MAX_ANSWER, build_chats, rst_sections, rst_text, text_key

PROSE = "The interpreter reads a script and runs it, one statement after another, until the end of the file."
LONG = "A long paragraph. " * 40
RST = f"""\
.. _tut-using:

****************************
Using the Python Interpreter
****************************

Invoking the Interpreter
========================

.. index:: single: python

The interpreter is usually installed as :file:`/usr/local/bin/python3` on those machines where it is available.

Argument Passing
----------------

Short.

{PROSE}

Interactive Mode
----------------

When commands are read from a tty, the interpreter is said to be in *interactive mode*::

   >>> 1 + 1

Source Code Encoding
--------------------

{LONG}

Lost Section
------------

This paragraph was dropped by the filters, so the curated text does not have it at all.

Questions?
----------

Where does the interpreter live? It lives in ``/usr/local/bin`` on most Unix machines, or elsewhere.
"""
# the page as extraction writes it: Sphinx numbers and typography, no "Lost Section", one block a line
CURATED = f"""\
2. Using the Python Interpreter
2.1. Invoking the Interpreter
The interpreter is usually installed as /usr/local/bin/python3 on those machines where it is available.
2.1.1. Argument Passing
Short.
{PROSE}
2.1.2. Interactive Mode
When commands are read from a tty, the interpreter is said to be in interactive mode:
>>> 1 + 1
2.2. Source Code Encoding
{LONG}
2.4. Questions?
Where does the interpreter live? It lives in /usr/local/bin on most Unix machines, or elsewhere.
"""


def test_rst_sections_give_titles_and_prose_paragraphs():
    sections = rst_sections(RST)
    assert [t for t, _ in sections] == ["Using the Python Interpreter", "Invoking the Interpreter", "Argument Passing",
                                        "Interactive Mode", "Source Code Encoding", "Lost Section", "Questions?"]
    assert sections[0][1] == []  # the page title is followed by a subsection at once
    assert sections[1][1] == ["The interpreter is usually installed as /usr/local/bin/python3 on those machines "
                              "where it is available."]  # the index directive is not a paragraph
    assert sections[2][1] == ["Short.", PROSE]
    assert sections[3][1] == ["When commands are read from a tty, the interpreter is said to be in interactive mode::"]
    assert rst_text(":mod:`asyncore` --- Async ``socket`` handler") == "asyncore \u2014 Async socket handler"
    assert text_key("2.1. It\u2019s \u201cquoted\u201d") != text_key("It's \"quoted\"")  # section numbers stay
    assert text_key("It\u2019s \u201cquoted\u201d \u2014  Here") == text_key("it's \"quoted\" -- here")


def _corpus(tmp_path, records: list[bytes], pages: dict[str, str]):
    """A curated dir holding `records` (JSONL lines) and a corpus with the rst sources of `pages` {URL path: rst}."""
    curated, corpus = tmp_path / "curated", tmp_path / "raw"
    (curated / "documents").mkdir(parents=True)
    (curated / "documents" / "00000.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(records)))
    write_manifest(curated, "curate", ["documents/00000.jsonl.zst"])
    gold = corpus / "gold" / "python"
    gold.mkdir(parents=True)
    index = {}
    for i, (path, rst) in enumerate(sorted(pages.items())):
        index[path] = f"page{i}.rst.txt"
        (gold / index[path]).write_text(rst)
    (gold / "pages.json").write_text(json.dumps(index))
    write_manifest(corpus, "corpus", ["gold/python/pages.json"])
    return curated, corpus


def _record(url: str, text: str, doc_id: str) -> bytes:
    return (json.dumps({"id": doc_id, "text": text, "source": "warc/python-docs.warc.gz", "url": url}) + "\n").encode()


def test_sections_become_conversations_and_the_rest_is_skipped_with_its_reason(tmp_path):
    base = "http://127.0.0.1:8000"
    records = [_record(f"{base}/python/tutorial/interpreter.html", CURATED, "doc-1"),
               _record(f"{base}/python/unknown.html", PROSE, "doc-2"),  # a Python page without an rst source
               _record(f"{base}/debian-handbook/en-US/index.html", PROSE, "doc-3"),  # not a Python page: ignored
               b"{not json\n", json.dumps({"id": "x", "text": "", "url": base}).encode() + b"\n"]
    curated, corpus = _corpus(tmp_path, records, {"/python/tutorial/interpreter.html": RST})
    report = build_chats(curated, corpus, tmp_path / "out")

    lines = (tmp_path / "out" / "chats.jsonl").read_text().splitlines()
    chats = [json.loads(line) for line in lines]
    assert [[m["role"] for m in c["messages"]] for c in chats] == [["user", "assistant"]] * 3
    assert [c["messages"][0]["content"] for c in chats] == [
        'What does the Python documentation say about "Invoking the Interpreter" (on the page "Using the Python '
        'Interpreter")?',
        'What does the Python documentation say about "Argument Passing" (on the page "Using the Python '
        'Interpreter")?',
        "Questions?"]
    # the answers are the curated lines (the text the model was pretrained on), the first usable one per section
    assert [c["messages"][1]["content"] for c in chats] == [
        CURATED.splitlines()[2], PROSE, CURATED.splitlines()[-1]]
    assert chats[0]["source"] == {"document": "doc-1", "page": "/python/tutorial/interpreter.html",
                                  "heading": chats[0]["messages"][0]["content"]}
    assert report["conversations"] == 3 and report["pages"] == 2
    assert report["skipped"] == {
        "a section without a paragraph": 1,  # the page title
        "no paragraph in the curated text": 1,  # Lost Section
        "no usable paragraph (the first found does not end a sentence)": 1,  # Interactive Mode's "...mode:"
        "no usable paragraph (the first found is too long)": 1,  # Source Code Encoding, > MAX_ANSWER characters
        "page without an rst source": 1,
        "curated record: invalid_json": 1, "curated record: empty_text": 1}
    assert len(LONG) > MAX_ANSWER
    assert report["skipped_examples"]["no paragraph in the curated text"] == [
        "/python/tutorial/interpreter.html: Lost Section"]
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == report
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["stage"] == "chats" and len(manifest["inputs"]) == 2  # the curated and the corpus manifests

    again = build_chats(curated, corpus, tmp_path / "again")
    assert again == report and (tmp_path / "again" / "chats.jsonl").read_bytes() == "\n".join(lines).encode() + b"\n"


def test_no_usable_section_is_an_error_that_says_why(tmp_path):
    curated, corpus = _corpus(tmp_path, [_record("http://h/python/a.html", "Title\nShort.", "d")],
                              {"/python/a.html": "Title\n=====\n\nShort.\n"})
    with pytest.raises(ValueError, match="no Python doc section gave a conversation.*too short"):
        build_chats(curated, corpus, tmp_path / "out")


@pytest.fixture(scope="module")
def curated_python_docs(demo_corpus, tmp_path_factory):
    """The demo corpus (fetched once into the test cache) and its Python docs curated by the demo pipeline."""
    from sourcelm.cli import main

    root = demo_corpus
    out = tmp_path_factory.mktemp("curated")
    assert main(["curate", "demo", "--output", str(out), "--workers", "1", "--input",
                 str(root / "warc" / "python-docs.warc.gz")]) == 0
    return out, root


@pytest.mark.slow
def test_on_the_demo_corpus_the_curated_python_pages_give_a_deterministic_chat_set(curated_python_docs, tmp_path):
    from sourcelm.data.formats.writers import read_jsonl_zst

    curated, corpus = curated_python_docs
    report = build_chats(curated, corpus, tmp_path / "a")
    build_chats(curated, corpus, tmp_path / "b")
    assert (tmp_path / "a" / "chats.jsonl").read_bytes() == (tmp_path / "b" / "chats.jsonl").read_bytes()
    assert report["conversations"] >= 40 and report["pages"] >= 10
    assert sum(report["skipped"].values()) > 0  # real pages have sections without a usable paragraph
    pages = {r["url"].split("/", 3)[3]: r["text"] for p in sorted((curated / "documents").glob("*.jsonl.zst"))
             for r in read_jsonl_zst(p)}
    chats = [json.loads(line) for line in (tmp_path / "a" / "chats.jsonl").read_text().splitlines()]
    for c in chats:
        question, answer = (m["content"] for m in c["messages"])
        assert answer in pages[c["source"]["page"].lstrip("/")].splitlines()  # the curated text, as it is
        assert question.endswith("?") and 80 <= len(answer) <= MAX_ANSWER
    # the demo's evaluation pages (FAQ, HOWTO) are removed by decontamination, and so are absent here
    assert not any(c["source"]["page"].startswith("/python/faq/") for c in chats)
