"""Autoregressive generation: prefill the prompt into the compressed cache, then one token per step.

Sampling is temperature + nucleus (top-p) with a seeded generator, so a seed reproduces a sample;
temperature 0 is greedy decoding.
"""

from __future__ import annotations

import torch

from sourcelm.infer.mla_cache import MLACache, forward_cached


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None
                ) -> torch.Tensor:
    """logits [B, V] -> next token ids [B]."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = (logits.float() / temperature).softmax(-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the most likely token always stays)
        drop = sorted_p.cumsum(-1) - sorted_p >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.no_grad()
def generate(model, ids: torch.Tensor, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, eos_token_id: int | None = None) -> torch.Tensor:
    """ids [B, T] (prompts of equal length) -> [B, T + n] with n <= max_new_tokens; stops early once every
    row has produced `eos_token_id`."""
    model.eval()
    if ids.dim() == 1:
        ids = ids[None]
    b, t = ids.shape
    dtype = next(model.parameters()).dtype
    cache = MLACache(model.config, b, t + max_new_tokens, dtype=dtype, device=ids.device)
    generator = torch.Generator().manual_seed(seed)
    logits = forward_cached(model, ids, cache)[:, -1]
    out = [ids]
    done = torch.zeros(b, dtype=torch.bool, device=ids.device)
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            nxt = nxt.masked_fill(done, eos_token_id)
            done |= nxt == eos_token_id
        out.append(nxt[:, None])
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        logits = forward_cached(model, nxt[:, None], cache)[:, -1]
    return torch.cat(out, dim=1)
