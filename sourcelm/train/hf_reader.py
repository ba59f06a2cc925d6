"""Reading an HF DeepSeek-V3 checkpoint rank by rank, to train from it: only the tensors (and experts) a rank holds.

`load_hf` reads a whole checkpoint into one process; a released model (DeepSeek-V3: 1.3 TB in BF16)
fits no such process. `HFCheckpoint` instead
  - reads the safetensors headers only (names, dtypes, shapes: a few MB for the largest models) and
    checks them against the model the config describes, naming every missing, extra or misshapen
    tensor and every damaged FP8 pair, before any weight is read (`problems`, `check`);
  - fills a model that holds only this rank's part (`load_into`): every tensor of its state dict, and
    for routed experts the slice [expert_offset, expert_offset + local) that an expert-parallel module
    holds (the same `expert_offset` convention `sourcelm.model.init` follows), nothing else.

Each tensor is read through its own `safetensors.safe_open` handle, memory-mapped, and the handle is
closed before the next: a handle maps its whole file, and every page a read touches stays resident
(counted in the process's RSS as file pages) until the mapping goes, so one handle per file would
grow RSS by everything this rank read from that file. Per tensor, the peak is this rank's own part
(in the model's dtype) plus one tensor as stored (plus its fp32 conversion, and for FP8 its
dequantized copy). Fused expert tensors (`gate_up_proj` [E, 2I, H]) are sliced on read
(`get_slice`), so a rank touches only its experts' rows.

This sits in train/, not interop/, because interop imports train (export reads training checkpoints): the
few names of the HF layout it needs are repeated here, and a test checks they equal interop's.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.kernels.fp8 import E4M3, TILE, dequantize_blocks
from sourcelm.model import DeepseekV3

log = logging.getLogger(__name__)

# the HF layout's names (sourcelm.interop.hf, sourcelm.interop.fp8_checkpoint; tests/train/test_init_from.py)
EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
INDEX_NAME = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"

EXPERT = re.compile(r"(.+\.mlp\.experts)\.(w1|w2|w3)")
MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")  # copies of the shared modules, never read
MAX_LISTED = 40  # problems named in the exception; the log names every one


@dataclass(frozen=True)
class StoredTensor:
    file: str
    dtype: str  # safetensors' spelling: "BF16", "F32", "F8_E4M3", ...
    shape: tuple[int, ...]


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensor table of one .safetensors file: its 8-byte length, then the JSON header. No data is read."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {name: StoredTensor(path.name, info["dtype"], tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


class HFCheckpoint:
    """An HF DeepSeek-V3 directory: config.json, safetensors shards (with or without an index)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise FileNotFoundError(f"{self.path}: no config.json; expected an HF DeepSeek-V3 directory")
        self.hf_config = json.loads((self.path / "config.json").read_text())
        quantization = self.hf_config.get("quantization_config")
        if quantization:  # the released layout only: e4m3 weights with a scale per 128x128 block
            found = (quantization.get("quant_method"), quantization.get("fmt", "e4m3"),
                     list(quantization.get("weight_block_size") or []))
            if found != ("fp8", "e4m3", [TILE, TILE]):
                raise ValueError(f"{self.path}: quantization_config (quant_method, fmt, weight_block_size) = {found}; "
                                 f"only DeepSeek's block FP8 ('fp8', 'e4m3', [{TILE}, {TILE}]) is read")
        index = self.path / INDEX_NAME
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{self.path}: no *.safetensors weights")
        self.files = files
        self.tensors: dict[str, StoredTensor] = {}
        for f in files:
            if not (self.path / f).is_file():
                raise FileNotFoundError(f"{self.path}: {f} is listed in {INDEX_NAME} but missing")
            self.tensors.update(read_header(self.path / f))

    @property
    def nbytes(self) -> int:
        return sum((self.path / f).stat().st_size for f in self.files)

    def model_config(self) -> ModelConfig:
        """The config.json's model, with the MTP depth the files hold (transformers drops MTP when it saves)."""
        cfg = ModelConfig.from_hf_dict(self.hf_config)
        n = cfg.num_hidden_layers
        depth = len({int(m.group(1)) for k in self.tensors
                     if (m := re.match(r"model\.layers\.(\d+)\.", k)) and int(m.group(1)) >= n})
        if depth != cfg.num_nextn_predict_layers:
            log.warning("%s: config says %d MTP layers, the weights hold %d; using %d", self.path,
                        cfg.num_nextn_predict_layers, depth, depth)
            cfg.num_nextn_predict_layers = depth
        return cfg

    # ------------------------------------------------------------------------------------ checks

    def problems(self, cfg: ModelConfig) -> list[str]:
        """Every way the files differ from the model `cfg` describes, one line per tensor."""
        with torch.device("meta"):
            meta = DeepseekV3(cfg)
        problems, used = [], set()
        for name, t in meta.state_dict().items():
            for key, shape in self._sources(name, tuple(t.shape), cfg):
                stored = self.tensors.get(key)
                if stored is None:
                    if not key.endswith("e_score_correction_bias"):  # older checkpoints: zeros (see load_into)
                        problems.append(f"missing {key} (expected shape {list(shape)})")
                    continue
                used.add(key)
                if stored.shape != shape:
                    problems.append(f"misshapen {key}: {list(stored.shape)} in {stored.file}, expected {list(shape)}")
                problems += self._scale_problems(key, stored, used)
        n = cfg.num_hidden_layers
        for key in sorted(set(self.tensors) - used):
            m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", key)
            if m and int(m.group(1)) >= n and m.group(2) in MTP_COPIES:
                continue
            problems.append(f"extra {key} {list(self.tensors[key].shape)} in {self.tensors[key].file}")
        return problems

    def check(self, cfg: ModelConfig) -> None:
        problems = self.problems(cfg)
        if problems:
            for p in problems:
                log.error("%s: %s", self.path, p)
            more = f"; and {len(problems) - MAX_LISTED} more (all in the log)" if len(problems) > MAX_LISTED else ""
            raise ValueError(f"{self.path} does not match its config ({len(problems)} problem(s)): "
                             + "; ".join(problems[:MAX_LISTED]) + more)

    def _scale_problems(self, key: str, stored: StoredTensor, used: set[str]) -> list[str]:
        scale = self.tensors.get(key + SCALE_SUFFIX)
        if scale is None:
            return [f"{key} is float8_e4m3fn but has no {key + SCALE_SUFFIX}"] if stored.dtype == "F8_E4M3" else []
        used.add(key + SCALE_SUFFIX)
        expected = tuple(-(-d // TILE) for d in stored.shape)
        if stored.dtype != "F8_E4M3" or len(stored.shape) != 2:
            return [f"{key} is {stored.dtype} {list(stored.shape)} with a scale; expected a float8_e4m3fn matrix"]
        if scale.shape != expected:
            return [f"misshapen {key + SCALE_SUFFIX}: {list(scale.shape)}; {key} {list(stored.shape)} in "
                    f"{TILE}x{TILE} blocks needs {list(expected)}"]
        return []

    def _sources(self, name: str, shape: tuple[int, ...], cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
        """The stored tensors (key, shape) one of our full-model tensors is read from."""
        m = EXPERT.fullmatch(name)
        if m is None:
            yield hf_name(name, cfg), shape
            return
        prefix, which = hf_name(m.group(1), cfg), m.group(2)
        if self._fused(prefix):
            e, rows, cols = shape
            yield (f"{prefix}.down_proj", shape) if which == "w2" else (f"{prefix}.gate_up_proj", (e, 2 * rows, cols))
            return
        for e in range(shape[0]):
            yield f"{prefix}.{e}.{EXPERT_NAMES[which]}.weight", shape[1:]

    def _fused(self, prefix: str) -> bool:
        return f"{prefix}.gate_up_proj" in self.tensors or f"{prefix}.down_proj" in self.tensors

    # ------------------------------------------------------------------------------------ reading

    def load_into(self, model: nn.Module) -> int:
        """Fills every tensor of `model`'s state dict (this rank's part of it) from the files; returns the bytes
        read as stored. The model's routed experts may be a slice: `expert_offset` on their module says where it
        starts. Call `check` first: here a missing tensor is only a KeyError."""
        cfg, read = model.config, 0
        for name, target in model.state_dict().items():
            m = EXPERT.fullmatch(name)
            with torch.no_grad():
                if m is None:
                    key = hf_name(name, cfg)
                    if key not in self.tensors and key.endswith("e_score_correction_bias"):
                        log.warning("%s: %s missing; using zeros (no correction)", self.path, key)
                        target.zero_()
                        continue
                    read += self._copy(target, key, None)
                else:
                    read += self._load_experts(model, m.group(1), m.group(2), target, cfg)
        return read

    def _load_experts(self, model: nn.Module, module_name: str, which: str, target: torch.Tensor,
                      cfg: ModelConfig) -> int:
        offset = getattr(model.get_submodule(module_name), "expert_offset", 0)
        rows = slice(offset, offset + target.shape[0])
        prefix = hf_name(module_name, cfg)
        if not self._fused(prefix):
            return sum(self._copy(target[i], f"{prefix}.{offset + i}.{EXPERT_NAMES[which]}.weight", None)
                       for i in range(target.shape[0]))
        if which == "w2":
            return self._copy(target, f"{prefix}.down_proj", (rows,))
        inter = target.shape[1]
        cols = slice(0, inter) if which == "w1" else slice(inter, 2 * inter)
        return self._copy(target, f"{prefix}.gate_up_proj", (rows, cols))

    def _copy(self, target: torch.Tensor, key: str, index: tuple | None) -> int:
        """target <- stored tensor `key` (rows / columns `index` of it), dequantized and converted; one handle."""
        from safetensors import safe_open

        stored = self.tensors[key]
        with safe_open(str(self.path / stored.file), framework="pt") as f:
            value = f.get_tensor(key) if index is None else f.get_slice(key)[index]
            nbytes = value.numel() * value.element_size()
            if value.dtype == E4M3:
                with safe_open(str(self.path / self.tensors[key + SCALE_SUFFIX].file), framework="pt") as s:
                    value = dequantize_blocks(value, s.get_tensor(key + SCALE_SUFFIX).float())
            target.copy_(value)
        return nbytes


def hf_name(name: str, cfg: ModelConfig) -> str:
    """Our name of a tensor (or module) -> its HF name: MTP depth k lives at layer num_hidden_layers + k."""
    m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
    return f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name
