"""One typed config tree for the whole project.

A run is described by a `Config`: a model section whose field names are exactly those of Hugging
Face's `DeepseekV3Config` (so `config.json` round-trips without a mapping table), and sections for
data, optimisation, schedule, load balancing, checkpointing, logging and parallelism.

Configs come from a preset name or a TOML file, are amended with `section.key=value` overrides, and
are validated at load time: every error names the field and says how to fix it. The resolved config
is saved as JSON next to everything the run produces.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import json
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESET_DIR = Path(__file__).parent / "presets"


class ConfigError(ValueError):
    """A config value that cannot work. The message names the field and the fix."""


# --------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    # Field names and meanings follow transformers' DeepseekV3Config.
    vocab_size: int = 8192
    hidden_size: int = 256
    intermediate_size: int = 768  # dense-layer FFN width
    moe_intermediate_size: int = 128  # one routed expert's width; shared = this * n_shared_experts
    num_hidden_layers: int = 4  # main layers; the MTP layers are not counted
    num_attention_heads: int = 4
    num_key_value_heads: int = 4  # MLA: always equal to num_attention_heads
    q_lora_rank: int | None = 96  # None: a plain q_proj, no query compression
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 1
    num_nextn_predict_layers: int = 1  # MTP depth D
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"type": "yarn", "factor": ..., ...} or None
    max_position_embeddings: int = 4096
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int = 0
    eos_token_id: int = 1
    initializer_range: float = 0.006  # the report's init std (HF's default 0.02 is not what V3 used)
    # --- sourcelm-only fields (not written to config.json) ---
    balance_loss_alpha: float = 1e-4  # α of the sequence-wise balance loss (report §2.1.2)
    mtp_loss_weight: float = 0.3  # λ; the trainer overrides it on its schedule
    # "auto" (on CPU while one layer's scores fit in 64 MB: amx where it takes the call, else bmm; else sdpa),
    # "amx" (the AMX kernel, bf16 CPUs with AMX), "sdpa" (flash kernels, O(T) memory), "bmm" (scores
    # materialised, softmax kept for backward), "eager" (reference); see model/attention.py
    attn_impl: str = "auto"
    moe_impl: str = "grouped"  # "grouped" (sorted tokens + grouped matmul) or "loop" (reference)
    # How many of a group's best biased affinities add up to its score in node-limited routing. None: the
    # released rule, the top 2 (DeepSeek-V3's inference code and transformers); a number is a local choice,
    # e.g. the report's K / M reading (num_experts_per_tok // topk_group), that export refuses wherever
    # transformers would route differently. A model loaded from HF always has None.
    group_score_topk: int | None = None

    # Fields HF's DeepseekV3Config does not have; kept out of config.json.
    LOCAL_FIELDS: typing.ClassVar[tuple[str, ...]] = (
        "balance_loss_alpha", "mtp_loss_weight", "attn_impl", "moe_impl", "group_score_topk",
    )
    RELEASED_GROUP_SCORE_TOPK: typing.ClassVar[int] = 2

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def resolved_group_score_topk(self) -> int:
        """The count `group_score_topk` stands for: its value, or the released rule's 2 when unset."""
        return self.RELEASED_GROUP_SCORE_TOPK if self.group_score_topk is None else self.group_score_topk

    def is_moe_layer(self, layer: int) -> bool:
        """Layer index counts main layers then MTP layers; only the first k main layers are dense."""
        return layer >= self.first_k_dense_replace

    def validate(self, prefix: str = "model") -> None:
        positive = [
            "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
            "num_hidden_layers", "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim",
            "qk_rope_head_dim", "v_head_dim", "n_routed_experts", "num_experts_per_tok", "n_group",
            "topk_group", "max_position_embeddings",
        ]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{prefix}.{name} = {getattr(self, name)} must be positive; set it to a value > 0")
        if self.q_lora_rank is not None and self.q_lora_rank <= 0:
            raise ConfigError(f"{prefix}.q_lora_rank = {self.q_lora_rank}: use a positive rank, or omit it for a "
                              f"plain q_proj")
        for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} = {getattr(self, name)} must be >= 0")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"{prefix}.qk_rope_head_dim = {self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.num_key_value_heads != self.num_attention_heads:
            raise ConfigError(
                f"{prefix}.num_key_value_heads = {self.num_key_value_heads}: MLA has one key/value per head; "
                f"set it to num_attention_heads = {self.num_attention_heads}")
        if self.n_routed_experts % self.n_group:
            raise ConfigError(
                f"{prefix}.n_routed_experts = {self.n_routed_experts} is not divisible by {prefix}.n_group = "
                f"{self.n_group}; choose n_group among {divisors(self.n_routed_experts)}")
        if self.topk_group > self.n_group:
            raise ConfigError(f"{prefix}.topk_group = {self.topk_group} > {prefix}.n_group = {self.n_group}; "
                              f"keep at most n_group groups")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_group * per_group < self.num_experts_per_tok:
            raise ConfigError(
                f"{prefix}.num_experts_per_tok = {self.num_experts_per_tok} exceeds the {self.topk_group * per_group} "
                f"experts in the {self.topk_group} kept groups; raise {prefix}.topk_group or lower num_experts_per_tok")
        self._validate_group_score(prefix, per_group)
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ConfigError(f"{prefix}.first_k_dense_replace = {self.first_k_dense_replace} exceeds "
                              f"num_hidden_layers = {self.num_hidden_layers}")
        if self.hidden_act != "silu":
            raise ConfigError(f"{prefix}.hidden_act = {self.hidden_act!r}: DeepSeek-V3 uses SwiGLU; set it to 'silu'")
        if self.attention_bias:
            raise ConfigError(f"{prefix}.attention_bias = true is not part of DeepSeek-V3; set it to false")
        if self.tie_word_embeddings:
            raise ConfigError(f"{prefix}.tie_word_embeddings = true: DeepSeek-V3 keeps embedding and head separate; "
                              f"set false")
        _choice(prefix, "attn_impl", self.attn_impl, ("auto", "amx", "sdpa", "bmm", "eager"))
        _choice(prefix, "moe_impl", self.moe_impl, ("grouped", "loop"))
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ConfigError(f"{prefix}.rope_scaling.type = {kind!r}: only 'yarn' is supported (or omit "
                                  f"rope_scaling)")
            if kind == "yarn":
                for key in ("factor", "original_max_position_embeddings"):
                    if key not in self.rope_scaling:
                        raise ConfigError(f"{prefix}.rope_scaling needs '{key}' for YaRN")

    def _validate_group_score(self, prefix: str, per_group: int) -> None:
        """A group's score sums its top `resolved_group_score_topk` biased affinities: the group must hold them."""
        count = self.group_score_topk
        if count is not None and not 1 <= count <= per_group:
            raise ConfigError(
                f"{prefix}.group_score_topk = {count}: a group's score sums 1 to {per_group} of its {per_group} "
                f"experts; set it in 1..{per_group}, or omit it for the released rule (the top 2)")
        if count is None and self.n_group > 1 and per_group < self.RELEASED_GROUP_SCORE_TOPK:
            fits = [g for g in divisors(self.n_routed_experts) if self.n_routed_experts // g >= 2]
            raise ConfigError(
                f"{prefix}.n_group = {self.n_group} leaves {per_group} expert per group, but the released rule "
                f"(transformers too, which fails on it) scores a group by its top 2; choose n_group among {fits}, "
                f"or set {prefix}.group_score_topk = 1 (sourcelm only: such a model cannot be exported)")

    # ---- HF config.json ----
    def to_hf_dict(self) -> dict:
        # a deep copy: transformers edits the rope_scaling dict it is given in place
        d = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
             if f.name not in self.LOCAL_FIELDS}
        d.update(
            architectures=["DeepseekV3ForCausalLM"],
            model_type="deepseek_v3",
            topk_method="noaux_tc",
            scoring_func="sigmoid",
            moe_layer_freq=1,
            ep_size=1,
            head_dim=self.qk_rope_head_dim,
            rope_interleave=True,
            torch_dtype="float32",
        )
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d

    @classmethod
    def from_hf_dict(cls, d: dict) -> ModelConfig:
        """Reads an HF config.json dict (transformers 4 `rope_theta`/`rope_scaling` or 5 `rope_parameters`)."""
        names = {f.name for f in dataclasses.fields(cls)} - set(cls.LOCAL_FIELDS)
        kw = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")
        if rope:  # transformers 5 folds theta and scaling into one dict
            rope = dict(rope)
            kw["rope_theta"] = float(rope.pop("rope_theta", kw.get("rope_theta", 10000.0)))
            kind = rope.get("rope_type", rope.get("type", "default"))
            if kind != "default":
                rope.pop("rope_type", None)
                kw["rope_scaling"] = {"type": kind, **rope}
            else:
                kw["rope_scaling"] = None
        elif kw.get("rope_scaling"):
            rs = dict(kw["rope_scaling"])
            kind = rs.pop("rope_type", rs.pop("type", "default"))
            kw["rope_scaling"] = None if kind == "default" else {"type": kind, **rs}
        if kw.get("num_key_value_heads") is None:
            kw["num_key_value_heads"] = kw.get("num_attention_heads", cls.num_attention_heads)
        for key in ("bos_token_id", "eos_token_id"):
            if kw.get(key) is None:
                kw.pop(key, None)
        cfg = cls(**kw)
        cfg.validate()
        return cfg


# ------------------------------------------------------------------------------------ training tree


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # token shard prefixes or dirs with a manifest
    valid: list[str] = field(default_factory=list)
    seq_len: int = 256
    seed: int = 1234
    # weights per source, e.g. {web = 0.7, code = 0.3}: sources are the `source` recorded per document
    # (or the train paths); the loader follows one exactly proportioned, seeded schedule
    mixture: dict | None = None
    # held-out share of documents (by hash) when the shards have no separate valid split
    valid_fraction: float = 0.0


@dataclass
class OptimConfig:
    lr: float = 2.2e-4
    min_lr: float = 2.2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    state_dtype: str = "float32"  # AdamW moments: "float32" or "bfloat16" (the report's choice, §3.3.3)


@dataclass
class ScheduleConfig:
    steps: int = 100  # optimizer steps
    unit: str = "steps"  # positions below are fractions of the run in "steps" or "tokens"
    global_batch: int = 8  # sequences per optimizer step
    micro_batch: int = 8  # sequences per forward/backward on one rank
    warmup_steps: int = 10
    decay_start: float = 0.6  # fraction of the run at which cosine decay begins
    decay_end: float = 0.9  # fraction at which it ends; then a constant tail at min_lr
    batch_ramp_steps: int = 0  # 0: no ramp; else ramp global_batch from ramp_start_batch
    ramp_start_batch: int = 0
    mtp_weight: float = 0.3
    mtp_weight_late: float = 0.1
    mtp_switch: float = 0.7  # fraction of the run after which λ drops (10T / 14.8T in the report)
    bias_update_speed: float = 1e-3  # γ
    bias_freeze: float = 0.97  # fraction after which γ = 0 (14.3T / 14.8T in the report)


@dataclass
class CheckpointConfig:
    every: int = 50
    keep: int = 3


@dataclass
class LoggingConfig:
    every: int = 1
    valid_every: int = 50
    valid_batches: int = 4
    tensorboard: bool = True
    progress: bool = True
    plots: bool = True  # the run's curves as PNGs when it completes (`sourcelm plot RUN_DIR` draws them any time)


@dataclass
class TrainConfig:
    device: str = "auto"  # "auto" (cuda when available), "cpu" or "cuda"
    # compute dtype: "auto" (bfloat16 where the hardware has native bf16 matmuls, else float32; see
    # sourcelm/kernels/hardware.py), "float32" or "bfloat16". Master weights and optimizer state are always fp32.
    dtype: str = "auto"
    max_bad_steps: int = 5  # consecutive non-finite steps before the run stops
    compile: bool = False
    # the linear layers' GEMMs in DeepSeek-V3's FP8 recipe (sourcelm/kernels/fp8.py): "off", "emulate" (the exact
    # quantization on any device, GEMMs in fp32) or "cuda" (FP8 tensor cores, compute capability >= 8.9)
    fp8: str = "off"
    # Python's garbage collector runs between steps only: the young objects every gc_every steps, everything after
    # each checkpoint; 0: Python's automatic collector, which pauses inside any op (sourcelm/train/device.py)
    gc_every: int = 1


@dataclass
class ParallelConfig:
    ep: int = 1  # expert-parallel degree
    ranks_per_node: int = 0  # 0: the real node size from the launcher
    dispatcher: str = "two_hop"  # "flat", "two_hop" or "two_hop_chunked" (hop 2 forwards each chunk as it lands)
    dispatch_chunk_rows: int = 0  # two_hop_chunked's rows per chunk; 0: the fastest of a few, measured at the start
    zero1: bool = True
    # pipeline stages; world = pp x (the ranks of a stage, expert and data parallel). A step's micro-batches
    # (schedule.global_batch / (schedule.micro_batch x ranks per stage)) run under `pp_schedule`: "1f1b", or
    # "dualpipev" (DeepSeek's; 2 x pp chunks in a V, at least 2 x pp micro-batches); sourcelm/parallel/pipeline_plan.py
    pp: int = 1
    pp_schedule: str = "1f1b"
    # DualPipeV's F&B pairs run the forward of one micro-batch and the backward of another at the same time (two
    # threads, two sets of process groups), each one's communication hidden behind the other's compute; false: one
    # after the other (the same bits either way)
    pp_overlap: bool = True
    # DualPipeV's zero-bubble W split: the backwards of some phases compute input gradients only, and W ops run their
    # weight gradients later, in time the rank would idle (sourcelm/train/weight_grad.py); false: every backward
    # computes both (the same bits either way)
    pp_zero_bubble: bool = True
    # main layers per chunk, in chunk order (pp of them for 1f1b, 2 x pp for dualpipev), like Megatron's and
    # torchtitan's manual split points; empty: contiguous ranges balancing forward FLOPs (pipeline_plan)
    pp_layers: list[int] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    seed: int = 0

    def validate(self) -> None:
        self.model.validate("model")
        s = self.schedule
        for name in ("steps", "global_batch", "micro_batch"):
            if getattr(s, name) <= 0:
                raise ConfigError(f"schedule.{name} = {getattr(s, name)} must be positive")
        if s.global_batch % s.micro_batch:
            raise ConfigError(f"schedule.global_batch = {s.global_batch} is not a multiple of schedule.micro_batch = "
                              f"{s.micro_batch}; choose micro_batch among {divisors(s.global_batch)}")
        if not 0 <= s.decay_start <= s.decay_end <= 1:
            raise ConfigError("schedule.decay_start and decay_end must satisfy 0 <= decay_start <= decay_end <= 1")
        if self.data.seq_len <= 0 or self.data.seq_len > self.model.max_position_embeddings:
            raise ConfigError(f"data.seq_len = {self.data.seq_len} must be in 1..model.max_position_embeddings "
                              f"({self.model.max_position_embeddings})")
        for name in ("every", "keep"):
            low = 1 if name == "every" else 0
            if getattr(self.checkpoint, name) < low:
                raise ConfigError(f"checkpoint.{name} = {getattr(self.checkpoint, name)} must be >= {low}"
                                  + (" (0 keeps every checkpoint)" if name == "keep" else ""))
        for name in ("every", "valid_batches"):
            if getattr(self.logging, name) < 1:
                raise ConfigError(f"logging.{name} = {getattr(self.logging, name)} must be >= 1")
        if self.logging.valid_every < 0:
            raise ConfigError(f"logging.valid_every = {self.logging.valid_every} must be >= 0 (0: no validation)")
        if not 0 <= self.data.valid_fraction < 1:
            raise ConfigError(f"data.valid_fraction = {self.data.valid_fraction} must be in [0, 1)")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ConfigError(f"optim.betas = {self.optim.betas}: give two values in [0, 1), e.g. [0.9, 0.95]")
        _choice("schedule", "unit", s.unit, ("steps", "tokens"))
        if s.warmup_steps < 0:
            raise ConfigError(f"schedule.warmup_steps = {s.warmup_steps} must be >= 0")
        if s.batch_ramp_steps and not 0 < s.ramp_start_batch <= s.global_batch:
            raise ConfigError("schedule.ramp_start_batch must be in 1..global_batch when batch_ramp_steps > 0")
        _choice("train", "dtype", self.train.dtype, ("auto", "float32", "bfloat16"))
        _choice("train", "device", self.train.device, ("auto", "cpu", "cuda"))
        _choice("train", "fp8", self.train.fp8, ("off", "emulate", "cuda"))
        if self.train.gc_every < 0:
            raise ConfigError(f"train.gc_every = {self.train.gc_every} must be >= 0 (1: collect after every step, 0: "
                              "Python's automatic collector)")
        _choice("optim", "state_dtype", self.optim.state_dtype, ("float32", "bfloat16"))
        _choice("parallel", "pp_schedule", self.parallel.pp_schedule, ("1f1b", "dualpipev"))
        pp = self.parallel.pp
        if pp < 1:
            raise ConfigError(f"parallel.pp = {pp} must be >= 1 (1: no pipeline)")
        chunks = 2 * pp if self.parallel.pp_schedule == "dualpipev" else pp
        if pp > 1 and chunks > self.model.num_hidden_layers:
            raise ConfigError(f"parallel.pp = {pp} with {self.parallel.pp_schedule} cuts {chunks} chunks, more than "
                              f"the model.num_hidden_layers = {self.model.num_hidden_layers} main layers; set "
                              f"parallel.pp <= {self.model.num_hidden_layers // (chunks // pp)}")
        check_pp_layers(self.parallel.pp_layers, pp, chunks, self.model.num_hidden_layers)
        _choice("parallel", "dispatcher", self.parallel.dispatcher, ("flat", "two_hop", "two_hop_chunked"))
        if self.parallel.dispatch_chunk_rows < 0:
            raise ConfigError(f"parallel.dispatch_chunk_rows = {self.parallel.dispatch_chunk_rows}: use a positive "
                              f"row count, or 0 to measure the fastest at the start")
        if self.parallel.ep <= 0 or self.model.n_routed_experts % self.parallel.ep:
            raise ConfigError(f"parallel.ep = {self.parallel.ep} must divide model.n_routed_experts = "
                              f"{self.model.n_routed_experts}; choose among {divisors(self.model.n_routed_experts)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ------------------------------------------------------------------------------------ load / merge


def check_batch_layout(cfg: Config, ranks: int) -> int:
    """The sequences one micro-step consumes over `ranks` data-parallel ranks; the global batch must be
    a whole number of them, and under pipeline parallelism as many as the schedule needs."""
    quantum = cfg.schedule.micro_batch * ranks
    if cfg.schedule.global_batch % quantum:
        raise ConfigError(
            f"schedule.global_batch = {cfg.schedule.global_batch} must be a multiple of schedule.micro_batch × "
            f"processes = {cfg.schedule.micro_batch} × {ranks}; change schedule.micro_batch or the process count")
    pp, kind = cfg.parallel.pp, cfg.parallel.pp_schedule
    if pp > 1:
        need = 2 * pp if kind == "dualpipev" else pp
        sched = cfg.schedule
        smallest = sched.ramp_start_batch if sched.batch_ramp_steps else sched.global_batch
        if smallest // quantum < need:
            fits = [d for d in divisors(smallest) if smallest // (d * ranks) >= need and smallest % (d * ranks) == 0]
            raise ConfigError(
                f"parallel.pp = {pp} under {kind} needs at least {need} micro-batches a step, but batch {smallest} / "
                f"(schedule.micro_batch {cfg.schedule.micro_batch} × {ranks} data-parallel ranks) gives "
                f"{smallest // quantum}; set schedule.micro_batch to one of {fits or [1]} or raise "
                f"schedule.global_batch")
    return quantum


def check_pp_layers(counts, pp: int, chunks: int, layers: int) -> None:
    """parallel.pp_layers: one count per pipeline chunk, each >= 1, summing to the main layers (or none)."""
    if counts and (pp == 1 or len(counts) != chunks or min(counts) < 1 or sum(counts) != layers):
        raise ConfigError(f"parallel.pp_layers = {list(counts)}: give {chunks if pp > 1 else 'no'} layer counts, each "
                          f">= 1, summing to model.num_hidden_layers = {layers} (one per chunk of parallel.pp = {pp}), "
                          f"or none for the FLOP-balanced cut")


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _choice(section: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{section}.{name} = {value!r}: choose one of {', '.join(map(repr, allowed))}")


def _check_type(path: str, value: Any, hint: Any) -> Any:
    """Returns `value` converted to the annotated type, or raises a ConfigError naming `path`."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(path, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{path} = {value!r} has the wrong type; expected {hint}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} = {value!r} must be a list")
        (item,) = typing.get_args(hint) or (Any,)
        return [_check_type(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} = {value!r} must be a table")
        return value
    if hint is Any:
        return value
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path} = {value!r} has type {type(value).__name__}; expected {hint.__name__}")
    return value


def _apply(obj: Any, data: dict, path: str) -> None:
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key '{where}'{hint}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{where}' is a section; write it as a [{where}] table")
            _apply(current, value, where)
        else:
            setattr(obj, key, _check_type(where, value, hints[key]))


def _parse_value(text: str) -> Any:
    """A command-line value in TOML syntax (`3`, `1e-4`, `true`, `[1, 2]`, `"s"`); bare words are strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict:
    tree: dict = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.key=value")
        key, value = item.split("=", 1)
        node = tree
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = _parse_value(value.strip())
    return tree


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.toml"))


def load_config(source: str | Path | dict | None = None, overrides: list[str] | None = None) -> Config:
    """Builds a validated Config from a preset name, a TOML or JSON path or a dict, then applies overrides."""
    cfg = Config()
    if isinstance(source, dict):
        _apply(cfg, source, "")
    elif source is not None:
        path = Path(source)
        if not path.exists():
            preset = PRESET_DIR / f"{source}.toml"
            if not preset.exists():
                raise ConfigError(f"no config file or preset named {str(source)!r}; presets: "
                                  f"{', '.join(preset_names())}")
            path = preset
        try:
            # .json: a resolved config as a run saved it (Config.to_json), read back without loss
            data = json.loads(path.read_text()) if path.suffix == ".json" else tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'} ({e})") from None
        _apply(cfg, data, "")
    if overrides:
        _apply(cfg, parse_overrides(overrides), "")
    cfg.validate()
    return cfg


def config_from_dict(d: dict) -> Config:
    """Inverse of Config.to_dict (used when a checkpoint's saved config is reloaded)."""
    return load_config(d)


def load_model_config(source: str | Path | dict, overrides: list[str] | None = None) -> ModelConfig:
    """A model config from a preset/TOML (its [model] section) or from an HF config.json path or dict."""
    if isinstance(source, dict):
        return ModelConfig.from_hf_dict(source)
    path = Path(source)
    if path.is_dir() and (path / "config.json").exists():
        path = path / "config.json"
    if path.suffix == ".json" and path.exists():
        return ModelConfig.from_hf_dict(json.loads(path.read_text()))
    return load_config(source, overrides).model
