"""HTML → plain text. resiliparse by default (a C++ parser, about 20× faster than trafilatura on
these pages), trafilatura as an option.

Readers mark HTML documents with `metadata["html"] = True`; this step extracts their text and
clears the mark, and passes other documents through untouched. A page that fails, takes longer
than `timeout` seconds, or is larger than `max_html_bytes` is dropped with its reason, and
exceptions are counted by type.

The time limit is a SIGALRM timer, so it works where the step runs in a process's main thread
(both executors run tasks there) and interrupts Python code (trafilatura); a single call into
resiliparse's C++ cannot be interrupted, but the time it took is still checked afterwards.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step


class ExtractionTimeout(Exception):
    pass


def _on_alarm(signum, frame):
    raise ExtractionTimeout()


@contextmanager
def time_limit(seconds: float):
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def resiliparse_extractor(main_content: bool = True, links: bool = False, alt_texts: bool = False,
                          list_bullets: bool = True):
    from resiliparse.extract.html2text import extract_plain_text

    def extract(html: str) -> str:
        return extract_plain_text(html, preserve_formatting=True, main_content=main_content,
                                  links=links, alt_texts=alt_texts, list_bullets=list_bullets)

    return extract


def trafilatura_extractor(include_comments: bool = False, include_tables: bool = True,
                          favor_precision: bool = False):
    import trafilatura

    def extract(html: str) -> str:
        return trafilatura.extract(html, include_comments=include_comments, include_tables=include_tables,
                                   favor_precision=favor_precision, deduplicate=False) or ""

    return extract


EXTRACTORS = {"resiliparse": resiliparse_extractor, "trafilatura": trafilatura_extractor}


class Extract(Step):
    name = "extract"

    def __init__(self, extractor: str = "resiliparse", timeout: float = 1.0,
                 max_html_bytes: int = 10_000_000, min_chars: int = 1, options: dict | None = None):
        super().__init__()
        if extractor not in EXTRACTORS:
            raise ValueError(f"extractor={extractor!r}: choose one of {sorted(EXTRACTORS)}")
        self.extractor_name = extractor
        self.options = dict(options or {})
        self.timeout = timeout
        self.max_html_bytes = max_html_bytes
        self.min_chars = min_chars
        self._extract = None

    def process(self, doc: Document) -> Document | str:
        if not doc.metadata.pop("html", False):
            return doc
        if self._extract is None:  # built in the worker, not pickled with the step
            self._extract = EXTRACTORS[self.extractor_name](**self.options)
        if len(doc.text) > self.max_html_bytes:
            return "html_too_large"
        start = time.perf_counter()
        try:
            with time_limit(self.timeout):
                text = self._extract(doc.text)
        except ExtractionTimeout:
            return "timeout"
        except Exception as e:  # a broken page must not stop the run: counted by type, dropped
            self.counters[f"error_{type(e).__name__}"] += 1
            return "extraction_error"
        if self.timeout and time.perf_counter() - start > self.timeout:
            return "timeout"
        text = text.strip()
        if len(text) < self.min_chars:
            return "no_text"
        doc.text = text
        return doc
