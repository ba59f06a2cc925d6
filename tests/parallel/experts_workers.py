"""Per-rank bodies of the expert-parallel model tests (run by sourcelm.parallel.local_ranks.run_ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from sourcelm.config import ModelConfig
from sourcelm.model import build_model, init_weights
from sourcelm.model.moe import MoE
from sourcelm.parallel.experts import (
    ExpertParallelExperts,
    apply_expert_parallel,
    expert_shards,
    gather_expert_state,
    load_expert_state,
)
from sourcelm.parallel.topology import build_topology


def small_config() -> ModelConfig:
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=16,
                      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                      n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                      first_k_dense_replace=1, num_nextn_predict_layers=1, max_position_embeddings=64)
    cfg.validate()
    return cfg


def _randomize(module: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for name, b in module.named_buffers():
            if name.endswith("e_score_correction_bias"):  # nonzero biases change the selection
                b.copy_(torch.randn(b.shape, generator=g) * 0.05)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) if b.numel() else 0.0


def _compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    return {"rel": _rel(got, ref), "bitwise": bool(torch.equal(got.detach(), ref.detach()))}


def moe_layer_worker(rank, world, ep, ranks_per_node, kind):
    """One MoE layer: every rank routes its own tokens; the EP layer must equal the full layer on the
    same tokens, and its parameter gradients the full layer's summed over all ranks' tokens."""
    cfg = small_config()
    topo = build_topology(ep, ranks_per_node, cfg.n_routed_experts, cfg.n_group, cfg.topk_group)
    ref = MoE(cfg)
    _randomize(ref, seed=7)
    ep_layer = MoE(cfg)
    ep_layer.load_state_dict(ref.state_dict())
    from sourcelm.parallel.dispatch import make_dispatcher

    ep_layer.experts = ExpertParallelExperts.from_full(ep_layer.experts, make_dispatcher(kind, topo))
    n_tokens = [37, 5, 0, 21][rank % 4]  # uneven, one rank with no tokens at all
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(1, n_tokens, cfg.hidden_size, generator=g)
    up = torch.randn(1, n_tokens, cfg.hidden_size, generator=g)

    x_ref = x.clone().requires_grad_()
    if n_tokens:
        out_ref, _, _ = ref(x_ref)
        (out_ref * up).sum().backward()
    else:  # the single-device layer does not take an empty batch; its answer is empty, its grads zero
        out_ref, x_ref.grad = x.clone(), torch.zeros_like(x)
        for p in ref.parameters():
            p.grad = torch.zeros_like(p)
    x_ep = x.clone().requires_grad_()
    out_ep, _, _ = ep_layer(x_ep)
    (out_ep * up).sum().backward()

    res = {"out": _compare(out_ref, out_ep), "dx": _compare(x_ref.grad, x_ep.grad)}
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    for t in ref_grads.values():  # the full layer over the global batch: sum the per-rank gradients
        dist.all_reduce(t)
    for n, p in ep_layer.named_parameters():
        grad = p.grad.clone()
        if n.startswith("experts."):  # expert grads: complete over the EP group, summed over replicas
            dist.all_reduce(grad, group=topo.groups["expert_replica"])
            sl = slice(ep_layer.experts.expert_offset, ep_layer.experts.expert_offset + ep_layer.experts.n_local)
            res[n] = _compare(ref_grads[n][sl], grad)
        else:
            dist.all_reduce(grad)
            res[n] = _compare(ref_grads[n], grad)
    return res


def model_worker(rank, world, ep, ranks_per_node, kind):
    """The whole model (dense layer, MoE layer, MTP block): apply_expert_parallel on the full model
    equals the full model; checkpoint helpers and layout-independent init agree with it."""
    cfg = small_config()
    topo = build_topology(ep, ranks_per_node, cfg.n_routed_experts, cfg.n_group, cfg.topk_group)
    ref = build_model(cfg, seed=3)
    model = build_model(cfg, seed=3)
    dispatcher = apply_expert_parallel(model, topo, kind)
    g = torch.Generator().manual_seed(200 + rank)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    out_ref = ref(inputs, labels=labels)
    out_ref.loss.backward()
    dispatcher.stats.reset()
    out = model(inputs, labels=labels)
    out.loss.backward()
    stats = dispatcher.stats.reset()
    res = {"loss": _compare(out_ref.loss.detach(), out.loss.detach()),
           "logits": _compare(out_ref.logits.detach(), out.logits.detach()), "stats": stats,
           "n_moe_layers": len(model.moe_layers())}
    shards = expert_shards(model)
    ref_params = dict(ref.named_parameters())
    worst = 0.0
    for n, p in model.named_parameters():
        ref_grad, grad = ref_params[n].grad.clone(), p.grad.clone()
        dist.all_reduce(ref_grad)
        if n in shards:
            dist.all_reduce(grad, group=topo.groups["expert_replica"])
            ref_grad = ref_grad[shards[n].start:shards[n].stop]
        else:
            dist.all_reduce(grad)
        worst = max(worst, _rel(ref_grad, grad))
    res["worst_grad_rel"] = worst

    # checkpoint helpers: global tensors back, and a reload into a freshly sharded model
    full = gather_expert_state(model, topo)
    res["gathered_equal"] = all(torch.equal(full[n], ref_params[n].detach()) for n in shards)
    other = build_model(cfg, seed=None)
    apply_expert_parallel(other, topo, kind)
    load_expert_state(other, full)
    other_params = dict(other.named_parameters())
    res["reloaded_equal"] = all(torch.equal(other_params[n], p) for n, p in model.named_parameters() if n in shards)
    # layout-independent init: initialising the sharded model directly gives the same slices
    init_weights(other, seed=3)
    res["init_equal"] = all(torch.equal(other_params[n], p) for n, p in model.named_parameters())
    res["shards"] = {n: (s.global_name, s.start, s.stop, s.global_shape) for n, s in shards.items()}
    return res


class _Logged(torch.autograd.Function):
    """Identity that logs when its backward runs."""

    @staticmethod
    def forward(ctx, x, log):
        ctx.log = log
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        ctx.log.append("shared expert backward")
        return g, None


def overlap_order_worker(rank, world):
    """The order of events in one EP layer forward and backward: the shared expert must run after the
    inter-node all-to-all was issued and before it is waited for, in both passes."""
    from sourcelm.parallel import transport

    cfg = small_config()
    topo = build_topology(world, 1, cfg.n_routed_experts, cfg.n_group, cfg.topk_group)
    log: list[str] = []
    hop_forward, hop_reverse, pending_wait = transport.Hop.forward, transport.Hop.reverse, transport.Pending.wait

    def forward(self, tensors, stats, alias=False, backward=False):
        log.append("issue forward" if self.groups[0] is not None else "local forward")
        return hop_forward(self, tensors, stats, alias, backward)

    def reverse(self, tensors, stats, alias=False, backward=False):
        log.append("issue reverse" if self.groups[0] is not None else "local reverse")
        return hop_reverse(self, tensors, stats, alias, backward)

    def wait(self):
        if self.works:
            log.append("wait")
        return pending_wait(self)

    transport.Hop.forward, transport.Hop.reverse, transport.Pending.wait = forward, reverse, wait
    layer = MoE(cfg)
    _randomize(layer, seed=1)
    from sourcelm.parallel.dispatch import make_dispatcher

    layer.experts = ExpertParallelExperts.from_full(layer.experts, make_dispatcher("two_hop", topo))
    shared = layer.shared_experts
    x = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(rank), requires_grad=True)
    topk_idx, topk_weights, _ = layer.gate(x)

    def overlap():
        log.append("shared expert forward")
        return _Logged.apply(shared(x), log)

    out = layer.experts(x, topk_idx, topk_weights, overlap=overlap)
    log.append("-- backward --")
    out.sum().backward()
    return log
