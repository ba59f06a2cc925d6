"""Continued training from a released checkpoint: `sourcelm train CONFIG --init-from HF_DIR`.

- Config (`resolve_config`): the model section comes from the checkpoint's config.json (the MTP depth
  from what its files hold; routing by the released rule, `group_score_topk` unset), the training
  sections from CONFIG, and the command's `section.key=value` overrides apply last (`model.*` too;
  a changed shape is then named tensor by tensor by the check below). CONFIG's sourcelm-only model
  choices (balance loss α, attention / expert implementations) are kept.
- Provenance (`record_base`): RUN/base_checkpoint/ holds base.json (where the weights came from,
  file sizes) and a manifest whose inputs are every file of the checkpoint with its SHA-256 (and its
  own manifest.json when `sourcelm export` wrote it, so `verify` walks on to the run that made it).
  Every checkpoint of the run links that manifest: weights ← this run ← data + code + base checkpoint.
- Weights (`BaseWeights.build_model`): the files' headers are checked against the model first
  (missing, extra, misshapen tensors, damaged FP8 pairs, all named); then the model is built on the
  meta device, the layout applied (expert parallelism keeps this rank's experts), and only then
  materialised and filled from the files (`hf_reader.py`): no rank ever holds the whole model.
- The optimizer starts fresh (zero moments, step 0) and so does the LR schedule, with its own warmup;
  `configs/continue.toml` holds the defaults for continued pretraining and says why.
A run directory with a base record starts from that base whenever it has no checkpoint to resume.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from torch import nn

from sourcelm.artifacts import MANIFEST_NAME, atomic_write_bytes, write_manifest
from sourcelm.config import Config, ConfigError, ModelConfig, load_config
from sourcelm.train.hf_reader import HFCheckpoint

log = logging.getLogger("sourcelm.train")

BASE_DIR = "base_checkpoint"  # under the run directory
BASE_MANIFEST = f"{BASE_DIR}/{MANIFEST_NAME}"
KEPT_LOCAL_FIELDS = ("balance_loss_alpha", "mtp_loss_weight", "attn_impl", "moe_impl")  # CONFIG's choices


def resolve_config(config: str | Path | dict, overrides: list[str], hf_dir: str | Path) -> Config:
    """CONFIG's training sections + the checkpoint's model + the overrides, validated once."""
    data = load_config(config).to_dict()
    model = dataclasses.asdict(HFCheckpoint(hf_dir).model_config())
    data["model"] = {**model, **{k: data["model"][k] for k in KEPT_LOCAL_FIELDS}, "group_score_topk": None}
    return load_config(data, overrides)


def recorded_base(run_dir: Path) -> Path | None:
    """The checkpoint this run continues from, as its base record names it (None: a run from scratch)."""
    record = run_dir / BASE_DIR / "base.json"
    return Path(json.loads(record.read_text())["source"]) if record.is_file() else None


def record_base(run_dir: Path, hf_dir: str | Path) -> Path:
    """Writes RUN/base_checkpoint/ (once per source: the files are hashed only then); returns its manifest."""
    from sourcelm.train.checkpoint import list_checkpoints

    source = Path(hf_dir).resolve()
    folder = run_dir / BASE_DIR
    previous = recorded_base(run_dir)
    if previous == source and (folder / MANIFEST_NAME).is_file():
        return folder / MANIFEST_NAME
    if previous is not None and list_checkpoints(run_dir / "checkpoints"):
        raise ConfigError(f"--init-from {source}: {run_dir} already continues from {previous} and has checkpoints; "
                          f"give a new --run-dir to start from another checkpoint")
    files = sorted(p for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    record = {"source": str(source), "files": {p.name: p.stat().st_size for p in files}, "format": "hf-deepseek-v3",
              "quantization_config": HFCheckpoint(source).hf_config.get("quantization_config")}
    atomic_write_bytes(folder / "base.json", (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log.info("hashing the %d files of the base checkpoint %s (%.1f MB) for the provenance record", len(files),
             source, sum(record["files"].values()) / 1e6)
    return write_manifest(folder, "base_checkpoint", outputs=["base.json"], inputs=files,
                          extra={"source": str(source)})


class BaseWeights:
    """The weights a continued run starts from: what `Trainer` asks for its model instead of an initialisation."""

    def __init__(self, hf_dir: str | Path):
        self.checkpoint = HFCheckpoint(hf_dir)

    def build_model(self, cfg: ModelConfig, ctx, device: torch.device) -> nn.Module:
        """This rank's model (`ctx.prepare_model`'s layout) holding the checkpoint's values, on `device`."""
        from sourcelm.model import build_model
        from sourcelm.model.norm_rope import RotaryEmbedding

        self.checkpoint.check(cfg)  # every mismatch named before any weight is read
        before = _rss_mb()
        model = ctx.prepare_model(build_model(cfg, seed=None, device="meta"))
        recomputed = set(dict(model.named_buffers())) - set(model.state_dict())
        if recomputed != {"rotary.inv_freq"}:  # non-persistent buffers come from the config, not the files
            raise RuntimeError(f"non-persistent buffers {sorted(recomputed)}: only rotary.inv_freq is rebuilt here")
        # model.to_empty(device), less its empty_like of meta tensors, which runs through torch's decompositions and
        # imports sympy and torch.fx (33 MB, a second) in the middle of the load; buffers are small: real zeros
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                setattr(module, name, torch.zeros(buf.shape, dtype=buf.dtype, device=device))
            for name, p in module.named_parameters(recurse=False):
                setattr(module, name, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device), p.requires_grad))
        model.rotary = RotaryEmbedding(cfg).to(device)
        read = self.checkpoint.load_into(model)
        self.load_stats = {"read_bytes": read, "checkpoint_bytes": self.checkpoint.nbytes,
                           "rank_state_bytes": sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                           "rss_before_mb": before, "peak_rss_mb": _peak_rss_mb()}
        stats = self.load_stats
        log.info("rank %d: read %.1f MB of the %.1f MB checkpoint %s into its %.1f MB of the model; peak RSS %.0f MB "
                 "(%.0f MB before loading)", ctx.rank, read / 1e6, stats["checkpoint_bytes"] / 1e6,
                 self.checkpoint.path, stats["rank_state_bytes"] / 1e6, stats["peak_rss_mb"], before)
        return model


def _status_mb(field: str) -> float:
    """A /proc/self/status memory line in MB (Linux; NaN elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _rss_mb() -> float:
    """The current RSS; also restarts the kernel's peak (VmHWM) from here, so the peak read after the load is the
    load's, not an earlier moment's (Linux: writing 5 to clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_mb("VmRSS")


def _peak_rss_mb() -> float:
    return _status_mb("VmHWM")
