"""Does DeepSeek-V3's FP8 recipe keep the loss within 0.25 % of BF16? (issue 19, "Measured")

`loss`: trains the `tiny` preset on real token shards once per (variant, seed), two runs at a time with one thread
each, every run in its own process (`worker`), and compares the final validation loss of each FP8 variant with the
BF16 run of the same seed (same init, same data order): relative difference per seed, mean ± spread, next to the
report's 0.25 %. Variants: `bf16` (train.fp8 = off), `fp8` (train.fp8 = emulate), and `fp8-no-CLASS`: FP8 except one
class of GEMMs kept in BF16 through a local wrapper of `ops.linear` / `ops.expert_ffn` (no config field), to find
which quantization costs the most. Classes: `attention` (q_a, q_b, kv_a, kv_b, o of every layer), `dense` (the dense
layer's FFN and the MoE layers' shared experts), `experts` (the routed experts' grouped GEMMs).

`spikes`: how often a run's loss jumps in the learning rate's warm-up, FP8 against BF16, over many seeds: each run
trains the first `--stop-after` steps of a `--steps` schedule (the same warm-up and learning rates as the `loss`
runs, so seeds they share spike at the same steps), and a step whose main loss exceeds the lowest of the 5 before it
by more than `--threshold` nats is a spike. Prints the spiking seeds per variant and Fisher's exact test of the two
rates. `spike-origin`: where one spike comes from: from the FP8 run's state two steps before its spike, the
step before it is taken once in FP8 and once in BF16, and each result's loss on the spiking step's batch is printed.
If the BF16 step spikes too, the spike was in the state the run had reached (weights and AdamW moments), not in that
step's FP8 gradients.

`memory`: activation bytes one decoder layer saves for backward (dense and MoE layer), FP8 against BF16 autocast,
counted by `torch.autograd.graph.saved_tensors_hooks` over one forward (each storage once, parameters left out).

    .venv/bin/python bench/fp8_loss.py loss --tokens TOKENS --out /tmp/fp8 [--variants bf16,fp8] [--steps 80]
    .venv/bin/python bench/fp8_loss.py loss --tokens TOKENS --out /tmp/fp8 --summarise-only
    .venv/bin/python bench/fp8_loss.py spikes --tokens TOKENS --out /tmp/spikes --seeds 0-39 [--stop-after 40]
    .venv/bin/python bench/fp8_loss.py spike-origin --tokens TOKENS --out /tmp/origin --seed 0 --spike 27
    .venv/bin/python bench/fp8_loss.py memory
    .venv/bin/python bench/fp8_loss.py speed [--device cuda --preset small]   # tokens/s, MFU: FP8 vs BF16
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT_BOUND = 0.25  # % relative loss difference the report claims FP8 stays within (§3.3)
CLASSES = ("attention", "dense", "experts")


def overrides(tokens: Path, steps: int, seed: int, fp8: str) -> list[str]:
    """The tiny preset, shortened: no MTP (a third less compute; the report's claim is about the main loss),
    `steps` steps with a tenth of warm-up, validation once at the end over 8 batches, bf16 compute."""
    vocab = json.loads((tokens.parent / "tokenizer" / "manifest.json").read_text())["vocab_size"] \
        if (tokens.parent / "tokenizer" / "manifest.json").exists() else None
    return [f"data.train=['{tokens / 'train'}']", f"data.valid=['{tokens / 'valid'}']",
            *([f"model.vocab_size={vocab}"] if vocab else []), "model.num_nextn_predict_layers=0",
            f"schedule.steps={steps}", f"schedule.warmup_steps={max(steps // 10, 1)}", f"logging.valid_every={steps}",
            "logging.valid_batches=8", "checkpoint.every=100000", "logging.tensorboard=false", "logging.progress=false",
            f"seed={seed}", "train.dtype=bfloat16", f"train.fp8={fp8}"]


# ------------------------------------------------------------------------------ one class of GEMMs kept in BF16


@contextlib.contextmanager
def _precision_off():
    from sourcelm.kernels import ops

    previous, ops._linear_precision = ops._linear_precision, "off"
    try:
        yield
    finally:
        ops._linear_precision = previous


def keep_class_in_bf16(model, name: str) -> None:
    """Runs one class of GEMMs without FP8: forward hooks mark which module is running (the innermost wins), and
    `ops.linear` / `ops.expert_ffn`, looked up through the module by the model's code, switch FP8 off for that class.
    Backward follows forward's choice (the FP8 linear is an autograd function chosen at forward)."""
    from sourcelm.kernels import ops

    if name not in CLASSES:
        sys.exit(f"unknown GEMM class {name!r}: choose one of {', '.join(CLASSES)}")
    running: list[str] = []
    for module_name, module in model.named_modules():
        leaf = module_name.rsplit(".", 1)[-1]
        kind = ("attention" if leaf == "self_attn" else
                "dense" if leaf == "shared_experts" or (leaf == "mlp" and hasattr(module, "gate_proj")) else None)
        if kind:
            # hooks return None: anything else would replace the module's inputs or output
            module.register_forward_pre_hook(lambda *_, k=kind: running.append(k))
            module.register_forward_hook(lambda *_: running.pop() and None)
    linear, expert_ffn, attention_output = ops.linear, ops.expert_ffn, ops.attention_output

    def patched_linear(x, weight, **kwargs):
        with _precision_off() if running and running[-1] == name else contextlib.nullcontext():
            return linear(x, weight, **kwargs)

    def patched_expert_ffn(*args, **kwargs):
        with _precision_off() if name == "experts" else contextlib.nullcontext():
            return expert_ffn(*args, **kwargs)

    def patched_attention_output(*args):
        with _precision_off() if name == "attention" else contextlib.nullcontext():
            return attention_output(*args)

    ops.linear, ops.expert_ffn, ops.attention_output = patched_linear, patched_expert_ffn, patched_attention_output


def worker(args) -> None:
    from sourcelm.config import load_config
    from sourcelm.train.loop import Trainer

    fp8 = "off" if args.variant == "bf16" else "emulate"
    trainer = Trainer(load_config(args.preset, overrides(args.tokens, args.steps, args.seed, fp8)), args.run_dir,
                      progress=False)
    if args.variant.startswith("fp8-no-"):
        keep_class_in_bf16(trainer.model, args.variant.removeprefix("fp8-no-"))
    trainer.fit(stop_after=args.stop_after or None)


# ------------------------------------------------------------------------------ the loss comparison


def launch(args, variant: str, seed: int) -> subprocess.Popen:
    """One run from its first step: what an unfinished earlier run left in its directory goes first."""
    run_dir = args.out / f"{variant}_s{seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, __file__, "worker", "--variant", variant, "--seed", str(seed), "--tokens",
           str(args.tokens), "--steps", str(args.steps), "--preset", args.preset, "--run-dir", str(run_dir),
           "--stop-after", str(getattr(args, "stop_after", 0))]
    log = open(args.out / f"{variant}_s{seed}.log", "w")
    return subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def final_losses(run: Path) -> tuple[float, float]:
    """(validation loss at the last step, train main loss averaged over the last 10 steps)."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    valid = [r["valid_loss"] for r in rows if r.get("valid_loss") is not None]
    train = [r["main_loss"] for r in rows if "main_loss" in r]
    return valid[-1], statistics.mean(train[-10:])


def finished(run: Path, steps: int) -> bool:
    """Whether the run reached `steps` and validated there (a rerun with more seeds or variants keeps it)."""
    metrics = run / "metrics.jsonl"
    return metrics.exists() and any(r.get("step") == steps and r.get("valid_loss") is not None
                                    for r in map(json.loads, metrics.read_text().splitlines()))


def summarise(out: Path, variants: list[str], seeds: list[int]) -> None:
    runs = {(v, s): final_losses(out / f"{v}_s{s}") for v in variants for s in seeds if (out / f"{v}_s{s}").exists()}
    rows = map(json.loads, (out / f"bf16_s{seeds[0]}" / "metrics.jsonl").read_text().splitlines())
    first_train = next(r for r in rows if "main_loss" in r)
    print(f"bf16 seed {seeds[0]}: main loss {first_train['main_loss']:.3f} at step {first_train['step']}")
    print(f"{'variant':18s} " + "  ".join(f"seed {s}" for s in seeds) + "    mean   (final validation loss)")
    for v in variants:
        cells = [f"{runs[(v, s)][0]:6.4f}" if (v, s) in runs else "  --  " for s in seeds]
        mean = statistics.mean(runs[(v, s)][0] for s in seeds if (v, s) in runs)
        print(f"{v:18s} " + "  ".join(cells) + f"   {mean:.4f}")
    print(f"\nrelative difference to bf16, same seed (%), validation / train main loss of the last 10 steps; "
          f"the report: within {REPORT_BOUND} %")
    bf16_spread = [100 * (runs[("bf16", s)][0] / statistics.mean(runs[("bf16", t)][0] for t in seeds) - 1)
                   for s in seeds]
    print(f"  bf16 seed-to-seed: validation loss {min(bf16_spread):+.3f} .. {max(bf16_spread):+.3f} % around its mean")
    for v in variants[1:]:
        done = [s for s in seeds if (v, s) in runs]
        rel = [100 * (runs[(v, s)][0] / runs[("bf16", s)][0] - 1) for s in done]
        rel_train = [100 * (runs[(v, s)][1] / runs[("bf16", s)][1] - 1) for s in done]
        spread = f" ± {statistics.stdev(rel):.3f} (std over seeds)" if len(rel) > 1 else ""
        print(f"  {v:16s} validation {statistics.mean(rel):+.3f}{spread} [" + ", ".join(f"{x:+.3f}" for x in rel)
              + f"]   train {statistics.mean(rel_train):+.3f} [" + ", ".join(f"{x:+.3f}" for x in rel_train) + "]")
        if len(rel) > 2:
            low, high = bootstrap_interval(rel)
            verdict = "inside" if -REPORT_BOUND <= low and high <= REPORT_BOUND else "not inside"
            print(f"  {'':16s} mean {statistics.mean(rel):+.3f} %, median {statistics.median(rel):+.3f} %, standard "
                  f"error {statistics.stdev(rel) / len(rel) ** 0.5:.3f}; 95 % bootstrap interval of the mean "
                  f"[{low:+.3f}, {high:+.3f}] %: {verdict} ±{REPORT_BOUND} %")


def bootstrap_interval(values: list[float], resamples: int = 10000, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean over seeds (resampled with a fixed generator: the same bits each
    run)."""
    import random

    rng = random.Random(0)
    means = sorted(statistics.mean(rng.choices(values, k=len(values))) for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[int((1 - tail) * resamples) - 1]


def plot_curves(out: Path, variants: list[str], seeds: list[int], path: Path) -> None:
    """Train main loss per step (a 10-step running mean), one line per run, coloured by variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, v in enumerate(variants):
        for j, seed in enumerate(seeds):
            metrics = out / f"{v}_s{seed}" / "metrics.jsonl"
            if not metrics.exists():
                continue
            rows = [r for r in map(json.loads, metrics.read_text().splitlines()) if "main_loss" in r]
            loss = [r["main_loss"] for r in rows]
            smooth = [statistics.mean(loss[max(0, k - 9):k + 1]) for k in range(len(loss))]
            ax.plot([r["step"] for r in rows], smooth, color=f"C{i}", alpha=0.7, linewidth=1,
                    label=f"{v} ({len(seeds)} seeds)" if j == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("train main loss (10-step mean)")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def parse_seeds(text: str) -> list[int]:
    """"0,1,2" or "0-39" (inclusive) or a mix: "0-9,20"."""
    seeds = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += range(int(first), int(last or first) + 1)
    return seeds


def run_all(args, todo: list[tuple[str, int]]) -> None:
    """Every (variant, seed) run, `args.parallel` at a time, each in its own process."""
    args.out.mkdir(parents=True, exist_ok=True)
    running: list[subprocess.Popen] = []
    while todo or running:
        while todo and len(running) < args.parallel:
            running.append(launch(args, *todo.pop(0)))
        running[0].wait()
        if running[0].returncode:
            sys.exit(f"a training run failed (exit {running[0].returncode}); see the logs in {args.out}")
        running.pop(0)


def loss(args) -> None:
    seeds = parse_seeds(args.seeds)
    variants = args.variants.split(",")
    if variants[0] != "bf16":
        sys.exit("--variants must start with bf16, the reference")
    if not args.summarise_only:  # the slow FP8 runs first, so the pairs end together; a finished run is kept
        todo = [(v, s) for v in variants[::-1] for s in seeds]
        run_all(args, [(v, s) for v, s in todo if not finished(args.out / f"{v}_s{s}", args.steps)])
    summarise(args.out, variants, seeds)
    if args.plot:
        plot_curves(args.out, variants, seeds, args.plot)


# ------------------------------------------------------------------------------ loss spikes in the warm-up


def spike_steps(losses: list[float], threshold: float, window: int = 5) -> list[tuple[int, float]]:
    """(step, jump) where losses[step - 1] exceeds the lowest of the `window` losses before it by jump > threshold."""
    jumps = [(k + 1, losses[k] - min(losses[max(0, k - window):k])) for k in range(1, len(losses))]
    return [(step, jump) for step, jump in jumps if jump > threshold]


def fisher_exact(a: int, n_a: int, b: int, n_b: int) -> float:
    """Two-sided p-value of Fisher's exact test for a of n_a against b of n_b: the probability, with the margins
    fixed, of a table no more likely than the one seen."""
    total, k = n_a + n_b, a + b
    def prob(x: int) -> float:
        return math.comb(n_a, x) * math.comb(n_b, k - x) / math.comb(total, k)
    seen = prob(a)
    return min(1.0, sum(p for x in range(max(0, k - n_b), min(k, n_a) + 1) if (p := prob(x)) <= seen * (1 + 1e-9)))


def spikes(args) -> None:
    seeds, variants = parse_seeds(args.seeds), ["bf16", "fp8"]

    def losses(v: str, seed: int) -> list[float]:
        metrics = args.out / f"{v}_s{seed}" / "metrics.jsonl"
        rows = map(json.loads, metrics.read_text().splitlines()) if metrics.exists() else []
        return [r["main_loss"] for r in rows if "main_loss" in r]

    # a run already there (a rerun with more seeds) is not run again
    run_all(args, [(v, s) for v in variants[::-1] for s in seeds if len(losses(v, s)) < args.stop_after])
    print(f"loss spikes in the first {args.stop_after} steps of a {args.steps}-step schedule (warm-up "
          f"{max(args.steps // 10, 1)} steps): main loss > {args.threshold} nats above the lowest of the 5 before")
    counts = {}
    for v in variants:
        spiking = {s: x for s in seeds if (x := spike_steps(losses(v, s), args.threshold))}
        counts[v] = len(spiking)
        print(f"  {v:5s} {len(spiking)} of {len(seeds)} seeds: " + "; ".join(
            f"seed {s} at " + ", ".join(f"step {step} (+{jump:.2f})" for step, jump in x) for s, x in spiking.items()))
    p = fisher_exact(counts["fp8"], len(seeds), counts["bf16"], len(seeds))
    print(f"  FP8 {counts['fp8']}/{len(seeds)} against BF16 {counts['bf16']}/{len(seeds)}: Fisher's exact test, "
          f"two-sided p = {p:.3f}")


def spike_origin(args) -> None:
    import torch

    from sourcelm.config import load_config
    from sourcelm.kernels import ops
    from sourcelm.train.executor import model_inputs
    from sourcelm.train.loop import Trainer
    from sourcelm.train.lr_schedule import global_batch_size

    if args.spike < 3:
        sys.exit(f"--spike {args.spike}: must be 3 or later (the run trains to two steps before the spike)")
    torch.set_num_threads(1)

    def trainer(variant: str, run_dir: Path) -> Trainer:
        fp8 = "off" if variant == "bf16" else "emulate"
        return Trainer(load_config(args.preset, overrides(args.tokens, args.steps, args.seed, fp8)), run_dir,
                       progress=False)

    def loss_on_next_batch(t: Trainer) -> float:
        """Main loss, with the weights as they are, of the batch the next step would train on; in BF16 whichever
        precision the step took, so that only the step differs."""
        s, q = t.state, t.quantum
        losses = []
        with torch.no_grad(), t._compute(), ops.linear_precision("off"):
            for m in range(global_batch_size(s.step, t.cfg.schedule, q) // q):
                inputs, labels, _ = model_inputs(t.train_data.batch(s.consumed_samples + m * q, q, 0, 1))
                losses.append(t.model(inputs, labels=labels, return_logits=False).main_loss.item())
        return statistics.mean(losses)

    base = trainer("fp8", args.out / "fp8_base")
    for _ in range(args.spike - 2):
        record = base.train_step()
    checkpoint = base.save()
    print(f"seed {args.seed}: FP8 to step {args.spike - 2} (main loss {record['main_loss']:.3f}); from there")
    for variant in ("fp8", "bf16"):
        t = trainer(variant, args.out / f"step_{variant}")
        assert t.resume(checkpoint)
        record = t.train_step()
        print(f"  step {args.spike - 1} in {variant:4s}: main loss {record['main_loss']:.3f}, gradient norm "
              f"{record['grad_norm']:.3f}; then the main loss on step {args.spike}'s batch {loss_on_next_batch(t):.3f}")


# ------------------------------------------------------------------------------ speed (CUDA: the MFU row)


def speed_worker(args) -> None:
    """One timed run in this process: `sourcelm`'s trainer on random tokens; prints the peak device memory."""
    import torch

    from sourcelm.config import load_config
    from sourcelm.train.loop import Trainer

    overrides = [f"data.train=['{args.tokens}']", f"train.device={args.device}", "train.dtype=bfloat16",
                 f"train.fp8={args.fp8}", f"schedule.micro_batch={args.batch}", f"schedule.global_batch={args.batch}",
                 f"schedule.steps={args.steps + 100}", "logging.valid_every=0", "logging.tensorboard=false",
                 "logging.progress=false", "checkpoint.every=100000"]
    Trainer(load_config(args.preset, overrides), args.run_dir, progress=False).fit(stop_after=args.steps)
    peak = torch.cuda.max_memory_allocated() if args.device == "cuda" else float("nan")
    print(json.dumps({"peak_device_bytes": peak}))


def speed(args) -> None:
    """tokens/s, MFU and peak device memory of FP8 against BF16 on one device, the `small` preset on random tokens:
    the variants alternate for --rounds rounds, each a fresh process; medians over the timed steps (after
    --warmup) of every round. On a CPU the FP8 variant is the emulation (its cost, not FP8's speed). A variant
    whose run fails is reported with its error and left out; the other's figures still print (exit status 1)."""
    import tempfile

    from sourcelm.config import load_config
    from sourcelm.plan.measure import write_token_shard

    fp8 = "cuda" if args.device == "cuda" else "emulate"
    cfg = load_config(args.preset)
    rows: dict[str, list[dict]] = {"off": [], fp8: []}
    peaks: dict[str, float] = {}
    failed: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = write_token_shard(Path(tmp), cfg.model.vocab_size,
                                 tokens=2 * (args.steps + 1) * args.batch * cfg.data.seq_len)
        for r in range(args.rounds):
            for variant in rows:
                run = Path(tmp) / f"{variant}_{r}"
                cmd = [sys.executable, __file__, "speed-worker", "--tokens", str(data), "--device", args.device,
                       "--fp8", variant, "--preset", args.preset, "--batch", str(args.batch), "--steps",
                       str(args.steps), "--run-dir", str(run)]
                out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
                if out.returncode:
                    failed[variant] = f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}"
                    continue
                peaks[variant] = json.loads(out.stdout.strip().splitlines()[-1])["peak_device_bytes"]
                recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
                rows[variant] += [x for x in recs if "step_time" in x][args.warmup:]
    print(f"{args.preset} preset on {args.device}, batch {args.batch}, bf16 autocast; medians over "
          f"{args.rounds} rounds x {args.steps - args.warmup} timed steps")
    med = {v: {k: statistics.median(x[k] for x in rs) for k in ("tokens_per_s", "mfu", "step_time")}
           for v, rs in rows.items() if v not in failed}
    for v, m in med.items():
        memory = f"   peak device memory {peaks[v] / 2**30:.2f} GiB" if args.device == "cuda" else ""
        print(f"  fp8={v:8s} {m['tokens_per_s']:10.0f} tokens/s   MFU {100 * m['mfu']:5.1f} %   step "
              f"{m['step_time'] * 1e3:7.1f} ms{memory}")
    if failed:
        sys.exit("\n".join(failed.values()))
    print(f"  FP8 / BF16 tokens/s: {med[fp8]['tokens_per_s'] / med['off']['tokens_per_s']:.2f}")


