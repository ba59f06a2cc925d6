"""Model size, activated parameters, training FLOPs and KV-cache size, counted on the meta device.

The model is built under `torch.device("meta")`, so shapes exist but no weights are allocated; the
671B configuration is counted in well under a second.

Definitions (main model; the MTP module is reported separately as `mtp_*`):
* total_params: every parameter of the main model (embedding and head counted once each).
* active_params: the parameters one token's forward multiplies with: everything except the
  unselected routed experts, with the embedding table counted as the one row a token reads (a
  lookup, not a matmul). For DeepSeek-V3 this gives 36.6B (the report says 37B; counting the whole
  embedding table would give 37.5B).
* flops_per_token (training, forward + backward) = 6 * N_matmul + 6 * L * n_h * (d_qk + d_v) * S / 2:
  N_matmul = activated weights used in matrix products (attention projections, FFN/experts, router,
  head); the second term is causal attention (QK^T and AV, 2 FLOPs per multiply-add, 3x for the
  backward) with an average context of S/2 for sequence length S. For DeepSeek-V3 at S = 4096 this is
  6 * 36.6B + 30.7G = 250 GFLOPs/token (derived from the config, as the reference's §2.1 estimate).
* total_params_without_embeddings / active_params_without_embeddings: the same counts less the input
  embedding table and the output head (both vocab_size x hidden_size): Moonlight's convention, whose
  README gives 15.29B / 2.24B for Moonlight-16B-A3B.
* kv_cache_bytes_per_token: the compressed MLA cache, (kv_lora_rank + qk_rope_head_dim) values per
  layer in the compute dtype (61 * 576 * 2 B = 70,272 B for DeepSeek-V3 in bf16).
"""

from __future__ import annotations

import torch

from sourcelm.config import ModelConfig
from sourcelm.model.moe import MoE, RoutedExperts
from sourcelm.model.norm_rope import RMSNorm

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def _count(module: torch.nn.Module, cfg: ModelConfig) -> dict:
    """total, activated and matmul-activated parameter counts of a module tree."""
    total = active = matmul = 0
    for sub in module.modules():
        own = sum(p.numel() for p in sub.parameters(recurse=False))
        total += own
        if isinstance(sub, RoutedExperts):
            share = own * cfg.num_experts_per_tok // cfg.n_routed_experts
            active += share
            matmul += share
        elif isinstance(sub, torch.nn.Embedding):
            active += sub.embedding_dim
        elif isinstance(sub, RMSNorm):
            active += own
        else:
            active += own
            matmul += own
    return {"total": total, "active": active, "matmul": matmul}


def model_stats(cfg: ModelConfig, seq_len: int = 4096, dtype: str = "bfloat16") -> dict:
    from sourcelm.model.transformer import DeepseekV3

    with torch.device("meta"):
        model = DeepseekV3(cfg)
    main = _count(model.model, cfg)
    head = _count(model.lm_head, cfg)
    mtp = _count(model.mtp, cfg)
    for key in main:
        main[key] += head[key]
    attn_per_layer = 6 * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * seq_len / 2
    flops = 6 * main["matmul"] + cfg.num_hidden_layers * attn_per_layer
    # MTP reuses the head: its matmuls per token are its own block plus one more pass through the head
    mtp_flops = (6 * (mtp["matmul"] + head["matmul"]) + cfg.num_nextn_predict_layers * attn_per_layer
                 if cfg.num_nextn_predict_layers else 0)
    moe_layers = [m for m in model.modules() if isinstance(m, MoE)]
    vocab_by_hidden = cfg.vocab_size * cfg.hidden_size
    return {
        "total_params": main["total"],
        "active_params": main["active"],
        "total_params_without_embeddings": main["total"] - 2 * vocab_by_hidden,
        "active_params_without_embeddings": main["active"] - vocab_by_hidden - cfg.hidden_size,  # head, one row
        "flops_per_token": int(flops),
        "kv_cache_bytes_per_token": cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
        * DTYPE_BYTES[dtype],
        "mtp_params": mtp["total"],
        "mtp_flops_per_token": int(mtp_flops),
        "train_flops_per_token": int(flops + mtp_flops),
        "moe_layers": len(moe_layers),
        "seq_len": seq_len,
        "dtype": dtype,
    }
