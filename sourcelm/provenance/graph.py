"""The provenance graph of a run, and the hash checks `sourcelm verify` makes on it.

Every stage writes a `manifest.json` (see `sourcelm.artifacts`): `outputs` maps each file it wrote to its
SHA-256, `inputs` lists the files it read (other stages' manifests, or raw files) with their
SHA-256, paths relative to the manifest's folder. A manifest that lists another manifest as an
input pins that manifest's bytes, hence (transitively) every file the upstream stage wrote. So the
manifests form a hash-linked graph: export → last checkpoint → previous checkpoints → token shards
→ tokenizer and curated documents → raw corpus files.

`walk(run_dir)` starts from the final artifacts (the manifests under RUN_DIR that no other manifest
there lists as an input: normally the HF export) and visits every manifest reachable from them,
inside RUN_DIR or not. For each it checks:
  - every output file exists and has its recorded hash;
  - every input exists and has its recorded hash (an edited upstream manifest or raw file breaks
    the link, and the failure names the stage that owns the changed file);
  - checkpoints: state.json's own file hashes, manifest config == state.json config, and all the
    checkpoints of one run come from one code version;
  - export: its config is the config of the checkpoint it was made from; the model's vocabulary
    covers the tokenizer's.
Each check is a `Check` row; `Report.ok` is true only when no row failed.
"""

from __future__ import annotations

import itertools
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from sourcelm.artifacts import MANIFEST_NAME, sha256_file

# the sections of a training config that decide the numbers (layout, logging and checkpoint
# cadence may change when a run is resumed elsewhere without changing what it computes)
MATH_SECTIONS = ("model", "optim", "schedule", "seed")
SKIP_DIRS = {"work", ".done", "__pycache__"}


@dataclass
class Check:
    stage: str  # the stage that owns the checked artifact: "curate", "checkpoint step_000040", ...
    path: str  # the file checked, relative to the run dir when inside it
    what: str  # "output", "input link", "code version", "config", "replay", ...
    ok: bool
    detail: str = ""
    note: bool = False  # informational: shown, never a failure


@dataclass
class Node:
    path: Path  # the manifest file
    manifest: dict
    stage: str  # display name: "tokenize (train)", "checkpoint step_000040"

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def kind(self) -> str:
        return self.manifest.get("stage", "?")


@dataclass
class Report:
    run_dir: Path
    checks: list[Check] = field(default_factory=list)
    nodes: dict[Path, Node] = field(default_factory=dict)
    roots: list[Path] = field(default_factory=list)
    _hashes: dict[Path, str] = field(default_factory=dict, repr=False)

    @property
    def ok(self) -> bool:
        return all(c.ok or c.note for c in self.checks)

    @property
    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok and not c.note]

    def sha(self, path: Path) -> str:
        """SHA-256 of a file, computed once per walk (a checkpoint's tensors are linked thrice)."""
        key = Path(path).resolve()
        if key not in self._hashes:
            self._hashes[key] = sha256_file(key)
        return self._hashes[key]

    def add(self, *args, **kw) -> Check:
        c = Check(*args, **kw)
        self.checks.append(c)
        return c

    def rel(self, path: Path) -> str:
        try:
            return str(Path(os.path.relpath(path.resolve(), self.run_dir.resolve())))
        except ValueError:
            return str(path)

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def checkpoint_runs(self) -> dict[Path, list[Node]]:
        """Checkpoint nodes grouped by their `checkpoints/` folder, in step order."""
        runs: dict[Path, list[Node]] = {}
        for n in self.of_kind("checkpoint"):
            runs.setdefault(n.dir.parent, []).append(n)
        return {k: sorted(v, key=lambda n: n.manifest.get("step", 0)) for k, v in sorted(runs.items())}

    def final(self) -> Node | None:
        """The final artifact: the export if there is one, else the newest checkpoint. A run continued from an
        exported checkpoint reaches that export too (through its base record): the run's own artifacts come first
        (an export among the roots, else its newest checkpoint)."""
        roots = {Path(r).resolve() for r in self.roots}
        run_dir = self.run_dir.resolve()
        ckpts = [c for run in self.checkpoint_runs().values() for c in run]
        for exports, checkpoints in (([n for n in self.of_kind("export") if n.path in roots],
                                      [c for c in ckpts if run_dir in c.path.parents]),
                                     (self.of_kind("export"), ckpts)):
            if exports:
                return max(exports, key=lambda n: str(n.path))
            if checkpoints:
                return max(checkpoints, key=lambda n: n.manifest.get("step", 0))
        return None


def stage_name(path: Path, manifest: dict) -> str:
    kind = manifest.get("stage", "?")
    if kind == "checkpoint":
        return f"checkpoint {path.parent.name}"
    if kind == "tokenize" and manifest.get("config", {}).get("split"):
        return f"tokenize ({manifest['config']['split']})"
    return kind