# ------------------------------------------------------------------------------ activation memory


def saved_bytes(layer, run) -> dict:
    """Bytes of the tensors autograd keeps for backward while `run()` runs `layer` forward: each storage once,
    the layer's parameters (and views of them) left out. The FP8 linear's saved E4M3 tiles and their fp32 scales
    count as what they are."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    seen: dict[int, tuple[int, str]] = {}  # storage -> (bytes, dtype)

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            size = max(seen.get(storage.data_ptr(), (0, ""))[0], storage.nbytes())
            seen[storage.data_ptr()] = (size, str(t.dtype).removeprefix("torch."))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    by_dtype: dict[str, int] = {}
    for size, dtype in seen.values():
        by_dtype[dtype] = by_dtype.get(dtype, 0) + size
    return by_dtype


def memory(args) -> None:
    import torch

    from sourcelm.config import load_config
    from sourcelm.kernels import ops
    from sourcelm.model import build_model

    # BF16 runs flash attention too (sdpa, the GPU's kernel): FP8 always does (`fp8_attention`), and the CPU's
    # default "bmm" kernel would keep the probabilities, crediting FP8 with the kernel's choice
    cfg = load_config(args.preset, ["model.num_nextn_predict_layers=0", f"model.attn_impl={args.attn_impl}"])
    model = build_model(cfg.model, seed=0)
    tokens = args.batch * cfg.data.seq_len
    ids = torch.randint(0, cfg.model.vocab_size, (args.batch, cfg.data.seq_len),
                        generator=torch.Generator().manual_seed(0))
    print(f"{args.preset} preset, batch {args.batch} × seq {cfg.data.seq_len} = {tokens} tokens, bf16 autocast, "
          f"BF16 attention {args.attn_impl}; bytes autograd saves for backward in one layer's forward (parameters "
          f"excluded)")
    print(f"{'layer':8s} {'kind':5s} {'bf16 MiB':>9s} {'fp8 MiB':>8s} {'fp8/bf16':>8s}  bytes/token bf16 -> fp8   "
          "MiB by dtype, bf16 | fp8")
    for i, layer in enumerate(model.model.layers):
        kind = "MoE" if hasattr(layer.mlp, "experts") else "dense"
        got = {}
        for fp8 in ("off", "emulate"):
            captured = {}

            def pre_hook(module, args_, kwargs, captured=captured):
                captured["args"], captured["kwargs"] = args_, kwargs

            handle = layer.register_forward_pre_hook(pre_hook, with_kwargs=True)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(ids)  # the layer's real inputs (hidden states, RoPE tables, masks)
            handle.remove()
            h = captured["args"][0].detach().requires_grad_(True)
            with ops.linear_precision(fp8), torch.autocast("cpu", dtype=torch.bfloat16):
                got[fp8] = saved_bytes(layer, lambda: layer(h, *captured["args"][1:], **captured["kwargs"]))
        bf16, f8 = sum(got["off"].values()), sum(got["emulate"].values())
        mix = " | ".join(", ".join(f"{d} {b / 2**20:.2f}" for d, b in sorted(got[m].items()))
                         for m in ("off", "emulate"))
        print(f"{i:<8d} {kind:5s} {bf16 / 2**20:9.2f} {f8 / 2**20:8.2f} {f8 / bf16:8.3f}  {bf16 / tokens:.0f} -> "
              f"{f8 / tokens:.0f}   {mix}")


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="what", required=True)
    lo = sub.add_parser("loss")
    lo.add_argument("--tokens", type=Path, required=True, help="token dir with train/ and valid/ (tokenizer/ beside)")
    lo.add_argument("--out", type=Path, required=True)
    lo.add_argument("--preset", default="tiny")
    lo.add_argument("--steps", type=int, default=80)
    lo.add_argument("--seeds", default="0,1,2")
    lo.add_argument("--variants", default="bf16,fp8", help="bf16 first; then fp8 and/or fp8-no-" + "|".join(CLASSES))
    lo.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    lo.add_argument("--summarise-only", action="store_true")
    lo.add_argument("--plot", type=Path, help="also draw the train loss curves to this PNG")
    sk = sub.add_parser("spikes")
    sk.add_argument("--tokens", type=Path, required=True, help="token dir with train/ and valid/ (tokenizer/ beside)")
    sk.add_argument("--out", type=Path, required=True)
    sk.add_argument("--preset", default="tiny")
    sk.add_argument("--steps", type=int, default=400, help="the schedule's length (its warm-up is a tenth)")
    sk.add_argument("--stop-after", type=int, default=40, help="steps each run trains")
    sk.add_argument("--seeds", default="0-39")
    sk.add_argument("--threshold", type=float, default=1.0, help="nats above the 5 steps before that make a spike")
    sk.add_argument("--parallel", type=int, default=2, help="runs at a time (one thread each)")
    w = sub.add_parser("worker")
    for name, kind in (("--variant", str), ("--seed", int), ("--tokens", Path), ("--steps", int), ("--preset", str),
                       ("--run-dir", Path)):
        w.add_argument(name, type=kind, required=True)
    w.add_argument("--stop-after", type=int, default=0, help="train this many steps of the schedule (0: all)")
    so = sub.add_parser("spike-origin")
    so.add_argument("--tokens", type=Path, required=True, help="token dir with train/ and valid/ (tokenizer/ beside)")
    so.add_argument("--out", type=Path, required=True)
    so.add_argument("--preset", default="tiny")
    so.add_argument("--steps", type=int, default=400, help="the schedule's length, as the spiking run's")
    so.add_argument("--seed", type=int, required=True)
    so.add_argument("--spike", type=int, required=True, help="the step whose loss spiked in the FP8 run")
    me = sub.add_parser("memory")
    me.add_argument("--preset", default="tiny")
    me.add_argument("--batch", type=int, default=8)
    me.add_argument("--attn-impl", default="sdpa", help="the BF16 side's attention kernel (FP8 runs flash attention)")
    sp = sub.add_parser("speed")
    sp.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    sp.add_argument("--preset", default="small")
    sp.add_argument("--batch", type=int, default=8)
    sp.add_argument("--steps", type=int, default=30)
    sp.add_argument("--warmup", type=int, default=10)
    sp.add_argument("--rounds", type=int, default=2)
    sw = sub.add_parser("speed-worker")
    for name, kind in (("--tokens", Path), ("--device", str), ("--fp8", str), ("--preset", str), ("--batch", int),
                       ("--steps", int), ("--run-dir", Path)):
        sw.add_argument(name, type=kind, required=True)
    args = p.parse_args()
    if args.what in ("worker", "speed-worker", "spike-origin"):
        sys.path.insert(0, str(ROOT))
    {"loss": loss, "spikes": spikes, "spike-origin": spike_origin, "worker": worker, "memory": memory, "speed": speed,
     "speed-worker": speed_worker}[args.what](args)


if __name__ == "__main__":
    main()
