"""Readers on real and broken files built here: every bad record is skipped with its reason,
the good ones around it are kept, ids are stable."""

import collections
import gzip
import json

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard

from sourcelm.data.formats.readers import Rejected, detect_format, read_file
from tests.data.warc_fixtures import ENGLISH, page, write_warc


def read(path, fmt=None, **kw):
    counters = collections.Counter()
    items = list(read_file(path, path.name, fmt or detect_format(path), counters, **kw))
    docs = [i for i in items if not isinstance(i, Rejected)]
    rejected = [i.reason for i in items if isinstance(i, Rejected)]
    return docs, rejected, counters


def test_warc_keeps_html_and_xhtml_by_http_content_type(tmp_path):
    path = write_warc(tmp_path / "crawl.warc.gz", [
        ("http://a.test/1.html", "text/html; charset=utf-8", page("One", ENGLISH)),
        ("http://a.test/2.xhtml", "application/xhtml+xml", page("Two", ENGLISH, xhtml=True)),
        ("http://a.test/logo.png", "image/png", b"\x89PNG\r\n\x1a\n" + bytes(100)),
        ("http://a.test/missing", "text/html", b"<html>gone</html>", "404 Not Found"),
        ("http://a.test/notes.txt", "text/plain", b"plain words here"),
    ])
    docs, rejected, counters = read(path)
    assert [d.url for d in docs] == ["http://a.test/1.html", "http://a.test/2.xhtml", "http://a.test/notes.txt"]
    assert docs[0].metadata["html"] and docs[1].metadata["html"] and "html" not in docs[2].metadata
    assert docs[1].metadata["content_type"] == "application/xhtml+xml"
    assert "<p>The river rises" in docs[0].text
    assert counters == {"skipped_content_type": 1, "skipped_status": 1}
    assert rejected == []
    again, _, _ = read(path)
    assert [d.id for d in again] == [d.id for d in docs]  # stable ids
    assert len({d.id for d in docs}) == 3


def test_uncompressed_warc_and_non_utf8_charset(tmp_path):
    body = "<html><body><p>Café crème brûlée</p></body></html>".encode("latin-1")
    path = write_warc(tmp_path / "c.warc", [("http://b.test/", "text/html; charset=ISO-8859-1", body)], gzip=False)
    docs, rejected, _ = read(path)
    assert "Café crème brûlée" in docs[0].text and not rejected


def test_truncated_warc_gz_keeps_records_before_the_damage(tmp_path):
    pages = [(f"http://c.test/{i}", "text/html", page(f"P{i}", ENGLISH)) for i in range(20)]
    full = write_warc(tmp_path / "full.warc.gz", pages).read_bytes()
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(full[: int(len(full) * 0.6)])
    docs, rejected, _ = read(cut)
    assert 5 < len(docs) < 20
    assert rejected == ["truncated_record"]


def test_malformed_warc_record(tmp_path):
    good = write_warc(tmp_path / "g.warc", [("http://d.test/1", "text/html", page("A", ENGLISH))],
                      gzip=False).read_bytes()
    bad = tmp_path / "bad.warc"
    for tail in (b"this is not a warc record\r\n\r\nmore",  # no WARC/ line
                 b"WARC/1.0\r\nbroken header\r\nWARC-Type: response\r\nContent-Length: 19\r\n\r\n"
                 b"HTTP/1.1 200 OK\r\n\r\n\r\n\r\n"):  # a response with no target URI
        bad.write_bytes(good + tail)
        docs, rejected, _ = read(bad)
        assert len(docs) == 1 and rejected == ["malformed_warc_record"]
    junk = tmp_path / "junk.warc.gz"
    junk.write_bytes(bytes(range(256)) * 40)
    docs, rejected, _ = read(junk)
    assert docs == [] and len(rejected) == 1


