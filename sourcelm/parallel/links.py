"""The link spec of shaped pretend nodes: `ib=RATE,nvlink=RATE[,delay=MS]`.

RATE is a number with a unit, as `tc` writes rates: bit (bits per second), kbit, mbit, gbit, or bps, kbps,
mbps, gbps for bytes per second (e.g. `ib=200mbit,nvlink=640mbit`). `ib` shapes each pretend node's link to
the others (both directions), `nvlink` the traffic between the ranks of one node, `delay` adds a one-way
latency in milliseconds to every inter-node crossing. The default ratio is the report's 160 : 50 GB/s = 3.2.

A spec that does not parse fails here, before any namespace or link exists.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass

FORMAT = "ib=RATE,nvlink=RATE[,delay=MS]"
REPORT_RATIO = 160 / 50  # NVLink : IB bandwidth per GPU in the report (§3.2.2)
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "bps": 8, "kbps": 8e3, "mbps": 8e6, "gbps": 8e9}
_RATE = re.compile(r"^(\d+(?:\.\d+)?)([a-z]+)$")


class LinkSpecError(ValueError):
    """A link spec that cannot be used; the message names the expected format."""


@dataclass(frozen=True)
class LinkSpec:
    ib_bits: float  # bits per second of each node's inter-node link, per direction
    nvlink_bits: float  # bits per second of the traffic inside one node
    delay_ms: float = 0.0  # one-way latency added to each inter-node crossing

    @property
    def ib_bytes(self) -> float:
        return self.ib_bits / 8

    @property
    def nvlink_bytes(self) -> float:
        return self.nvlink_bits / 8

    @property
    def ratio(self) -> float:
        return self.nvlink_bits / self.ib_bits

    def __str__(self) -> str:
        delay = f",delay={self.delay_ms:g}" if self.delay_ms else ""
        return f"ib={tc_rate(self.ib_bits)},nvlink={tc_rate(self.nvlink_bits)}{delay}"


def tc_rate(bits: float) -> str:
    """A rate in the form `tc` takes (whole kilobits per second)."""
    return f"{round(bits / 1e3)}kbit"


def _rate(key: str, text: str) -> float:
    m = _RATE.match(text.strip().lower())
    if not m or m.group(2) not in _UNITS:
        raise LinkSpecError(f"--links: {key}={text!r} is not a rate; write a number and one of "
                            f"{', '.join(_UNITS)} (e.g. {key}=200mbit). Format: {FORMAT}")
    bits = float(m.group(1)) * _UNITS[m.group(2)]
    if bits < 8e3:  # tc's tbf cannot shape below about one kilobyte per second
        raise LinkSpecError(f"--links: {key}={text!r} is {'zero' if bits == 0 else 'below 8kbit'}; links need a "
                            f"positive rate of at least 8kbit. Format: {FORMAT}")
    return bits


def parse_links(text: str, ratio: float = REPORT_RATIO) -> LinkSpec:
    """`ib=200mbit,nvlink=640mbit,delay=1` -> LinkSpec. Given `ib` alone, nvlink = ratio x ib."""
    fields: dict[str, str] = {}
    for part in (text or "").split(","):
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep or key not in ("ib", "nvlink", "delay") or key in fields or not value.strip():
            raise LinkSpecError(f"--links {text!r}: cannot read {part!r}. Format: {FORMAT}, "
                                f"e.g. ib=200mbit,nvlink=640mbit")
        fields[key] = value
    if "ib" not in fields:
        raise LinkSpecError(f"--links {text!r}: the ib rate is missing. Format: {FORMAT}")
    ib = _rate("ib", fields["ib"])
    nvlink = _rate("nvlink", fields["nvlink"]) if "nvlink" in fields else ib * ratio
    delay = 0.0
    if "delay" in fields:
        try:
            delay = float(fields["delay"])
        except ValueError:
            delay = -1.0
        if not 0 <= delay <= 10_000:
            raise LinkSpecError(f"--links: delay={fields['delay']!r} must be milliseconds in [0, 10000]. "
                                f"Format: {FORMAT}")
    return LinkSpec(ib, nvlink, delay)


def links_argument(text: str) -> LinkSpec:
    """argparse `type=` for --links: a bad spec stops the command line before anything runs."""
    try:
        return parse_links(text)
    except LinkSpecError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
