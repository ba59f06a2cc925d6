"""Pipeline TOML → a `Plan`: the input files grouped into tasks, the steps, and the stages.

```toml
[[input]]                       # one or more; globs relative to this file, else to the CWD
paths = ["data/raw/warc/*.warc.gz"]
format = "auto"                 # or warc | jsonl | parquet | html | text
text_key = "text"               # JSONL/Parquet field names
url_key = "url"

[output]
format = "jsonl.zst"            # or parquet
split_by = "language"           # optional: one folder per value of this metadata key

[tasks]
target_mb = 16                  # input files are grouped into tasks of about this size

[[step]]
type = "extract"                # then the step's own keys
```

A global step (dedup) ends a stage: stage k runs the per-document steps after the previous
global step (and its `decide`), then the next global step's `collect`; the global `resolve`
runs between stages.
"""

from __future__ import annotations

import glob
import os
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from sourcelm.config import ConfigError
from sourcelm.data.formats.readers import FORMATS as INPUT_FORMATS
from sourcelm.data.formats.readers import detect_format
from sourcelm.data.formats.writers import FORMATS as OUTPUT_FORMATS
from sourcelm.data.pipeline.registry import build_step, is_global

_INPUT_KEYS = {"paths", "format", "text_key", "url_key"}


@dataclass
class InputFile:
    path: str  # absolute
    source: str  # relative to the base the glob was resolved against; part of every document id
    format: str
    size: int
    options: dict = field(default_factory=dict)


@dataclass
class Stage:
    start: int  # first per-document step (index into steps)
    end: int  # one past the last
    opens_with: int | None  # the global step whose `decide` runs first, if any
    closes_with: int | None  # the global step whose `collect` runs last, if any


@dataclass
class Plan:
    name: str
    steps: list[dict]  # the [[step]] tables, as given
    step_names: list[str]
    stages: list[Stage]
    tasks: list[list[InputFile]]
    output_format: str = "jsonl.zst"
    split_by: str | None = None
    pipeline_file: str | None = None

    def resolved(self) -> dict:
        """The pipeline as it ran: for the manifest and for `audit`."""
        return {
            "name": self.name,
            "pipeline_file": self.pipeline_file,
            "steps": self.steps,
            "output": {"format": self.output_format, "split_by": self.split_by},
            "tasks": [[{"source": f.source, "format": f.format, **f.options} for f in t] for t in self.tasks],
        }


def shipped_pipeline(name: str) -> Path | None:
    """`sourcelm curate demo` finds the pipeline shipped in the package."""
    p = resources.files("sourcelm.data") / "pipelines" / f"{name}.toml"
    return Path(str(p)) if p.is_file() else None


def load_plan(pipeline: str | Path, input_override: list[str] | None = None) -> Plan:
    path = Path(pipeline)
    if not path.is_file() and not str(pipeline).endswith(".toml"):
        shipped = shipped_pipeline(str(pipeline))
        if shipped is not None:
            path = shipped
    if not path.is_file():
        raise ConfigError(f"pipeline {pipeline!s}: no such file (give a .toml path, or `demo`)")
    try:
        cfg = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    return plan_from_dict(cfg, base=path.parent, input_override=input_override, pipeline_file=str(path))


def plan_from_dict(cfg: dict, base: Path, input_override: list[str] | None = None,
                   pipeline_file: str | None = None) -> Plan:
    unknown = set(cfg) - {"name", "input", "output", "tasks", "step"}
    if unknown:
        raise ConfigError(f"pipeline: unknown section(s) {sorted(unknown)}; use name, input, output, tasks, step")
    specs = cfg.get("step") or []
    if not specs:
        raise ConfigError("pipeline: no [[step]] tables; add at least one (e.g. type = \"extract\")")
    steps = [build_step(s, i) for i, s in enumerate(specs)]  # fails at once on a bad step
    names = [s.name for s in steps]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ConfigError(f"steps: name(s) {sorted(dup)} used twice; give one of them name = \"...\"")
    if "read" in names:
        raise ConfigError("steps: `read` is reserved for the readers' statistics; rename that step")
    stages = _stages([is_global(s) for s in steps])

    out = cfg.get("output") or {}
    fmt = out.get("format", "jsonl.zst")
    if fmt not in OUTPUT_FORMATS:
        raise ConfigError(f"output.format = {fmt!r}: use one of {sorted(OUTPUT_FORMATS)}")
    inputs = cfg.get("input") or []
    if input_override:
        inputs = [{"paths": list(input_override)}]
    if not inputs:
        raise ConfigError("pipeline: no [[input]] table; add one with paths = [\"...\"] or pass --input")
    files = _resolve_inputs(inputs, base)
    if any(f.format in ("warc", "html") for f in files) and not any(s.get("type") == "extract" for s in specs):
        raise ConfigError("steps: the inputs hold HTML but no step extracts it; add [[step]] type = \"extract\"")
    target = float((cfg.get("tasks") or {}).get("target_mb", 16)) * (1 << 20)
    return Plan(name=cfg.get("name", Path(pipeline_file or "pipeline").stem), steps=specs, step_names=names,
                stages=stages, tasks=group_into_tasks(files, target), output_format=fmt,
                split_by=out.get("split_by"), pipeline_file=pipeline_file)


