"""Checkpoints: safetensors for tensors, JSON for the rest, atomic, verified on load.

Layout of `RUN/checkpoints/step_000100/`:
    model.safetensors      every parameter and buffer (expert biases included), global names
    optimizer.safetensors  Adam moments per parameter name (`<name>.exp_avg`, `<name>.exp_avg_sq`)
    state.json             step, consumed samples/tokens, loader and schedule state, RNG state,
                           balancer and NaN counters, the resolved config, code version, and the
                           SHA-256 of both tensor files
    manifest.json          the provenance manifest (inputs: token shard manifests, previous checkpoint)

A checkpoint is written into a temporary directory, every file fsynced, then the directory is
renamed into place and its parent fsynced: a crash at any moment leaves the previous checkpoint
intact. Nothing is pickled, and names are global (global expert ids), so any layout loads any
checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from sourcelm.artifacts import MANIFEST_NAME, sha256_file, write_manifest

log = logging.getLogger(__name__)
PREFIX = "step_"


def step_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step:06d}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_checkpoint(root: Path, step: int, model_tensors: dict[str, torch.Tensor],
                    optim_tensors: dict[str, torch.Tensor], state: dict, keep: int,
                    manifest_inputs: list[Path] = ()) -> Path:
    """Writes checkpoint `step` atomically, then deletes all but the newest `keep`."""
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = root / f".{final.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in model_tensors.items()}, tmp / "model.safetensors")
    save_file({k: v.contiguous() for k, v in optim_tensors.items()}, tmp / "optimizer.safetensors")
    state = dict(state, files={name: sha256_file(tmp / name)
                               for name in ("model.safetensors", "optimizer.safetensors")})
    (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True) + "\n")
    write_manifest(tmp, "checkpoint", ["model.safetensors", "optimizer.safetensors", "state.json"],
                   inputs=[p for p in manifest_inputs if Path(p).exists()], config=state.get("config"),
                   extra={"step": step})
    for f in tmp.iterdir():
        _fsync_file(f)
    _fsync_dir(tmp)
    if final.exists():  # a rerun of the same step (e.g. after a crash right after the rename)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    dirs = [d for d in root.iterdir() if d.is_dir() and d.name.startswith(PREFIX) and d.name[len(PREFIX):].isdigit()]
    return sorted(dirs, key=lambda d: int(d.name[len(PREFIX):]))


def verify_checkpoint(path: Path) -> str | None:
    """None if the checkpoint is complete and its tensor files match their recorded hashes,
    else the reason it is not usable."""
    state_file = path / "state.json"
    if not state_file.exists():
        return "state.json missing"
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError as e:
        return f"state.json unreadable ({e})"
    if set(state.get("files", {})) != {"model.safetensors", "optimizer.safetensors"}:
        return "state.json does not record the hashes of both tensor files"
    expected = dict(state["files"])
    # state.json itself (step, data position, config) is pinned by the manifest written after it
    try:
        expected["state.json"] = json.loads((path / MANIFEST_NAME).read_text())["outputs"]["state.json"]
    except (OSError, json.JSONDecodeError, KeyError):
        return "manifest.json missing or without the hash of state.json"
    for name, digest in expected.items():
        f = path / name
        if not f.exists():
            return f"{name} missing"
        if sha256_file(f) != digest:
            return f"{name} does not match its recorded SHA-256"
    return None


def newest_valid_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint that verifies; damaged newer ones are reported and skipped."""
    for path in reversed(list_checkpoints(root)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path
        log.warning("checkpoint %s is not usable (%s); trying the previous one", path.name, problem)
    return None


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict]:
    problem = verify_checkpoint(path)
    if problem:
        raise ValueError(f"checkpoint {path} is not usable: {problem}")
    state = json.loads((path / "state.json").read_text())
    return load_file(path / "model.safetensors"), load_file(path / "optimizer.safetensors"), state


def rng_state() -> dict:
    """Torch's CPU generator state as a JSON-safe list of bytes (the loop itself draws no random
    numbers — data order and init are seeded per index/name — but user extensions might)."""
    return {"torch_cpu": torch.get_rng_state().tolist()}


def set_rng_state(state: dict) -> None:
    if "torch_cpu" in state:
        torch.set_rng_state(torch.tensor(state["torch_cpu"], dtype=torch.uint8))
