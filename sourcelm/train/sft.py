"""Supervised fine-tuning: `sourcelm sft CONFIG --init-from HF_DIR --data chats.jsonl --run-dir RUN`.

The run is a continued run (`init_from.py`: the model and its weights from HF_DIR, the training sections from
CONFIG, e.g. configs/sft.toml) whose data are conversations instead of token windows:
1. the chats are rendered with HF_DIR's own chat template and tokenised into RUN/sft_data/ (`tokens/chat.py`:
   token ids, the assistant's tokens flagged, a held-out split by hash, a report of the skipped lines, a manifest
   pinning the chat file and the tokenizer by SHA-256). A resumed run reuses that directory when the chat file, the
   template and the settings are the same, and refuses other data once it has checkpoints;
2. `ChatSamples` serves them to the unchanged `Trainer` as `LabelledBatch`es (`executor.py`): sample i is
   conversation perm_e(i mod n), e = i // n, the permutation drawn from (seed, e), so the order is a pure function of
   (seed, i) as for token windows, and resuming needs only the consumed sample count;
3. each conversation is its own row: padded to seq_len + 1 tokens (cut there when longer), labels -100 everywhere
   but where the next token is the assistant's, the padding masked out of the expert counts and balance loss.

Why padding and not packing: the attention backends (`kernels.ops.causal_attention`) are causal-only, with no
document mask; packed conversations would attend to one another. A padded row is exact: with causal attention no
real token sees the padding after it, so a conversation's loss is the same alone or in a batch (tested). The cost is
the compute spent on padding; keep data.seq_len near the longest conversations (the report's token counts help).

It runs in pretraining's layouts (expert, data and pipeline parallel; tests/train/test_sft_parallel.py), one rank a
process under torchrun: `torchrun --nproc-per-node N -m sourcelm sft ... parallel.ep=N`.

Everything else is pretraining's: checkpoints, bit-identical resume, metrics.jsonl, `sourcelm export` (the state
records HF_DIR as the tokenizer, so the export carries its template), and the provenance chain
(export <- checkpoints <- sft_data manifest <- chat file + tokenizer; <- base_checkpoint <- HF_DIR's files).
The validation loss is the mean loss per assistant token over the held-out conversations.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch
import xxhash

from sourcelm.artifacts import MANIFEST_NAME, sha256_file
from sourcelm.config import ConfigError
from sourcelm.train.executor import LabelledBatch
from sourcelm.train.loop import Trainer

log = logging.getLogger("sourcelm.train")

SFT_DIR = "sft_data"  # under the run directory
_ORDER_TAG = 0x736674  # "sft": keeps this order's random stream apart from the token windows'


class ChatSamples:
    """The conversations of one split file, one per sample row (module doc)."""

    def __init__(self, path: str | Path, seq_len: int, seed: int, pad_id: int):
        from sourcelm.tokens.chat import load_split

        self.tokens, self.assistant, self.offsets = load_split(path)
        self.seq_len, self.seed, self.pad_id = seq_len, int(seed), int(pad_id)
        self.num_conversations = len(self.offsets) - 1
        digest = xxhash.xxh3_64()
        for array in (self.tokens, self.assistant, self.offsets):
            digest.update(np.ascontiguousarray(array).tobytes())
        self.fingerprint = digest.intdigest() & ((1 << 63) - 1)
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_conversations

    def _permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:  # a batch spans at most two epochs at a time
                self._perms.pop(next(iter(self._perms)))
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch, _ORDER_TAG])))
            perm = self._perms[epoch] = rng.permutation(self.num_conversations)
        return perm

    def conversation(self, i: int) -> int:
        """The conversation served at global sample index i."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        epoch, pos = divmod(i, self.num_conversations)
        return int(self._permutation(epoch)[pos])

    def row(self, c: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(inputs [T], labels [T], token mask [T]) of conversation c, padded or cut to T = seq_len; None: all
        padding (no loss, no expert counts), to fill the last validation batch."""
        t = self.seq_len
        ids = np.full(t + 1, self.pad_id, dtype=np.int64)
        mine = np.zeros(t + 1, dtype=bool)
        n = 0
        if c is not None:
            a, b = int(self.offsets[c]), int(self.offsets[c + 1])
            n = min(b - a, t + 1)
            ids[:n], mine[:n] = self.tokens[a:a + n], self.assistant[a:a + n]
        labels = np.where(mine[1:], ids[1:], -100)  # position p predicts token p + 1: a target only if the assistant's
        return ids[:-1], labels, np.arange(t) < n

    def _batch(self, rows: list[int | None]) -> LabelledBatch:
        t = self.seq_len
        inputs, labels, mask = (np.stack(x) for x in zip(*map(self.row, rows))) if rows else (
            np.zeros((0, t), dtype=np.int64), np.zeros((0, t), dtype=np.int64), np.zeros((0, t), dtype=bool))
        return LabelledBatch(torch.from_numpy(inputs), torch.from_numpy(labels), torch.from_numpy(mask))

    def batch(self, start: int, size: int, rank: int = 0, world: int = 1) -> LabelledBatch:
        """This rank's contiguous slice of the global batch of samples start .. start + size - 1."""
        if size % world:
            raise ValueError(f"global batch {size} is not divisible by the data-parallel world {world}")
        per = size // world
        first = start + rank * per
        return self._batch([self.conversation(i) for i in range(first, first + per)])

    def ordered_batch(self, start: int, size: int, rank: int = 0, world: int = 1, limit: int | None = None):
        """As `batch`, but conversations start .. in file order, all-padding rows from `limit` (default: all) on."""
        per = size // world
        first = start + rank * per
        limit = self.num_conversations if limit is None else min(limit, self.num_conversations)
        return self._batch([i if i < limit else None for i in range(first, first + per)])

    def state(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_conversations,
                "fingerprint": self.fingerprint}

    def load_state(self, d: dict) -> None:
        """Checks a saved state against this data; resuming on other data would be silently wrong."""
        for key, value in self.state().items():
            if key in d and int(d[key]) != value:
                raise ValueError(f"loader state mismatch in {key}: checkpoint has {d[key]}, this SFT data has "
                                 f"{value}; resume with the same chats, data.seq_len and data.seed, or a new run")


class SFTTrainer(Trainer):
    """The trainer on an SFT dataset directory (`tokens/chat.py`) instead of token windows."""

    def __init__(self, cfg, run_dir, ctx=None, progress=None, base=None, sft_dir: str | Path | None = None):
        self.sft_dir = Path(sft_dir or Path(run_dir) / SFT_DIR)
        self.sft_manifest = json.loads((self.sft_dir / MANIFEST_NAME).read_text())
        super().__init__(cfg, run_dir, ctx, progress, base)

    def open_data(self):
        d, pad = self.cfg.data, self.sft_manifest["pad_id"]
        valid = self.sft_dir / "valid.safetensors"
        return (ChatSamples(self.sft_dir / "train.safetensors", d.seq_len, d.seed, pad),
                ChatSamples(valid, d.seq_len, d.seed, pad) if valid.is_file() else None)

    def checkpoint_extras(self) -> dict:
        return {"tokenizer_dir": self.sft_manifest["tokenizer_dir"], "sft_data": str(self.sft_dir)}

    @torch.no_grad()
    def validate(self) -> dict | None:
        """{"valid_loss": mean loss per assistant token, "valid_tokens": their number} over the first
        logging.valid_batches × global_batch held-out conversations (all of them when fewer), main stack only,
        through the pipeline where there is one (only the rank holding the head counts tokens and losses)."""
        if self.valid_data is None:
            return None
        from sourcelm.model.loss import linear_cross_entropy

        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        n = min(len(self.valid_data), self.cfg.logging.valid_batches * self.cfg.schedule.global_batch)
        for start in range(0, math.ceil(n / self.quantum) * self.quantum, self.quantum):
            b = self.valid_data.ordered_batch(start, self.quantum, self.ctx.dp_rank, self.ctx.dp_world, limit=n)
            b = b.to(self.device)
            # final_hidden reads token windows [b, T + 1] and runs their first T; the padding mask is left out, as it
            # changes only the expert counts, which validation does not keep
            windows = torch.nn.functional.pad(b.inputs, (0, 1), value=self.valid_data.pad_id)
            h = self.executor.final_hidden(self.model, windows, self._compute)
            if h is None:  # a pipeline rank that does not hold the head
                continue
            with self._compute():
                sums[0] += linear_cross_entropy(h, self.model.lm_head.weight, b.labels,
                                                chunk_fn=self.model.ce_chunk).double()
            sums[1] += (b.labels != -100).sum()
        self.model.train()
        sums = self.ctx.sum_tensor(sums).cpu()
        return {"valid_loss": float(sums[0] / sums[1].clamp_min(1)), "valid_tokens": int(sums[1])}


def prepare_sft_data(run: Path, chats: str | Path, tokenizer_dir: str | Path, max_tokens: int,
                     valid_fraction: float) -> Path:
    """RUN/sft_data built from the chats, or the one already there when it was built from the same file, template
    and settings; other chats in a run with checkpoints are refused (its checkpoints were trained on the old ones)."""
    from sourcelm.tokens.chat import ChatRenderer, build_chat_dataset
    from sourcelm.train.checkpoint import list_checkpoints

    out = run / SFT_DIR
    manifest = out / MANIFEST_NAME
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        same = (m.get("chats_sha256") == sha256_file(chats)
                and m.get("chat_template_sha256") == ChatRenderer(tokenizer_dir).template_sha256
                and m.get("config") == {"max_tokens": max_tokens, "valid_fraction": valid_fraction})
        if same:
            return out
        if list_checkpoints(run / "checkpoints"):
            raise ConfigError(f"--data {chats}: {run} was trained on other chats, template or data.seq_len / "
                              f"--valid-fraction ({manifest}); give a new --run-dir")
    report = build_chat_dataset(chats, tokenizer_dir, out, max_tokens, valid_fraction)
    log.info("SFT data %s: %s conversations (train / valid), %s assistant tokens, %d cut at %d tokens, skipped %s "
             "(lines in %s)", out, report["conversations"], report["assistant_tokens"], report["truncated"],
             max_tokens, report["skipped"] or "none", out / "report.json")
    return out


def sft_main(config: str, overrides: list[str], run_dir: str, init_from: str, data: str,
             valid_fraction: float = 0.05, resume: bool = True, resume_from: str | None = None,
             stop_after: int | None = None, ranks_per_node: int = 0) -> int:
    """The `sourcelm sft` process (one process, or one rank under torchrun or `--nproc`: rank 0 builds the data)."""
    from sourcelm.train.checkpoint import newest_valid_checkpoint
    from sourcelm.train.entry import make_context, setup_logging
    from sourcelm.train.init_from import BaseWeights, record_base, resolve_config
    from sourcelm.train.loop import TooManyBadSteps

    if not 0.0 <= valid_fraction < 1.0:
        raise ConfigError(f"--valid-fraction {valid_fraction}: give a share of the conversations in [0, 1)")
    cfg = resolve_config(config, overrides, init_from)
    if cfg.data.train or cfg.data.valid or cfg.data.mixture:
        raise ConfigError("data.train / data.valid / data.mixture are set, but SFT reads the conversations of --data; "
                          "remove them from the config")
    ctx = make_context(cfg, ranks_per_node)
    run = Path(run_dir)
    setup_logging(run, ctx.rank)
    if ctx.is_main:
        record_base(run, init_from)
        prepare_sft_data(run, data, init_from, cfg.data.seq_len + 1, valid_fraction)
    ctx.barrier()
    cfg.data.train = [str(run / SFT_DIR)]  # its manifest joins every checkpoint's inputs
    resuming = resume_from or (resume and newest_valid_checkpoint(run / "checkpoints") is not None)
    trainer = SFTTrainer(cfg, run, ctx, base=None if resuming else BaseWeights(init_from))
    if resume_from:
        trainer.resume(Path(resume_from))
    elif resume:
        trainer.resume()
    if not resuming and trainer.valid_data is not None:  # the base model's loss, the "before" of this run
        losses = trainer.validate()
        log.info("assistant-token validation loss of the base checkpoint %s: %.4f", init_from, losses["valid_loss"])
        trainer.metrics.log({"kind": "base", "step": 0, **losses})
    try:
        trainer.fit(stop_after=stop_after)
    except TooManyBadSteps as e:
        log.error("%s", e)
        return 3
    if ctx.is_main and trainer.state.step == cfg.schedule.steps:
        from sourcelm.train.plot import plot_run

        plot_run(run)
    return 0
