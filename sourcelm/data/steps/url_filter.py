"""URL filter: drops documents whose domain (or a parent domain) or exact URL is block-listed,
or whose URL holds a banned word. Lists are plain text files, one entry a line, `#` comments."""

from __future__ import annotations

import re
from importlib import resources
from urllib.parse import urlsplit

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step

_URL_WORDS = re.compile(r"[^a-z0-9]+")


def read_list(path) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {s for line in f if (s := line.strip()) and not s.startswith("#")}


def default_domains() -> set[str]:
    with resources.as_file(resources.files("sourcelm.data.steps") / "blocklists" / "default_domains.txt") as p:
        return read_list(p)


class URLFilter(Step):
    name = "url_filter"

    def __init__(self, domain_files: list[str] = (), url_files: list[str] = (),
                 banned_words_files: list[str] = (), use_default: bool = True,
                 domains: list[str] = (), urls: list[str] = ()):
        super().__init__()
        self.domains = {d.lower().lstrip(".") for d in domains}
        self.urls = set(urls)
        self.words: set[str] = set()
        if use_default:
            self.domains |= default_domains()
        for p in domain_files:
            self.domains |= {d.lower().lstrip(".") for d in read_list(p)}
        for p in url_files:
            self.urls |= read_list(p)
        for p in banned_words_files:
            self.words |= {w.lower() for w in read_list(p)}

    def process(self, doc: Document) -> Document | str:
        url = doc.url
        if not url:
            self.counters["no_url"] += 1
            return doc
        if url in self.urls:
            return "blocked_url"
        try:
            host = (urlsplit(url).hostname or "").rstrip(".")
        except ValueError:
            return "malformed_url"
        parts = host.split(".")
        for i in range(len(parts)):  # the host, then each parent domain
            if ".".join(parts[i:]) in self.domains:
                return "blocked_domain"
        if self.words and not self.words.isdisjoint(_URL_WORDS.split(url.lower())):
            return "banned_word_in_url"
        return doc
