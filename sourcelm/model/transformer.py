"""The DeepSeek-V3 model: pre-norm decoder blocks (MLA + dense FFN or MoE), the output head, and
Multi-Token Prediction (report §2.2, eq. 21-25).

State-dict names are those of HF's `DeepseekV3ForCausalLM` (`model.embed_tokens.weight`,
`model.layers.{i}...`, `model.norm.weight`, `lm_head.weight`), except that routed experts are 3-D
tensors (`...mlp.experts.w1|w2|w3`, sliced per expert on export) and MTP depth k lives under
`mtp.{k-1}.` (exported as `model.layers.{num_hidden_layers + k - 1}.`).

MTP conventions:
* depth k at position i combines h^{k-1}_i with the embedding of the token at i + k, as
  `eh_proj(cat([enorm(emb), hnorm(h)]))` (embedding first, the released checkpoint's order), runs one
  full block over the T - k positions, and predicts `labels[i + k]` through `shared_head.norm` and the
  main `lm_head`. The embedding and head are the main model's own modules (shared, one gradient).
* h^0 is the main model's final-normed hidden state (what serving engines feed their MTP layer);
  depth k > 1 gets the raw block output of depth k - 1.
* L_MTP^k = sum of CE over the valid targets / (number of valid main targets), the report's 1/T;
  `mtp_loss` is the mean over depths and `loss = main + λ·mtp_loss + balance`.
* The balance loss is the sum over all MoE layers, the MTP blocks' included.
* The MTP blocks read the main model's embedding output shifted by k (the same rows a second lookup
  would return), so the embedding table gets one backward pass.

Losses: with `return_logits=False` (what the trainer asks for) the main head's loss, like every MTP
head's, goes through `linear_cross_entropy` (chunked, fused with its gradient; `loss.py`) and no
[B, T, V] logits are kept; otherwise the main loss is the plain cross-entropy of the returned logits,
the reference the fused path is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sourcelm.config import ModelConfig
from sourcelm.kernels import ops, reference
from sourcelm.model.attention import MLA
from sourcelm.model.loss import linear_cross_entropy
from sourcelm.model.moe import MLP, MoE
from sourcelm.model.norm_rope import RMSNorm, RotaryEmbedding


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # [B, T, V], main head (None when the caller passed return_logits=False)
    loss: torch.Tensor | None = None  # main + λ·MTP + balance
    main_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # int64 [num MoE layers incl. MTP, E]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmul=True)  # MLA's down-projections
        self.self_attn = MLA(cfg)
        # a dense FFN only multiplies it; the MoE router scores it in fp32
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmul=not self.is_moe)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, h, cos, sin, token_mask=None, balance_alpha=0.0):
        """Returns (h, expert counts or None, balance loss or None)."""
        h, x = self.attention_block(h, cos, sin)
        if not self.is_moe:
            return h + self.mlp(x), None, None
        y, counts, balance = self.mlp(x, token_mask, balance_alpha)
        return h + y, counts, balance

    def attention_block(self, h, cos, sin):
        """(h + attention(norm(h)), the FFN's normed input): the unit `DeepseekV3.compile_blocks` compiles."""
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        return h, self.post_attention_layernorm(h)


class MTPLayer(DecoderLayer):
    """One MTP depth: the projections that merge the next token's embedding into the hidden state,
    a full decoder block (its own names sit at this level, as in the checkpoint) and a final norm."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__(cfg, layer_idx)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmul=True)  # both only feed eh_proj
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmul=True)
        # a plain nn.Linear, not the model's `Linear`: the report and the released FP8 checkpoint keep it BF16
        self.eh_proj = nn.Linear(2 * cfg.hidden_size, cfg.hidden_size, bias=False)
        self.shared_head = nn.Module()
        self.shared_head.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, feeds_matmul=True)  # the head's matmuls

    def merge(self, emb: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))


class TokenEmbedding(nn.Embedding):
    """nn.Embedding without its N(0, 1) fill: `init_weights` draws every weight from its name anyway, and on the meta
    device (counting FLOPs, planning) the fill goes through torch's decompositions, which import torch._dynamo: 2.5 s
    of every training process's start."""

    def reset_parameters(self) -> None:
        pass


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = TokenEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DeepseekV3(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        n = cfg.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(cfg, n + k) for k in range(cfg.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(cfg)
        self.ce_chunk = None  # the fused loss's per-chunk step: None = the device's (ops.cross_entropy_chunk)

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(qualified name, MoE module) of every MoE layer: main layers in order, then the MTP blocks."""
        out = [(f"model.layers.{i}.mlp", layer.mlp) for i, layer in enumerate(self.model.layers) if layer.is_moe]
        out += [(f"mtp.{k}.mlp", layer.mlp) for k, layer in enumerate(self.mtp) if layer.is_moe]
        return out

    def matmul_weights(self) -> list[str]:
        """Names of the parameters that only enter matmuls, which autocast runs in the compute dtype: every
        linear layer's weight and the routed experts' (under expert parallelism too: same names). Not the
        head's: the main and the MTP losses both read it, and their two gradients are summed in fp32. The
        trainer keeps bf16 copies of these (`sourcelm.train.optim.ComputeCopies`)."""
        return [n for n, _ in self.named_parameters()
                if ".mlp.experts." in n or (n.endswith(".weight") and n != "lm_head.weight"
                                            and isinstance(self.get_submodule(n.rpartition(".")[0]), nn.Linear))]

    def compile_blocks(self, compute_dtype: torch.dtype = torch.float32) -> None:
        """torch.compile (opt-in: `train.compile`) of the parts of every block, MTP included, that are static
        dense code: the attention half (norms, MLA, residual) and, where the C kernels do not run
        (`ops.native_runs`), the router, the dense FFN, the shared expert and the fused loss's per-chunk softmax
        and gradient; where they run they are as fast or faster eager. Where the AMX attention kernel runs the
        attention half stays eager too (compiled around the bmm path it was slower; bench/RESULTS_train.md). The
        routed experts stay eager: their per-expert group sizes change every step, and an expert-parallel layer
        swapped in from outside runs collectives. Names and parameters are unchanged (compiled methods and
        `Module.compile`), so checkpoints and EP are unaffected."""
        device = next(self.parameters()).device
        native_here = ops.native_runs(device)
        cfg = self.config
        amx_attention = ops.amx_attention_runs(device, compute_dtype, cfg.qk_head_dim, cfg.v_head_dim)
        if not native_here:
            self.ce_chunk = torch.compile(reference.chunk_loss_and_grad)
        for layer in [*self.model.layers, *self.mtp]:
            if not amx_attention:
                layer.attention_block = torch.compile(layer.attention_block)
            if native_here:
                continue
            if layer.is_moe:
                layer.mlp.gate.compile()
                if layer.mlp.shared_experts is not None:
                    layer.mlp.shared_experts.compile()
            else:
                layer.mlp.compile()

    # -- the parts a pipeline stage owns: embed (first stage), blocks(range), head_and_losses (last stage) --------

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] -> the embedding rows [B, T, H] (also the MTP modules' input, shifted)."""
        return self.model.embed_tokens(input_ids)

    def blocks(self, h: torch.Tensor, layers: range | None = None, token_mask: torch.Tensor | None = None,
               balance_alpha: float = 0.0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Main decoder layers `layers` (default: all) on h [B, T, H] -> (h, expert counts of their MoE layers,
        their balance losses), both lists in layer order."""
        cos, sin = self.rotary(torch.arange(h.shape[1], device=h.device), h.dtype)
        counts, balances = [], []
        for i in layers if layers is not None else range(len(self.model.layers)):
            h, c, b = self.model.layers[i](h, cos, sin, token_mask, balance_alpha)
            if c is not None:
                counts.append(c)
                balances.append(b)
        return h, counts, balances

    def hidden_states(self, input_ids, token_mask=None, balance_alpha=0.0):
        """Main stack: (final-normed hidden [B, T, H], list of counts, list of balance losses)."""
        h, counts, balances = self.blocks(self.embed(input_ids), None, token_mask, balance_alpha)
        return self.model.norm(h), counts, balances

    def head_and_losses(self, h: torch.Tensor, emb: torch.Tensor, labels: torch.Tensor | None,
                        token_mask: torch.Tensor | None = None, mtp_weight: float | None = None,
                        balance_alpha: float | None = None, return_logits: bool = True,
                        counts: list[torch.Tensor] | None = None,
                        balances: list[torch.Tensor] | None = None) -> ModelOutput:
        """The last stage: the final norm, the main head and its loss, the MTP depths and their losses, from the
        last main layer's output h [B, T, H] and the embedding rows `emb` [B, T, H]. `counts` / `balances`: those
        of the main layers (from `blocks`), to which the MTP blocks' are appended. Arguments as `forward`."""
        cfg = self.config
        alpha = cfg.balance_loss_alpha if balance_alpha is None else balance_alpha
        lam = cfg.mtp_loss_weight if mtp_weight is None else mtp_weight
        counts, balances = list(counts or []), list(balances or [])
        h = self.model.norm(h)
        logits = self.lm_head(h) if return_logits or labels is None else None
        n_mtp_moe = sum(layer.is_moe for layer in self.mtp)
        if labels is None:
            counts += [torch.zeros(cfg.n_routed_experts, dtype=torch.long, device=h.device)] * n_mtp_moe
            return ModelOutput(logits=logits, expert_counts=_stack(counts, cfg, h.device))

        n_targets = (labels != -100).sum().clamp_min(1)
        main_loss = (_ce_sum(logits, labels) if logits is not None
                     else linear_cross_entropy(h, self.lm_head.weight, labels, chunk_fn=self.ce_chunk)) / n_targets
        mtp_losses = []
        t = labels.shape[1]
        prev = h
        for k, layer in enumerate(self.mtp, start=1):
            if t <= k:  # nothing to predict this far ahead in such a short window
                mtp_losses.append(main_loss.new_zeros(()))
                if layer.is_moe:
                    counts.append(torch.zeros(cfg.n_routed_experts, dtype=torch.long, device=h.device))
                continue
            x = layer.merge(emb[:, k:], prev[:, : t - k])
            cos, sin = self.rotary(torch.arange(t - k, device=h.device), x.dtype)
            mask_k = token_mask[:, k:] if token_mask is not None else None
            x, c, b = layer(x, cos, sin, mask_k, alpha)
            if c is not None:
                counts.append(c)
                balances.append(b)
            mtp_losses.append(linear_cross_entropy(layer.shared_head.norm(x), self.lm_head.weight, labels[:, k:],
                                                   chunk_fn=self.ce_chunk) / n_targets)
            prev = x
        mtp_loss = torch.stack(mtp_losses).mean() if mtp_losses else main_loss.new_zeros(())
        balance = torch.stack(balances).sum() if balances else main_loss.new_zeros(())
        loss = main_loss + lam * mtp_loss + balance
        return ModelOutput(logits=logits, loss=loss, main_loss=main_loss, mtp_loss=mtp_loss,
                           balance_loss=balance, expert_counts=_stack(counts, cfg, h.device))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                token_mask: torch.Tensor | None = None, mtp_weight: float | None = None,
                balance_alpha: float | None = None, return_logits: bool = True) -> ModelOutput:
        """input_ids [B, T]; labels [B, T] with labels[t] the target of position t (-100: ignored);
        token_mask [B, T] bool (False = padding, left out of expert counts and the balance loss).
        Without labels only the main stack runs (no MTP, its count rows are zero, no losses).
        return_logits=False (with labels): no logits in the output, the fused head + loss instead.
        The composition of the parts: embed, blocks over every main layer, head_and_losses."""
        alpha = self.config.balance_loss_alpha if balance_alpha is None else balance_alpha
        if labels is None:
            alpha = 0.0
        emb = self.embed(input_ids)
        h, counts, balances = self.blocks(emb, None, token_mask, alpha)
        return self.head_and_losses(h, emb, labels, token_mask, mtp_weight, alpha, return_logits, counts, balances)


def _ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=-100, reduction="sum")


def _stack(counts: list[torch.Tensor], cfg: ModelConfig, device) -> torch.Tensor:
    if not counts:
        return torch.zeros(0, cfg.n_routed_experts, dtype=torch.long, device=device)
    return torch.stack(counts)
