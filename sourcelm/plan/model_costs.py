"""A model cut into pipeline slots, with the parameters, FLOPs and activation bytes of each.

Slots, in order: the embedding, every main decoder layer, every MTP depth, the head (final norm +
LM head). Parameters are counted on the meta-device model (`sourcelm.model.flops`, the counts behind
`sourcelm info`), so they are the model's own; FLOPs per token follow that module's formula, split
into the passes a pipeline schedules separately:
  F  = 2 * matmul params + causal attention (forward)
  Bi = 2 * matmul params + 2 * attention    (backward for inputs; attention has no weights)
  W  = 2 * matmul params                    (backward for weights)
An MTP depth also runs the shared head once more, which its slot carries.

Activations are the tensors a layer keeps for its backward, per token, by name (`activation_terms`), in
the compute dtype unless stated: what the training code saves (inputs of every matmul and norm, the
attention output and its softmax statistics, the routed and shared experts' intermediates), minus
what the chosen recomputation drops, with the FP8 caching of the report (§3.3.2) when the layout
trains in FP8:
  "norm_up_proj"  recompute RMSNorm outputs and MLA's up-projections (q, k, v) in backward (report §3.2.3)
  "swiglu"        recompute the SwiGLU outputs of the experts from their (cached) inputs (report §3.3.2); FP8
                  training always does (`fp8.fp8_swiglu_linear`)
  "full"          keep only each layer's input and recompute the layer
Pipeline chunks are cut as the trainer cuts them (`cut_chunks`).
"""

from __future__ import annotations

from dataclasses import dataclass

from sourcelm.config import ModelConfig

RECOMPUTE = ("norm_up_proj", "swiglu", "full")
# bytes per element of a cached activation: FP8 E4M3 with one fp32 scale per 128 values (1 x 128 tiles)
FP8_BYTES = 1 + 4 / 128
# the attention core's output under FP8: 12-bit E5M6 codes with an fp32 scale per 128 (`kernels.fp8_attention`)
E5M6_BYTES = 1.5 + 4 / 128
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 2}  # fp8 training computes and keeps non-matmul tensors in bf16


@dataclass(frozen=True)
class Slot:
    name: str  # "embed", "layer.3", "mtp.0", "head"
    kind: str  # "embed", "dense", "moe", "mtp", "head"
    params: int  # every parameter the slot owns
    expert_params: int  # of which routed experts (sharded over EP)
    matmul: int  # matmul parameters one token multiplies (activated), head pass included for MTP
    attn_flops: float  # causal attention core, forward, per token
    copied: int = 0  # parameters the trainer keeps a compute-dtype copy of (`DeepseekV3.matmul_weights`)
    head_matmul: int = 0  # of `matmul`, the output head's (one large GEMM and the fused loss: its own rate)

    @property
    def f_flops(self) -> float:
        return 2 * self.matmul + self.attn_flops

    @property
    def bi_flops(self) -> float:
        return 2 * self.matmul + 2 * self.attn_flops

    @property
    def w_flops(self) -> float:
        return 2 * self.matmul

    @property
    def train_flops(self) -> float:
        return self.f_flops + self.bi_flops + self.w_flops


def model_slots(cfg: ModelConfig, seq_len: int) -> list[Slot]:
    """The slots of `cfg` at sequence length `seq_len` (attention FLOPs use the causal mean context S/2)."""
    import torch

    from sourcelm.model.flops import _count
    from sourcelm.model.moe import RoutedExperts
    from sourcelm.model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)

    def experts(module) -> int:
        return sum(p.numel() for m in module.modules() if isinstance(m, RoutedExperts) for p in m.parameters())

    copies = set(model.matmul_weights())

    def copied(prefix: str, module) -> int:
        return sum(p.numel() for n, p in module.named_parameters(prefix=prefix) if n in copies)

    attn = 2 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    emb = _count(model.model.embed_tokens, cfg)
    slots = [Slot("embed", "embed", emb["total"], 0, 0, 0.0)]
    for i, layer in enumerate(model.model.layers):
        c = _count(layer, cfg)
        slots.append(Slot(f"layer.{i}", "moe" if layer.is_moe else "dense", c["total"], experts(layer), c["matmul"],
                          attn, copied(f"model.layers.{i}", layer)))
    head = _count(model.lm_head, cfg)
    for k, layer in enumerate(model.mtp):
        c = _count(layer, cfg)
        slots.append(Slot(f"mtp.{k}", "mtp", c["total"], experts(layer), c["matmul"] + head["matmul"], attn,
                          copied(f"mtp.{k}", layer), head["matmul"]))
    norm = _count(model.model.norm, cfg)
    slots.append(Slot("head", "head", head["total"] + norm["total"], 0, head["matmul"], 0.0,
                      head_matmul=head["matmul"]))
    return slots