def owner_stage(path: Path) -> str:
    """The stage that wrote `path`: that of the nearest manifest in its folder or above."""
    if path.name == MANIFEST_NAME and path.is_file():
        try:
            return stage_name(path, json.loads(path.read_text()))
        except (OSError, ValueError):
            return "?"
    for parent in path.parents:
        m = parent / MANIFEST_NAME
        if m.is_file():
            try:
                return stage_name(m, json.loads(m.read_text()))
            except (OSError, ValueError):
                return "?"
    return "raw input"


def find_manifests(run_dir: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(run_dir):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in SKIP_DIRS)
        if MANIFEST_NAME in filenames:
            found.append(Path(dirpath) / MANIFEST_NAME)
    return found


def find_roots(run_dir: Path) -> list[Path]:
    """The manifests under run_dir that no other manifest there lists as an input."""
    manifests = [p.resolve() for p in find_manifests(run_dir)]
    referenced = set()
    for p in manifests:
        try:
            m = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        for i in m.get("inputs", []):
            referenced.add((p.parent / i.get("path", "")).resolve())
    return [p for p in manifests if p not in referenced]


def walk(run_dir: str | Path, roots: list[Path] | None = None) -> Report:
    run_dir = Path(run_dir)
    report = Report(run_dir)
    if not run_dir.is_dir():
        report.add("?", str(run_dir), "run directory", False, "no such directory")
        return report
    report.roots = roots if roots is not None else find_roots(run_dir)
    if not report.roots:
        report.add("?", str(run_dir), "manifests", False, "no manifest.json found under the run directory")
        return report
    queue = [Path(r).resolve() for r in report.roots]
    while queue:
        path = queue.pop(0)
        if path in report.nodes:
            continue
        node = _read_node(report, path)
        if node is None:
            continue
        report.nodes[path] = node
        _check_outputs(report, node)
        queue += _check_inputs(report, node)
    _check_checkpoints(report)
    _check_export(report)
    _check_chain_ends(report)
    return report


def check_stage(manifest: str | Path) -> Report:
    """One stage alone: its outputs and its input links (not the stages upstream)."""
    path = Path(manifest).resolve()
    report = Report(path.parent)
    node = _read_node(report, path)
    if node is not None:
        report.nodes[path] = node
        _check_outputs(report, node)
        _check_inputs(report, node)
    return report


def _read_node(report: Report, path: Path) -> Node | None:
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or "stage" not in manifest:
            raise ValueError("not a stage manifest (no 'stage')")
    except (OSError, ValueError) as e:
        report.add(owner_stage(path.parent), report.rel(path), "manifest", False, f"unreadable: {e}")
        return None
    return Node(path, manifest, stage_name(path, manifest))


def _check_outputs(report: Report, node: Node) -> None:
    outputs = node.manifest.get("outputs", {})
    bad = 0
    for rel, digest in sorted(outputs.items()):
        f = node.dir / rel
        if not f.is_file():
            report.add(node.stage, report.rel(f), "output", False, "missing")
            bad += 1
        elif report.sha(f) != digest:
            report.add(node.stage, report.rel(f), "output", False,
                       f"SHA-256 {report.sha(f)[:12]}… differs from the recorded {digest[:12]}…")
            bad += 1
    if outputs and not bad:
        report.add(node.stage, report.rel(node.path), "output", True, f"{len(outputs)} file(s) match their hashes")
    if not outputs:
        report.add(node.stage, report.rel(node.path), "output", False, "the manifest lists no output files")


def _check_inputs(report: Report, node: Node) -> list[Path]:
    """Checks every input link; returns the input manifests to visit next."""
    nxt, good = [], 0
    for entry in node.manifest.get("inputs", []):
        f = (node.dir / entry.get("path", "")).resolve()
        if not f.is_file():
            hint = (" (deleted by checkpoint.keep? keep = 0 keeps the whole chain)"
                    if node.kind == "checkpoint" and f.parent.name.startswith("step_") else "")
            report.add(owner_stage(f), report.rel(f), "input link", False,
                       f"missing; {node.stage} ({report.rel(node.path)}) was made from it{hint}")
            continue
        if report.sha(f) != entry.get("sha256"):
            report.add(owner_stage(f), report.rel(f), "input link", False,
                       f"changed since {node.stage} ({report.rel(node.path)}) was made from it")
            if f.name == MANIFEST_NAME:
                nxt.append(f)  # still checked: what else changed upstream is worth knowing
            continue
        good += 1
        if f.name == MANIFEST_NAME:
            nxt.append(f)
    if good:
        report.add(node.stage, report.rel(node.path), "input link", True, f"{good} input(s) match the recorded hashes")
    return nxt


def read_state(node: Node) -> dict | None:
    try:
        return json.loads((node.dir / "state.json").read_text())
    except (OSError, ValueError):
        return None


def root_hash(report: Report) -> str | None:
    """The provenance root: the SHA-256 of the final artifact's manifest, which pins the whole chain."""
    final = report.final()
    return sha256_file(final.path) if final else None


