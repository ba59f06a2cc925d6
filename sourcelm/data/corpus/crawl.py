"""Making genuine WARC files offline: serve HTML on loopback, crawl it with `wget --warc-file`.

The server is Python's `http.server` on 127.0.0.1 and a free port, in a thread, so nothing is
reachable from outside the machine. wget writes WARC/1.0 request and response records (real HTTP
headers, `Content-Type: text/html` for the pages) exactly as a crawler would, so the curation
pipeline reads the same kind of file as it would from Common Crawl. The port changes between
fetches; the URL *paths* (`/python/library/os.html`, `/debian-handbook/de-DE/apt.html`) do not.
"""

from __future__ import annotations

import functools
import http.server
import subprocess
import tempfile
import threading
from pathlib import Path

from sourcelm.data.corpus.sources import FetchError, need_tool

# assets the text pipeline never uses: not crawled, so the WARCs hold pages only
_REJECT = "png,jpg,jpeg,gif,svg,ico,css,js,woff,woff2,ttf,eot,txt,zip,bz2,gz,pdf,epub,json,inv"
_TIMEOUT_S = 900


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # the base class prints every request to stderr
        pass


class LoopbackServer:
    """`with LoopbackServer(folder) as base_url:` serves folder at http://127.0.0.1:<free port>."""

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def crawl_to_warc(warc_gz: Path, urls: list[str], recursive: bool = False, level: int = 5) -> int:
    """Crawls `urls` (following links below them when `recursive`) into `warc_gz`
    (a `.warc.gz` path); returns the number of HTTP 200 responses recorded."""
    wget = need_tool("wget", "install GNU wget (it writes the WARC files)")
    if not warc_gz.name.endswith(".warc.gz"):
        raise ValueError(f"{warc_gz}: the WARC path must end in .warc.gz")
    stem = str(warc_gz)[: -len(".warc.gz")]  # wget appends .warc.gz itself
    warc_gz.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        url_file = Path(scratch) / "urls.txt"
        url_file.write_text("\n".join(urls) + "\n")
        cmd = [wget, "--quiet", "-e", "robots=off", "--no-warc-keep-log", f"--warc-file={stem}",
               "--delete-after", "--directory-prefix", str(Path(scratch) / "pages"),
               "--input-file", str(url_file)]
        if recursive:
            cmd += ["--recursive", "--level", str(level), "--no-parent", "--reject", _REJECT]
        try:
            out = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            raise FetchError(f"wget did not finish crawling in {_TIMEOUT_S} s") from e
    # exit 8 means some link answered with an HTTP error (a broken link in the docs): the WARC is fine
    if out.returncode not in (0, 8) or not warc_gz.exists():
        raise FetchError(f"wget failed (exit {out.returncode}) writing {warc_gz}: {out.stderr.strip()[-2000:]}")
    return count_responses(warc_gz)


def count_responses(warc_gz: Path) -> int:
    from warcio.archiveiterator import ArchiveIterator

    n = 0
    with open(warc_gz, "rb") as f:
        for record in ArchiveIterator(f):
            if record.rec_type == "response" and record.http_headers.get_statuscode() == "200":
                n += 1
    return n