# ------------------------------------------------------------------------------------ activations


def effective_recompute(dtype: str, recompute: tuple[str, ...]) -> tuple[str, ...]:
    """What backward recomputes: the layout's choice, and under FP8 the SwiGLU too (FP8 training always recomputes
    it from its cached FP8 input, `fp8.fp8_swiglu_linear`)."""
    return recompute if dtype != "fp8" or "swiglu" in recompute else (*recompute, "swiglu")


def activation_terms(cfg: ModelConfig, kind: str, seq_len: int, dtype: str, recompute: tuple[str, ...] = (),
                     attention: str = "flash", expert_outputs: bool = True,
                     residual_bytes: float | None = None) -> dict[str, float]:
    """Bytes per token a slot of `kind` keeps for its backward, by tensor. dtype: the layout's compute
    dtype ("fp32", "bf16" or "fp8": FP8 caches the inputs of the matmuls it runs in FP8). attention:
    "flash" keeps the softmax statistics only; "materialised" keeps the causal probabilities (the CPU
    kernels: about S/2 per head and token); FP8 always runs flash attention (`kernels.fp8_attention`).
    expert_outputs: the routing weights multiply the experts' outputs, which are kept for the weights'
    gradient (sourcelm); False where the weight scales the SwiGLU output before the down projection (the
    report's fused kernel) and nothing more is kept.
    residual_bytes: bytes per element of the residual stream (the norms' inputs); None: the compute dtype's.
    Under autocast (sourcelm) the stream keeps the fp32 of the master weights."""
    act = DTYPE_BYTES[dtype]
    res = act if residual_bytes is None else residual_bytes
    mm_in = FP8_BYTES if dtype == "fp8" else act  # a matmul input cached for its weight gradient
    recompute = effective_recompute(dtype, recompute)
    h = cfg.hidden_size
    if kind == "embed":
        return {}
    if kind == "head":
        # the head and MTP's eh_proj stay BF16 under FP8 (the recipe's table, `sourcelm.kernels.fp8`)
        return {"final norm input": h * res, "head input": h * act, "loss: gradient of the head input": h * 4}
    if "full" in recompute:  # only the layer input survives; the layer runs again in backward
        return {"layer input (recomputed)": h * res}
    drop_norm_up = "norm_up_proj" in recompute
    heads, qk, v = cfg.num_attention_heads, cfg.qk_head_dim, cfg.v_head_dim
    t: dict[str, float] = {"attention-norm input": h * res}
    if not drop_norm_up:
        t["attention-norm output (down-projection input)"] = h * mm_in
    if cfg.q_lora_rank:
        t["q latent"] = cfg.q_lora_rank * act
        if not drop_norm_up:
            t["normed q latent (q up-projection input)"] = cfg.q_lora_rank * mm_in
    t["kv latent + rope key"] = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * act
    if not drop_norm_up:
        t["normed kv latent (kv up-projection input)"] = cfg.kv_lora_rank * mm_in
        t["q, k, v (up-projection outputs)"] = heads * (2 * qk + v) * act
    if dtype == "fp8":  # one op for the core and o_proj: flash attention, its output kept once in E5M6
        attention = "flash"
        t["attention output (E5M6: o-projection and attention backward)"] = heads * v * E5M6_BYTES
    else:
        t["attention output (o-projection input)"] = heads * v * act
    t["softmax statistics" if attention == "flash" else "attention probabilities"] = (
        heads * 4 if attention == "flash" else heads * seq_len / 2 * act)
    t["FFN-norm input"] = h * res
    if not drop_norm_up:
        t["FFN-norm output"] = h * mm_in
    if kind == "dense":
        t.update(_swiglu_terms("dense FFN", cfg.intermediate_size, 1, h, act, mm_in, recompute))
        return t
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    t["router scores (fp32)"] = e * 4
    t["routed expert inputs (K copies)"] = k * h * mm_in
    t.update(_swiglu_terms("routed experts", cfg.moe_intermediate_size, k, h, act, mm_in, recompute))
    if expert_outputs:
        t["routed expert outputs (for the routing weights' gradient)"] = k * h * act
    if cfg.n_shared_experts:
        t.update(_swiglu_terms("shared expert", cfg.moe_intermediate_size * cfg.n_shared_experts, 1, h, act, mm_in,
                               recompute))
    if kind == "mtp":
        t["MTP merge: normed embedding and hidden state (eh_proj input)"] = 2 * h * act
        t["MTP merge: norm inputs"] = 2 * h * res
        t.update({f"MTP head: {name}": b
                  for name, b in activation_terms(cfg, "head", seq_len, dtype, residual_bytes=res).items()})
    return t


