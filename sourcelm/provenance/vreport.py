"""The verification report of `sourcelm verify --replay/--sample`: JSON + a readable Markdown table.

RUN/verification/report.json holds every segment check (`segment_check.check_segment`): the
segment, its inputs' hashes (start and end checkpoint manifests, token shard manifests, code
version), the layout used, the verdict (exact / within tolerance / failed / not run), the distances
and the calibrated threshold with its derivation, the cost (seconds, peak memory of the largest
process) and, with --sample, the seed, how it was derived and the chance that a forged run passes.
RUN/verification/report.md is the same as a table; the model card links it.

Sampling: the seed is the first 8 bytes of the provenance root hash, so the prover, who fixes the
root by publishing it, cannot choose which segments get checked. With S segments of which F are
forged, N segments drawn without replacement all miss the forged ones with probability
C(S − F, N) / C(S, N); for a run with many segments this tends to (1 − f)^N, f = F / S.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

FRACTIONS = (0.01, 0.05, 0.1, 0.25, 0.5)
REPORT_DIR = "verification"


def sample_seed(root: str) -> int:
    return int(root[:16], 16)


def sample_segments(n_segments: int, n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(n_segments), min(n, n_segments)))


def pass_probability(n_segments: int, n: int, f: float) -> float:
    """The chance that N segments drawn without replacement from S miss all ceil(f × S) forged ones."""
    forged = min(n_segments, math.ceil(f * n_segments))
    if n > n_segments - forged:
        return 0.0
    return math.comb(n_segments - forged, n) / math.comb(n_segments, n)


def sampling_record(n_segments: int, n: int, seed: int, derived_from: str) -> dict:
    return {"segments": n_segments, "sampled": min(n, n_segments), "seed": seed, "seed_from": derived_from,
            "pass_probability": [{"forged_fraction": f, "forged_segments": min(n_segments, math.ceil(f * n_segments)),
                                  "this_run": pass_probability(n_segments, n, f), "large_run": (1 - f) ** n}
                                 for f in FRACTIONS]}


def _mib(b) -> str:
    return f"{b / 2**20:.0f} MiB" if b else "-"


def write_report(run_dir: Path, records: list[dict], sampling: dict | None = None, root: str | None = None) -> Path:
    """Writes report.json and report.md under RUN/verification/ and returns the Markdown path."""
    out = Path(run_dir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    doc = {"provenance_root": root, "checks": records, "sampling": sampling}
    (out / "report.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    lines = ["# Verification report", "", f"Provenance root: `sha256:{root}`" if root else "No final artifact.", "",
             "| segment | layout | verdict | distance (rel L2 / max) | threshold | seconds | peak memory | inputs |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        d, t = r.get("distance"), r.get("threshold")
        dist = f"{d['rel_l2']:.3g} / {d['max_abs']:.3g}" if d else ("0 / 0" if r["verdict"] == "exact" else "-")
        thr = f"{t['rel_l2']:.3g} / {t['max_abs']:.3g}" if t else "-"
        cost = r.get("cost", {})
        inputs = r.get("inputs", {})
        hashes = (f"start {str(inputs.get('start_checkpoint'))[:12]}, end {str(inputs.get('end_checkpoint'))[:12]}, "
                  f"{len(inputs.get('data', {}))} data manifest(s)") if inputs else "-"
        lines.append(f"| {r['segment']} | {r.get('layout', {}).get('description', '-')} | **{r['verdict']}** | {dist} "
                     f"| {thr} | {cost.get('seconds', '-')} | {_mib(cost.get('peak_rss'))} | {hashes} |")
    lines.append("")
    for r in records:
        lines.append(f"- {r['segment']}: {r['detail']}")
        if r.get("threshold"):
            lines.append(f"  - threshold: {r['threshold']['derivation']}")
        if r.get("trajectory"):
            tr = r["trajectory"]
            lines.append(f"  - loss trajectory: worst step {tr['ratio']:.3g} x its threshold; "
                         f"{tr['threshold']['derivation']}")
        for op in r.get("exact_broken_by", []):
            lines.append(f"  - exact lost to: {op}")
    if sampling:
        lines += ["", f"Sampled {sampling['sampled']} of {sampling['segments']} segments with seed {sampling['seed']} "
                      f"({sampling['seed_from']}). Chance that a run with a fraction f of forged segments passes:", "",
                  "| f | forged segments | this run | many segments, (1 − f)^N |", "|---|---|---|---|"]
        lines += [f"| {p['forged_fraction']} | {p['forged_segments']} | {p['this_run']:.3g} | {p['large_run']:.3g} |"
                  for p in sampling["pass_probability"]]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    return out / "report.md"
