"""The training loop: token windows in, checkpoints and metrics out.

One optimizer step, as the report trains:
  1. the global batch (size from the ramp) is cut into micro-batches; each rank runs its slice of
     each micro-batch forward and backward with loss = main + λ·MTP + α·balance, scaled by
     1 / (micro-batches × data-parallel ranks), in the order its context's executor defines
     (`executor.py`);
  2. gradients are summed over ranks (see `context.py`, `distributed.py`), the expert counts over the
     whole global batch likewise;
  3. a non-finite loss or gradient norm skips the step (counted, logged; after
     `train.max_bad_steps` in a row the run checkpoints and stops);
  4. gradients are clipped to global norm 1.0, AdamW steps with the scheduled LR, and the load
     balancer moves the expert biases with the scheduled γ.
Everything that determines the next step — weights, moments, step and sample counters, biases,
RNG — is in the checkpoint, so a resumed run continues bit-identically on CPU.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sourcelm.artifacts import atomic_write_bytes
from sourcelm.config import Config, check_batch_layout
from sourcelm.kernels import ops
from sourcelm.kernels.fp8 import check_fp8_setting
from sourcelm.kernels.hardware import resolve_device, resolve_dtype
from sourcelm.train import checkpoint as ckpt
from sourcelm.train.balancer import LoadBalancer
from sourcelm.train.context import SingleProcess
from sourcelm.train.device import collect_between_steps, keep_freed_cpu_memory
from sourcelm.train.executor import StepWork
from sourcelm.train.init_from import BASE_MANIFEST
from sourcelm.train.lr_schedule import (
    Progress,
    bias_update_speed,
    global_batch_size,
    learning_rate,
    mtp_weight,
    samples_before,
)
from sourcelm.train.metrics import MetricsLogger, device_peak_flops
from sourcelm.train.optim import ComputeCopies, FlatAdamW

log = logging.getLogger("sourcelm.train")


class TooManyBadSteps(RuntimeError):
    pass


@dataclass
class TrainState:
    step: int = 0  # optimizer steps completed
    consumed_samples: int = 0
    consumed_tokens: int = 0
    bad_in_row: int = 0
    skipped_steps: int = 0
    # each step's loss since the last checkpoint (None: skipped, non-finite), saved with the next one: the trajectory
    # a replay of that segment is compared with, step by step (provenance/segment_check.py)
    segment_losses: list = field(default_factory=list)


class Trainer:
    def __init__(self, cfg: Config, run_dir: str | Path, ctx=None, progress: bool | None = None, base=None):
        """base: the weights to start from instead of an initialisation (`init_from.BaseWeights`), or None."""
        from sourcelm.model import build_model
        from sourcelm.model.flops import model_stats

        self.cfg, self.run_dir, self.ctx = cfg, Path(run_dir), ctx or SingleProcess()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.show_progress = cfg.logging.progress if progress is None else progress
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
        # recorded resolved: config.json and every checkpoint name the dtype this run computes in
        cfg.train.dtype = resolve_dtype(cfg.train.dtype, self.device)
        # fails at once if unusable
        log.info("linear layers: %s", check_fp8_setting(cfg.train.fp8, self.device, cfg.train.dtype))
        # built and initialised on the CPU (the same bits on every device), then moved
        if base is None:
            self.model = self.ctx.prepare_model(build_model(cfg.model, seed=cfg.seed)).to(self.device)
        else:  # continued training: each rank reads only the part of the checkpoint it holds (`init_from.py`)
            self.model = base.build_model(cfg.model, self.ctx, self.device)
        self.executor = self.ctx.executor()  # runs each step's micro-batches (`executor.py`)
        if cfg.train.compile:  # after any expert-parallel swap; names and parameters are unchanged
            self.model.compile_blocks(getattr(torch, cfg.train.dtype))
        named = list(self.model.named_parameters())
        self.expert_params = [(n, p) for n, p in named if self.ctx.is_expert_param(n)]
        self.dense_params = [(n, p) for n, p in named if not self.ctx.is_expert_param(n)]
        o = cfg.optim
        self.dtype = getattr(torch, cfg.train.dtype)
        # bf16 compute: the matmul weights get bf16 copies the update writes (`optim.py`, where the kernels run)
        copies = self.model.matmul_weights() if self.dtype == torch.bfloat16 else []
        moments = getattr(torch, o.state_dtype)  # fp32, or bf16 as the report keeps them
        self.dense_opt = FlatAdamW(self.dense_params, o.betas, o.eps, o.weight_decay,
                                   group=self.ctx.zero_group if cfg.parallel.zero1 else None, copies=copies,
                                   state_dtype=moments)
        self.expert_opt = FlatAdamW(self.expert_params, o.betas, o.eps, o.weight_decay, copies=copies,
                                    state_dtype=moments)
        self.compute_copies = ComputeCopies(self.model, self.dense_opt, self.expert_opt)
        log.info("AdamW update: %s; bf16 compute copies of %d of %d parameters (the matmul weights; none unless the "
                 "kernel runs and the compute dtype is bf16)", "the native CPU kernel" if self.dense_opt.native else
                 "torch's fused kernel (no native kernel on this device)", len(self.compute_copies.slots), len(named))
        self.balancer = LoadBalancer(self.ctx.moe_layers(self.model))
        self.train_data, self.valid_data = self.open_data()
        self.quantum = check_batch_layout(cfg, self.ctx.dp_world)
        self.total_tokens = samples_before(cfg.schedule.steps, cfg.schedule, self.quantum) * cfg.data.seq_len
        # the model FLOPs of one training token, MTP included (formula in sourcelm.model.flops)
        self.flops_per_token = model_stats(cfg.model, cfg.data.seq_len, cfg.train.dtype)["train_flops_per_token"]
        self.state = TrainState()
        self.metrics = MetricsLogger(self.run_dir, cfg.logging.tensorboard, enabled=self.ctx.is_main)
        # the job's peak: every rank's device (or, on a CPU, its share of the cores) probed alike
        rank_peak, self.peak_source = self._peak()
        self.peak_flops = rank_peak * self.ctx.world
        if self.ctx.world > 1:
            self.peak_source += f", × {self.ctx.world} ranks"
        # the token shards behind the training and the validation loss, pinned by their manifests
        self.inputs = [Path(p) / "manifest.json" for p in [*cfg.data.train, *cfg.data.valid]]
        self.inputs.append(self.run_dir / BASE_MANIFEST)  # the checkpoint a continued run started from, if any

    def open_data(self):
        """(training data, validation data or None): token windows (`TokenWindows`); SFT gives its own (`sft.py`)."""
        from sourcelm.tokens.loader import TokenWindows

        d = self.cfg.data
        train = TokenWindows(d.train, d.seq_len, d.seed, split="train", valid_fraction=d.valid_fraction,
                             mixture=d.mixture)
        valid = (TokenWindows(d.valid, d.seq_len, d.seed, split="valid", valid_fraction=d.valid_fraction)
                 if d.valid else None)
        return train, valid

    def checkpoint_extras(self) -> dict:
        """More entries for each checkpoint's state.json (SFT: the tokenizer that `sourcelm export` copies)."""
        return {}

    def _peak(self) -> tuple[float, str]:
        """The device peak, probed once per run directory and recorded (a resumed run reuses it)."""
        path = self.run_dir / "peak_flops.json"
        if path.exists():
            d = json.loads(path.read_text())
            return d["peak_flops"], d["source"]
        peak, source = device_peak_flops(self.device, self.dtype)
        if self.ctx.is_main:
            atomic_write_bytes(path, (json.dumps({"peak_flops": peak, "source": source}) + "\n").encode())
        return peak, source

    # ------------------------------------------------------------------------------ checkpoints
    @property
    def ckpt_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save(self) -> Path | None:
        s = self.state
        losses, s.segment_losses = s.segment_losses, []
        model_state = {k: v.cpu() for k, v in self.ctx.full_model_state(self.model).items()}
        optim_state = self.ctx.full_optimizer_state(self.dense_opt.state_dict(), self.expert_opt.state_dict())
        if not self.ctx.is_main:
            self.ctx.barrier()
            return None
        previous = ckpt.list_checkpoints(self.ckpt_root)
        path = ckpt.save_checkpoint(
            self.ckpt_root, s.step, model_state, optim_state,
            state={
                "step": s.step, "consumed_samples": s.consumed_samples, "consumed_tokens": s.consumed_tokens,
                "bad_in_row": s.bad_in_row, "skipped_steps": s.skipped_steps,
                "optimizer_step": self.dense_opt.step_count,
                "loader": self.train_data.state(), "rng": ckpt.rng_state(), "config": self.cfg.to_dict(),
                "layout": self.ctx.description, "launch": self.ctx.launch, "segment_losses": losses,
                **self.checkpoint_extras(),
            },
            keep=self.cfg.checkpoint.keep,
            manifest_inputs=self.inputs + ([previous[-1] / "manifest.json"] if previous else []))
        log.info("checkpoint %s", path)
        self.ctx.barrier()
        return path

    def resume(self, path: Path | None = None) -> bool:
        path = path or ckpt.newest_valid_checkpoint(self.ckpt_root)
        if path is None:
            return False
        model_t, optim_t, st = ckpt.load_checkpoint(path)
        self.ctx.load_model_state(self.model, model_t)
        optim_t = self.ctx.local_optimizer_state(optim_t)
        self.dense_opt.load_state_dict(optim_t, st["optimizer_step"])
        self.expert_opt.load_state_dict(optim_t, st["optimizer_step"])
        self.dense_opt.refresh_copies()  # the masters were just loaded
        self.expert_opt.refresh_copies()
        self.train_data.load_state(st["loader"])
        ckpt.set_rng_state(st["rng"])
        self.state = TrainState(st["step"], st["consumed_samples"], st["consumed_tokens"], st["bad_in_row"],
                                st["skipped_steps"])
        log.info("resumed from %s (step %d, written by %s)", path, st["step"], st.get("layout", "?"))
        return True

    # ------------------------------------------------------------------------------ one step
    @contextlib.contextmanager
    def _compute(self):
        """Autocast to the compute dtype, on the optimizers' compute copies of the matmul weights, with the linear
        layers in FP8 when `train.fp8` says so."""
        with self.compute_copies, ops.linear_precision(self.cfg.train.fp8):
            if self.dtype == torch.float32:
                yield
            else:
                with torch.autocast(device_type=self.device.type, dtype=self.dtype):
                    yield

    def _fold_grads(self) -> None:
        self.dense_opt.fold_grads()
        self.expert_opt.fold_grads()

    def _zero_grad(self) -> None:
        self.dense_opt.zero_grad()
        self.expert_opt.zero_grad()

    def train_step(self) -> dict:
        cfg, s, ctx = self.cfg, self.state, self.ctx
        gb = global_batch_size(s.step, cfg.schedule, self.quantum)
        prog = Progress(s.step, s.consumed_tokens, self.total_tokens)
        lr, lam = learning_rate(prog, cfg.schedule, cfg.optim), mtp_weight(prog, cfg.schedule)
        gamma = bias_update_speed(prog, cfg.schedule)
        n_micro = gb // self.quantum

        def batch(m: int) -> torch.Tensor:
            start = s.consumed_samples + m * self.quantum
            return self.train_data.batch(start, self.quantum, ctx.dp_rank, ctx.dp_world).to(self.device)

        result = self.executor.run(self.model, StepWork(
            n_micro=n_micro, batch=batch, loss_scale=1.0 / (n_micro * ctx.dp_world), mtp_weight=lam,
            compute=self._compute, fold_grads=self._fold_grads))
        self.balancer.accumulate(result.expert_counts)
        ctx.reduce_gradients(self.dense_opt, self.expert_opt)
        counts = ctx.sum_tensor(self.balancer.take())
        parts = ctx.sum_tensor(result.loss_parts)  # loss, main, mtp, balance (sums of rank means)
        grad_norm = float(ctx.global_grad_sq(self.dense_opt.grad_sq_sum(), self.expert_opt.grad_sq_sum()).sqrt())
        record = {"step": s.step + 1, "lr": lr, "mtp_weight": lam, "bias_update_speed": gamma, "global_batch": gb,
                  "loss": float(parts[0]), "main_loss": float(parts[1]), "mtp_loss": float(parts[2]),
                  "balance_loss": float(parts[3]), "grad_norm": grad_norm}
        if not (math.isfinite(record["loss"]) and math.isfinite(grad_norm)):
            self._zero_grad()
            s.bad_in_row += 1
            s.skipped_steps += 1
            record["skipped"] = True
            log.warning("step %d: non-finite loss %.4g / grad norm %.4g; step skipped (%d in a row)",
                        s.step + 1, record["loss"], grad_norm, s.bad_in_row)
        else:
            s.bad_in_row = 0
            clip = min(1.0, cfg.optim.grad_clip / (grad_norm + 1e-6)) if cfg.optim.grad_clip > 0 else 1.0
            self.dense_opt.step(lr, clip)
            self.expert_opt.step(lr, clip)
            self._zero_grad()
            record.update(self.balancer.update(counts, gamma))
            record["expert_load"] = counts.tolist()
        s.segment_losses.append(None if record.get("skipped") else record["loss"])
        s.step += 1
        s.consumed_samples += gb
        s.consumed_tokens += gb * cfg.data.seq_len
        record["consumed_tokens"] = s.consumed_tokens
        record.update(ctx.stats())
        record.update(ctx.per_rank(self.executor.stats()))  # the pipeline's timings and memory, per rank
        if s.bad_in_row >= cfg.train.max_bad_steps:
            self.metrics.log(record)
            path = self.save()  # past the bad batches, so a resume does not replay them
            raise TooManyBadSteps(
                f"{s.bad_in_row} non-finite steps in a row at step {s.step}; stopped. Checkpoint {path} holds the "
                f"last good weights. Lower optim.lr, check the data, or raise train.max_bad_steps.")
        return record

    @torch.no_grad()
    def validate(self) -> dict | None:
        """{"valid_loss", "valid_loss_by_source", "valid_tokens_by_source"} over the same valid_batches ×
        global_batch windows whatever the layout. Each target token's loss counts for the source of the document
        that token belongs to (a window may span documents of several sources), so the per-source losses weighted
        by their token counts sum to the overall loss."""
        if self.valid_data is None:
            return None
        from sourcelm.train.metrics import source_loss_sums

        self.model.eval()
        names = self.valid_data.source_names
        sums = torch.zeros(len(names), 2, dtype=torch.float64, device=self.device)
        gb = self.cfg.schedule.global_batch
        for start in range(0, self.cfg.logging.valid_batches * gb, self.quantum):
            batch = self.valid_data.batch(start, self.quantum, self.ctx.dp_rank, self.ctx.dp_world).to(self.device)
            sources = self.valid_data.batch_sources(start, self.quantum, self.ctx.dp_rank, self.ctx.dp_world)
            # the main stack only (no MTP in the valid loss), through the pipeline where there is one
            h = self.executor.final_hidden(self.model, batch, self._compute)
            if h is None:  # a pipeline rank that does not hold the head
                continue
            with self._compute():
                sums += source_loss_sums(h, self.model.lm_head.weight, batch[:, 1:], sources[:, 1:].to(self.device),
                                         len(names), self.model.ce_chunk)
        self.model.train()
        sums = self.ctx.sum_tensor(sums).cpu()
        seen = [i for i in range(len(names)) if sums[i, 1] > 0]
        return {"valid_loss": float(sums[:, 0].sum() / sums[:, 1].sum()),
                "valid_loss_by_source": {names[i]: float(sums[i, 0] / sums[i, 1]) for i in seen},
                "valid_tokens_by_source": {names[i]: int(sums[i, 1]) for i in seen}}

    # ------------------------------------------------------------------------------ the run
    def fit(self, stop_after: int | None = None) -> TrainState:
        """Trains to `schedule.steps` (or `stop_after` more steps), checkpointing on the way."""
        cfg, s = self.cfg, self.state
        # memory per rank: ZeRO-1 shards the dense moments, EP shards the experts and theirs
        copies = self.dense_opt.flat_copy.numel() + self.expert_opt.flat_copy.numel()  # bf16 compute copies
        memory = {"param_bytes_per_rank":
                  sum(p.numel() * p.element_size() for p in self.model.parameters()) + 2 * copies,
                  "optimizer_state_bytes_per_rank": self.dense_opt.memory_bytes() + self.expert_opt.memory_bytes()}
        if self.ctx.is_main:
            atomic_write_bytes(self.run_dir / "config.json", (cfg.to_json() + "\n").encode())
            log.info("training DeepSeek-V3 on %s; peak %.3g FLOP/s (%s); per rank: %.1f MB parameters, %.1f MB "
                     "optimizer state", self.ctx.description, self.peak_flops, self.peak_source,
                     memory["param_bytes_per_rank"] / 1e6, memory["optimizer_state_bytes_per_rank"] / 1e6)
            self.metrics.log({"kind": "meta", "peak_flops": self.peak_flops, "peak_source": self.peak_source,
                              "flops_per_token": self.flops_per_token, "layout": self.ctx.description, **memory})
        end = cfg.schedule.steps if stop_after is None else min(cfg.schedule.steps, s.step + stop_after)
        bar = _ProgressBar(end, s.step, enabled=self.show_progress and self.ctx.is_main)
        with bar, collect_between_steps(cfg.train.gc_every) as collect:
            while s.step < end:
                t0 = time.perf_counter()
                record = self.train_step()
                checkpointed = s.step % cfg.checkpoint.every == 0 or s.step == cfg.schedule.steps
                collect(s.step, checkpointed)
                dt = time.perf_counter() - t0
                tokens = record["global_batch"] * cfg.data.seq_len
                record.update(step_time=dt, tokens_per_s=tokens / dt,
                              model_flops_per_s=tokens * self.flops_per_token / dt)
                record["mfu"] = record["model_flops_per_s"] / self.peak_flops
                if cfg.logging.valid_every and (s.step % cfg.logging.valid_every == 0 or s.step == cfg.schedule.steps):
                    record.update(self.validate() or {"valid_loss": None})
                    self.ctx.stats()  # validation's all-to-all bytes are not the next step's
                if s.step % cfg.logging.every == 0 or s.step == end:
                    self.metrics.log(record)
                bar.update(s.step, record)
                if checkpointed:
                    self.save()
        self.metrics.close()
        return s


class _ProgressBar:
    """A rich progress bar with loss, tokens/s and ETA (or nothing when disabled)."""

    def __init__(self, total: int, done: int, enabled: bool):
        self.enabled = enabled
        if enabled:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                     TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                     TimeRemainingColumn())
            self.task = self.progress.add_task("train", total=total, completed=done, info="")

    def __enter__(self):
        if self.enabled:
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()

    def update(self, step: int, record: dict) -> None:
        if self.enabled:
            info = f"loss {record['loss']:.3f}  {record['tokens_per_s']:.0f} tok/s"
            self.progress.update(self.task, completed=step, info=info)
