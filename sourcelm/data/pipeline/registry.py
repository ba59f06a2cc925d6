"""The step registry: the pipeline TOML's `type = "..."` → the step class.

A `[[step]]` table's other keys are the class's constructor keyword arguments, except `name`,
which renames the step (in drop reasons and statistics) so one type can appear twice.
Dedup and decontamination classes live in their own modules and are imported when used.
"""

from __future__ import annotations

import importlib
import inspect

from sourcelm.config import ConfigError
from sourcelm.data.pipeline.step import GlobalStep, Step

# type → "module:Class"; imported on first use so a missing optional module only matters when used
STEP_TYPES: dict[str, str] = {
    "extract": "sourcelm.data.steps.extract:Extract",
    "url_filter": "sourcelm.data.steps.url_filter:URLFilter",
    "language": "sourcelm.data.steps.langid:LanguageID",
    "gopher_quality": "sourcelm.data.steps.gopher:GopherQuality",
    "gopher_repetition": "sourcelm.data.steps.gopher:GopherRepetition",
    "c4": "sourcelm.data.steps.c4:C4Quality",
    "fineweb": "sourcelm.data.steps.c4:FineWebQuality",
    "pii": "sourcelm.data.steps.pii:PII",
    "sample": "sourcelm.data.steps.sampling:Sample",
    "limit": "sourcelm.data.steps.sampling:Limit",
    "exact_dedup": "sourcelm.data.dedup.exact:ExactDedup",
    "minhash_dedup": "sourcelm.data.dedup.minhash:MinhashDedup",
    "decontaminate": "sourcelm.data.steps.decontam:Decontaminate",
}

# The built-in steps' modules before sourcelm/data/ was split into subpackages: a pipeline TOML, or a
# curation manifest that `verify --data` replays, may name a built-in step "module:Class" by its old path.
FORMER_MODULES: dict[str, str] = {
    "sourcelm.data.extract": "sourcelm.data.steps.extract",
    "sourcelm.data.url_filter": "sourcelm.data.steps.url_filter",
    "sourcelm.data.langid": "sourcelm.data.steps.langid",
    "sourcelm.data.gopher": "sourcelm.data.steps.gopher",
    "sourcelm.data.c4": "sourcelm.data.steps.c4",
    "sourcelm.data.pii": "sourcelm.data.steps.pii",
    "sourcelm.data.sampling": "sourcelm.data.steps.sampling",
    "sourcelm.data.decontam": "sourcelm.data.steps.decontam",
    "sourcelm.data.exact_dedup": "sourcelm.data.dedup.exact",
    "sourcelm.data.minhash": "sourcelm.data.dedup.minhash",
}


def step_class(type_name: str) -> type:
    """A registered type, or "package.module:Class" for a step of your own."""
    if type_name in STEP_TYPES:
        module, cls = STEP_TYPES[type_name].split(":")
    elif ":" in type_name:
        module, cls = type_name.split(":", 1)
        module = FORMER_MODULES.get(module, module)
    else:
        raise ConfigError(f"step type {type_name!r} is unknown: use one of {sorted(STEP_TYPES)} "
                          "or \"package.module:Class\"")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"step type {type_name!r} is not available in this installation ({e})") from e


def build_step(spec: dict, index: int) -> Step | GlobalStep:
    """Builds the step described by one `[[step]]` table (`index` is its position, for messages)."""
    spec = dict(spec)
    type_name = spec.pop("type", None)
    if not isinstance(type_name, str):
        raise ConfigError(f"step[{index}]: missing `type`; add type = one of {sorted(STEP_TYPES)}")
    name = spec.pop("name", type_name.rsplit(":", 1)[-1].lower())
    cls = step_class(type_name)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = [k for k in spec if k not in params or k == "self"]
    if unknown and not takes_any:
        allowed = [k for k in params if k != "self" and params[k].kind is not inspect.Parameter.VAR_KEYWORD]
        raise ConfigError(f"step[{index}] ({type_name}): unknown key(s) {unknown}; allowed: {allowed}")
    try:
        step = cls(**spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"step[{index}] ({type_name}): {e}") from e
    step.name = name
    if not hasattr(step, "counters"):
        import collections

        step.counters = collections.Counter()
    if not (hasattr(step, "process") or is_global(step)):
        raise ConfigError(f"step[{index}] ({type_name}): {cls.__name__} is neither a Step nor a GlobalStep")
    return step


def is_global(step) -> bool:
    """GlobalSteps are told apart by their three phases (duck-typed, so a class need not inherit)."""
    return isinstance(step, GlobalStep) or all(hasattr(step, m) for m in ("collect", "resolve", "decide"))