def code_id(code: dict) -> tuple:
    return tuple(code.get(k) for k in ("package", "git_commit", "dirty_hash", "source_hash"))


def describe_code(code: dict) -> str:
    commit = (code.get("git_commit") or "no git")[:10]
    dirty = f" + uncommitted {code['dirty_hash'][:10]}" if code.get("dirty_hash") else ""
    src = f", sources {code['source_hash'][:10]}" if code.get("source_hash") else ""
    return f"{commit}{dirty}{src}"


def _check_checkpoints(report: Report) -> None:
    for run, nodes in report.checkpoint_runs().items():
        for n in nodes:
            state = read_state(n)
            if state is None:
                continue  # state.json is an output: its absence or damage is already reported
            bad = [name for name, d in state.get("files", {}).items()
                   if not (n.dir / name).is_file() or report.sha(n.dir / name) != d]
            for name in bad:
                report.add(n.stage, report.rel(n.dir / name), "state.json hashes", False,
                           "differs from the SHA-256 in state.json")
            if not bad:
                report.add(n.stage, report.rel(n.dir / "state.json"), "state.json hashes", True,
                           "tensor files match state.json")
            same = n.manifest.get("config") == state.get("config")
            report.add(n.stage, report.rel(n.path), "config", same,
                       "manifest config equals state.json config" if same
                       else "the manifest's config differs from state.json's: "
                       + _diff(state.get("config"), n.manifest.get("config")))
        # one run, one code version: the most common one (the first checkpoint's on a tie)
        ids = [code_id(n.manifest.get("code", {})) for n in nodes]
        common = Counter(ids).most_common()
        reference = ids[0] if len(common) > 1 and common[0][1] == common[1][1] else common[0][0]
        ref_node = nodes[ids.index(reference)]
        for n, cid in zip(nodes, ids):
            if cid == reference:
                continue
            report.add(n.stage, report.rel(n.path), "code version", False,
                       f"made by code {describe_code(n.manifest.get('code', {}))}; the run's other checkpoints by "
                       f"{describe_code(ref_node.manifest.get('code', {}))}")
        if len(set(ids)) == 1:
            report.add(f"checkpoint (all {len(nodes)})", report.rel(run), "code version", True,
                       f"all from {describe_code(nodes[0].manifest.get('code', {}))}")
        for a, b in itertools.pairwise(nodes):
            ca, cb = (_math(x.manifest.get("config", {})) for x in (a, b))
            if ca != cb:
                report.add(b.stage, report.rel(b.path), "config", True, note=True,
                           detail=f"training config changed since {a.stage}: {_diff(ca, cb)}")


def _check_export(report: Report) -> None:
    for e in report.of_kind("export"):
        ckpts = [report.nodes.get((e.dir / i["path"]).resolve()) for i in e.manifest.get("inputs", [])]
        ckpts = [c for c in ckpts if c is not None and c.kind == "checkpoint"]
        if not ckpts:
            report.add(e.stage, report.rel(e.path), "input link", False, "the export links no checkpoint manifest")
            continue
        state = read_state(ckpts[0]) or {}
        same = e.manifest.get("config") == state.get("config")
        report.add(e.stage, report.rel(e.path), "config", same,
                   f"equals the config of {ckpts[0].stage}" if same
                   else f"differs from {ckpts[0].stage}'s state.json: "
                   + _diff(state.get("config"), e.manifest.get("config")))
        vocab = (e.manifest.get("config") or {}).get("model", {}).get("vocab_size")
        tok_vocab = [t.manifest.get("vocab_size") for t in report.of_kind("tokenizer") if t.manifest.get("vocab_size")]
        if vocab and tok_vocab:
            fits = all(vocab >= v for v in tok_vocab)
            report.add(e.stage, report.rel(e.path), "vocabulary", fits,
                       f"model vocab {vocab}, tokenizer vocab {', '.join(map(str, tok_vocab))}")


def _check_chain_ends(report: Report) -> None:
    """Where the graph stops before a corpus: said, so a reader knows where the trust starts."""
    for n in report.nodes.values():
        if not n.manifest.get("inputs") and n.kind != "corpus":
            report.add(n.stage, report.rel(n.path), "chain", True, note=True,
                       detail="records no inputs: the verified chain starts here")


def _math(config: dict) -> dict:
    out = {k: config.get(k) for k in MATH_SECTIONS}
    data = config.get("data", {})
    out["data"] = {k: data.get(k) for k in ("seq_len", "seed")}
    out["dtype"] = config.get("train", {}).get("dtype")
    return out


def _diff(a, b, prefix: str = "") -> str:
    """The dotted keys whose values differ, with both values (a few)."""
    out = []

    def rec(x, y, p):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                rec(x.get(k), y.get(k), f"{p}.{k}" if p else k)
        elif x != y:
            out.append(f"{p}: {x!r} → {y!r}")

    rec(a, b, prefix)
    return "; ".join(out[:4]) + (f" (+{len(out) - 4} more)" if len(out) > 4 else "") if out else "(no difference)"