def _swiglu_terms(what: str, inner: int, copies: int, h: int, act: float, mm_in: float,
                  recompute: tuple[str, ...]) -> dict[str, float]:
    # gate and up outputs feed SwiGLU (cached in FP8 when training in FP8, report §3.3.2); its output
    # feeds the down projection and is recomputed under "swiglu", as FP8 training always does
    out = {f"{what}: gate/up outputs": copies * 2 * inner * mm_in}
    if "swiglu" not in recompute:
        out[f"{what}: SwiGLU output (down-projection input)"] = copies * inner * mm_in
    return out


def activation_bytes(cfg: ModelConfig, kind: str, seq_len: int, dtype: str, recompute: tuple[str, ...] = (),
                     attention: str = "flash", expert_outputs: bool = True,
                     residual_bytes: float | None = None) -> float:
    return sum(activation_terms(cfg, kind, seq_len, dtype, recompute, attention, expert_outputs,
                                residual_bytes).values())


def recompute_flops(cfg: ModelConfig, slot: Slot, recompute: tuple[str, ...]) -> float:
    """Forward FLOPs per token the backward of `slot` runs again: the whole forward under "full", MLA's
    up-projections under "norm_up_proj" (the norms and SwiGLU are elementwise: no matmul FLOPs)."""
    if slot.kind not in ("dense", "moe", "mtp"):
        return 0.0
    if "full" in recompute:
        return slot.f_flops
    if "norm_up_proj" in recompute:
        heads = cfg.num_attention_heads
        up = (cfg.q_lora_rank or 0) * heads * cfg.qk_head_dim + cfg.kv_lora_rank * heads * (
            cfg.qk_nope_head_dim + cfg.v_head_dim)
        return 2.0 * up
    return 0.0


# ------------------------------------------------------------------------------------ stage cutting


def cut_chunks(slots: list[Slot], cfg: ModelConfig, pp: int, schedule: str, seq_len: int,
               counts: tuple[int, ...] = ()) -> list[list[Slot]]:
    """The slots of each pipeline chunk, cut as the trainer cuts them (`sourcelm.parallel.pipeline_plan`:
    main layers in contiguous ranges, `counts` layers each or balancing forward FLOPs over the chunks, or under
    DualPipeV over the ranks, each holding two chunks; the embedding on the first
    chunk, the final norm, head and MTP depths on the last). Raises ConfigError when there are more chunks than
    layers."""
    from sourcelm.parallel.pipeline_plan import partition_layers

    if pp == 1:
        return [list(slots)]
    layers = [s for s in slots if s.kind in ("dense", "moe")]
    out = [[layers[i] for i in r] for r in partition_layers(cfg, pp, schedule, seq_len, list(counts))]
    out[0] = [slots[0], *out[0]]
    out[-1] = [*out[-1], *[s for s in slots if s.kind in ("mtp", "head")]]
    return out
