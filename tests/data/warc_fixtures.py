"""Builds small, genuine WARC files with warcio for the reader and pipeline tests."""

from __future__ import annotations

import io
from pathlib import Path

from warcio.statusandheaders import StatusAndHeaders
from warcio.warcwriter import WARCWriter


def write_warc(path: Path, pages: list[tuple[str, str, bytes] | tuple[str, str, bytes, str]],
               gzip: bool = True) -> Path:
    """pages: (url, content type, body[, status]) → one request and one response record each,
    plus a warcinfo record first, as crawlers write them."""
    with open(path, "wb") as f:
        w = WARCWriter(f, gzip=gzip)
        w.write_record(w.create_warcinfo_record(path.name, {"software": "sourcelm-tests"}))
        for page in pages:
            url, ctype, body = page[:3]
            status = page[3] if len(page) > 3 else "200 OK"
            req = w.create_warc_record(url, "request", payload=io.BytesIO(b""),
                                       http_headers=StatusAndHeaders(f"GET {url} HTTP/1.1", [("Host", "x")],
                                                                     is_http_request=True))
            w.write_record(req)
            headers = StatusAndHeaders(status, [("Content-Type", ctype), ("Content-Length", str(len(body)))],
                                       protocol="HTTP/1.1")
            w.write_record(w.create_warc_record(url, "response", payload=io.BytesIO(body), http_headers=headers))
    return path


def page(title: str, paragraphs: list[str], xhtml: bool = False) -> bytes:
    body = "".join(f"<p>{p}</p>\n" for p in paragraphs)
    head = ('<?xml version="1.0" encoding="UTF-8"?>\n<html xmlns="http://www.w3.org/1999/xhtml">' if xhtml
            else "<!DOCTYPE html>\n<html>")
    return (f"{head}<head><title>{title}</title></head><body><nav><a href='/'>Home</a> | <a href='/x'>About</a></nav>"
            f"<main><h1>{title}</h1>\n{body}</main><footer>Copyright</footer></body></html>").encode()


ENGLISH = [
    "The river rises in the hills to the north of the town and flows south through a wide valley, "
    "where farmers have grown wheat and barley for hundreds of years.",
    "In the spring the water is high and fast, and the old stone bridge near the market is sometimes "
    "closed to carts and cars until the flood has passed.",
    "Most of the people who live here work on the farms or in the small shops that line the main street, "
    "and many of them have never lived anywhere else.",
    "Visitors come in the summer to walk along the banks, to fish for trout, and to see the ruins of "
    "the abbey that was built on the hill above the river in the twelfth century.",
]
