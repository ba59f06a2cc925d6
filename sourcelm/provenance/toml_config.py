"""A resolved training config (`Config.to_dict()`, as every checkpoint records it) written back as
the TOML file `sourcelm train` reads, so the model card and the demo can give a command that
re-runs exactly that config.

TOML has no null: a value that is None is left out, which is only right when None is also the
default. `config_toml` checks the round trip (parse the TOML back with `load_config` and compare
with the input) and raises if anything came out different, so a file it returns always reproduces
the config it was given.
"""

from __future__ import annotations

import json
import math


def _value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)  # shortest repr that reads back to the same double; valid TOML (1e-08, 0.003)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items() if x is not None) + " }"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def config_toml(config: dict, header: str = "") -> str:
    """TOML text that `sourcelm.config.load_config` reads back to exactly `config`."""
    from sourcelm.config import load_config

    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    scalars = {k: v for k, v in config.items() if not isinstance(v, dict)}
    lines += [f"{_key(k)} = {_value(v)}" for k, v in scalars.items() if v is not None]
    for section, table in config.items():
        if not isinstance(table, dict):
            continue
        lines += ["", f"[{section}]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in table.items() if v is not None]
    text = "\n".join(lines) + "\n"
    import tomllib

    back = load_config(tomllib.loads(text)).to_dict()
    if back != config:
        diff = sorted(f"{s}.{k}" for s in config if isinstance(config[s], dict)
                      for k in config[s] if back.get(s, {}).get(k) != config[s][k])
        raise ValueError(f"the config does not survive TOML (None where the default is not None?): {diff}")
    return text


def flatten_toml(path) -> list[str]:
    """A TOML config file as `section.key=value` overrides (to apply it on top of a preset)."""
    import tomllib
    from pathlib import Path

    data = tomllib.loads(Path(path).read_text())
    out = []
    for key, value in data.items():
        if isinstance(value, dict):
            out += [f"{key}.{k}={_value(v)}" for k, v in value.items()]
        else:
            out.append(f"{key}={_value(value)}")
    return out