def test_jsonl_bad_lines_are_skipped_with_reasons(tmp_path):
    lines = [
        json.dumps({"text": "first good", "url": "http://e.test/1", "lang": "en"}).encode(),
        b'{"text": "bad utf8 \xff\xfe here"}',
        b"not json at all",
        b"\x00\x01\x02\x03 binary junk \xc3\x28",
        json.dumps({"url": "http://e.test/2"}).encode(),  # missing text
        json.dumps({"text": ["a", "list"]}).encode(),  # mistyped text
        json.dumps({"text": "ok", "url": 7}).encode(),  # mistyped url
        json.dumps(["not", "an", "object"]).encode(),
        json.dumps({"text": "x" * 5000}).encode(),  # gigantic with max_line_bytes=1000
        b"",
        json.dumps({"text": "   "}).encode(),
        json.dumps({"id": 42, "text": "last good", "metadata": {"k": 1}}).encode(),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    docs, rejected, _ = read(path, max_line_bytes=1000)
    assert [d.text for d in docs] == ["first good", "last good"]
    assert docs[0].url == "http://e.test/1" and docs[0].metadata == {"lang": "en"}
    assert docs[1].metadata == {"k": 1, "input_id": "42"}
    assert rejected == ["invalid_utf8", "invalid_json", "invalid_utf8", "missing_text", "text_not_a_string",
                        "url_not_a_string", "not_an_object", "line_too_long", "empty_text"]


def test_compressed_jsonl_and_truncation(tmp_path):
    data = b"".join(json.dumps({"text": f"document {i} " * 20}).encode() + b"\n" for i in range(3000))
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    for name in ("a.jsonl.gz", "a.jsonl.zst"):
        docs, rejected, _ = read(tmp_path / name)
        assert len(docs) == 3000 and rejected == []
        whole = (tmp_path / name).read_bytes()
        cut = tmp_path / f"cut.{name}"
        cut.write_bytes(whole[: len(whole) // 2])
        docs, rejected, _ = read(cut)
        assert len(docs) < 3000 and rejected == ["truncated_or_corrupt_file"]
        assert all(d.text.startswith("document ") for d in docs)


def test_empty_files(tmp_path):
    for name in ("e.jsonl", "e.jsonl.gz", "e.warc.gz", "e.html", "e.txt", "e.parquet"):
        (tmp_path / name).write_bytes(b"")
        docs, rejected, _ = read(tmp_path / name)
        assert docs == [] and rejected == ["empty_file"], name


def test_parquet_reader_and_corrupt_parquet(tmp_path):
    table = pa.table({"text": ["alpha text", None, "gamma text"], "url": ["http://f.test/a", None, None],
                      "score": [1.0, 2.0, 3.0]})
    pq.write_table(table, tmp_path / "t.parquet")
    docs, rejected, _ = read(tmp_path / "t.parquet")
    assert [d.text for d in docs] == ["alpha text", "gamma text"] and rejected == ["missing_text"]
    assert docs[0].metadata == {"score": 1.0}
    (tmp_path / "bad.parquet").write_bytes(b"PAR1" + bytes(200) + b"PAR1")
    docs, rejected, _ = read(tmp_path / "bad.parquet")
    assert docs == [] and rejected == ["corrupt_parquet"]


def test_single_html_and_text_files(tmp_path):
    (tmp_path / "p.html").write_bytes(page("Hello", ENGLISH))
    (tmp_path / "n.txt").write_text("just some text\n")
    (tmp_path / "bin.txt").write_bytes(b"\x00\x01\x02ELF" * 10)
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    docs, rejected, _ = read(tmp_path / "p.html")
    assert docs[0].metadata == {"html": True} and "<h1>Hello</h1>" in docs[0].text
    docs, _, _ = read(tmp_path / "n.txt")
    assert docs[0].text == "just some text\n"
    assert read(tmp_path / "bin.txt")[1] == ["binary_file"]
    assert read(tmp_path / "latin.txt")[1] == ["invalid_utf8"]
