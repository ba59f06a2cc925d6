"""PII: e-mail addresses and IP addresses are replaced by placeholders (the document is kept),
and each replacement is counted."""

from __future__ import annotations

import ipaddress
import re

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24}(?![\w-])")
# not part of a longer dotted number (a version such as 1.2.3.4.5); a sentence's full stop may follow
_IPV4 = re.compile(
    r"(?<!\w)(?<!\d\.)(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?!\w|\.\d)")
# IPv6 candidates (hex groups with colons); each is checked with `ipaddress` before replacing
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")


class PII(Step):
    name = "pii"

    def __init__(self, email_replacement: str = "<EMAIL>", ip_replacement: str = "<IP>",
                 emails: bool = True, ips: bool = True):
        super().__init__()
        self.email_replacement, self.ip_replacement = email_replacement, ip_replacement
        self.emails, self.ips = emails, ips

    def _ipv6(self, m: re.Match) -> str:
        s = m.group(0)
        if s.count(":") < 2 or not any(c.isalnum() for c in s):
            return s
        try:
            ipaddress.IPv6Address(s)
        except ValueError:
            return s
        self.counters["ips_replaced"] += 1
        return self.ip_replacement

    def process(self, doc: Document) -> Document:
        text = doc.text
        if self.emails and "@" in text:
            text, n = _EMAIL.subn(self.email_replacement, text)
            self.counters["emails_replaced"] += n
        if self.ips:
            if "." in text:
                text, n = _IPV4.subn(self.ip_replacement, text)
                self.counters["ips_replaced"] += n
            if "::" in text or text.count(":") >= 7:
                text = _IPV6.sub(self._ipv6, text)
        if text is not doc.text:
            doc.text = text
        return doc