def _stages(is_global_flags: list[bool]) -> list[Stage]:
    stages, start, opens = [], 0, None
    for i, g in enumerate(is_global_flags):
        if g:
            stages.append(Stage(start, i, opens, i))
            start, opens = i + 1, i
    stages.append(Stage(start, len(is_global_flags), opens, None))
    return stages


def _resolve_inputs(inputs: list[dict], base: Path) -> list[InputFile]:
    files: dict[str, InputFile] = {}
    for k, spec in enumerate(inputs):
        bad = set(spec) - _INPUT_KEYS
        if bad:
            raise ConfigError(f"input[{k}]: unknown key(s) {sorted(bad)}; allowed: {sorted(_INPUT_KEYS)}")
        paths = spec.get("paths")
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ConfigError(f"input[{k}]: add paths = [\"glob\", ...]")
        fmt = spec.get("format", "auto")
        if fmt != "auto" and fmt not in INPUT_FORMATS:
            raise ConfigError(f"input[{k}].format = {fmt!r}: use auto or one of {INPUT_FORMATS}")
        options = {key: spec[key] for key in ("text_key", "url_key") if key in spec}
        for pattern in paths:
            found = _glob(pattern, base)
            if not found:
                raise ConfigError(f"input[{k}]: {pattern!r} matches no file (relative to {base} or "
                                  f"{Path.cwd()}); fetch the data first (sourcelm corpus fetch) or fix the path")
            for full, root in found:
                f_fmt = detect_format(full) if fmt == "auto" else fmt
                if f_fmt is None:
                    continue  # not a document file (a stray image next to the pages): not an input
                source = os.path.relpath(full, root)
                files.setdefault(full, InputFile(full, source, f_fmt, os.path.getsize(full), options))
    if not files:
        raise ConfigError("input: the globs match no readable file (.warc.gz, .jsonl, .parquet, .html, .txt)")
    return sorted(files.values(), key=lambda f: f.source)


def _glob(pattern: str, base: Path) -> list[tuple[str, str]]:
    """(file, root) pairs matching `pattern`, tried against `base` (the TOML's folder), then the
    CWD. An absolute pattern's root is its folder part before the first wildcard, so the document
    sources (and ids) do not depend on where the data lives."""
    if os.path.isabs(pattern):
        parts = Path(pattern).parts
        fixed = [p for p in parts[: next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts))]]
        prefix = str(Path(*fixed)) if fixed else "/"
        roots = [(prefix if os.path.isdir(prefix) else os.path.dirname(prefix), pattern)]
    else:
        roots = [(str(base), os.path.join(base, pattern)), (os.getcwd(), os.path.join(os.getcwd(), pattern))]
    for root, full_pattern in roots:
        expanded = []
        for h in sorted(glob.glob(full_pattern, recursive=True)):
            if os.path.isdir(h):  # a folder stands for the files inside it
                expanded += sorted(str(p) for p in Path(h).rglob("*") if p.is_file())
            else:
                expanded.append(h)
        if expanded:
            return [(os.path.abspath(h), os.path.abspath(root)) for h in expanded]
    return []


def group_into_tasks(files: list[InputFile], target_bytes: float) -> list[list[InputFile]]:
    """Consecutive files (in source order) packed into tasks of about `target_bytes`; a larger
    file is a task of its own. Deterministic: the same inputs give the same tasks."""
    tasks: list[list[InputFile]] = []
    current: list[InputFile] = []
    size = 0
    for f in files:
        if current and size + f.size > target_bytes:
            tasks.append(current)
            current, size = [], 0
        current.append(f)
        size += f.size
    if current:
        tasks.append(current)
    return tasks
