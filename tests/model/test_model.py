"""The whole model: layout-independent init, the loss composition and MTP wiring, and `sourcelm info`."""

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from sourcelm.config import load_config
from sourcelm.model import build_model, init_expert_slice
from sourcelm.model.flops import model_stats


def tiny(**over):
    return dataclasses.replace(load_config("tiny").model, **over)


def test_init_is_a_pure_function_of_seed_and_name():
    a, b = build_model(tiny(), seed=7), build_model(tiny(), seed=7)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = build_model(tiny(), seed=8).state_dict()
    assert not torch.equal(sa["model.layers.1.self_attn.kv_b_proj.weight"],
                           c["model.layers.1.self_attn.kv_b_proj.weight"])
    # a model with a different number of layers/experts gives the same values to the names they share
    d = build_model(tiny(num_hidden_layers=2), seed=7).state_dict()
    assert torch.equal(d["model.layers.1.self_attn.q_b_proj.weight"], sa["model.layers.1.self_attn.q_b_proj.weight"])
    std = sa["model.layers.2.self_attn.o_proj.weight"].std().item()
    assert std == pytest.approx(0.006, rel=0.05)
    assert torch.equal(sa["model.norm.weight"], torch.ones(256))
    assert torch.equal(sa["model.layers.1.mlp.gate.e_score_correction_bias"], torch.zeros(16))


def test_expert_slice_init_matches_full_model():
    cfg = tiny()
    full = build_model(cfg, seed=3).state_dict()
    for which in ("w1", "w2", "w3"):
        ref = full[f"model.layers.2.mlp.experts.{which}"]
        for e in (0, 9, 15):  # as an expert-parallel rank holding experts [8, 16) would
            piece = torch.empty_like(ref[e])
            init_expert_slice(piece, 3, "model.layers.2.mlp.experts", e, which, cfg.initializer_range)
            assert torch.equal(piece, ref[e])


def test_loss_parts_and_mtp_wiring():
    cfg = tiny(num_nextn_predict_layers=2, attn_impl="eager")
    model = build_model(cfg, seed=0)
    for _, moe in model.moe_layers():
        moe.gate.e_score_correction_bias.uniform_(0, 0.02)
    torch.manual_seed(0)
    w = torch.randint(0, cfg.vocab_size, (2, 25))
    ids, labels = w[:, :-1], w[:, 1:].clone()
    labels[0, 3] = -100
    out = model(ids, labels=labels, mtp_weight=0.3, balance_alpha=1e-3)
    n = (labels != -100).sum()
    assert out.main_loss.item() == pytest.approx(F.cross_entropy(out.logits.reshape(-1, cfg.vocab_size),
                                                                  labels.reshape(-1)).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((out.main_loss + 0.3 * out.mtp_loss + out.balance_loss).item(), rel=1e-6)
    assert out.balance_loss.item() > 0
    assert out.expert_counts.shape == (len(model.moe_layers()), 16) == (3 + 2, 16)
    assert out.expert_counts.sum(1).tolist() == [24 * 2 * 4] * 3 + [23 * 2 * 4, 22 * 2 * 4]

    # MTP by hand (report eq. 21-25, embedding first as in the checkpoint), with the model's own modules
    with torch.no_grad():
        h, _, _ = model.hidden_states(ids)
        t = ids.shape[1]
        prev, losses = h, []
        for k, layer in enumerate(model.mtp, start=1):
            x = layer.eh_proj(torch.cat([layer.enorm(model.model.embed_tokens(ids[:, k:])),
                                         layer.hnorm(prev[:, : t - k])], -1))
            cos, sin = model.rotary(torch.arange(t - k), x.dtype)
            x, _, _ = layer(x, cos, sin)
            logits = model.lm_head(layer.shared_head.norm(x))
            losses.append(F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels[:, k:].reshape(-1),
                                          ignore_index=-100, reduction="sum") / n)
            prev = x
    assert out.mtp_loss.item() == pytest.approx(torch.stack(losses).mean().item(), rel=1e-5)


def test_main_logits_are_causal_and_every_parameter_gets_a_gradient():
    cfg = tiny()
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    base = model(ids).logits
    ids2 = ids.clone()
    ids2[0, 10] = (ids2[0, 10] + 1) % cfg.vocab_size
    changed = (model(ids2).logits - base).abs().amax(-1)[0]
    assert changed[:10].max() < 1e-5 and changed[10:].min() > 1e-3  # sdpa blocking: ulp-level noise only
    # gradients reach every parameter when labels are given (the MTP block included)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_info_671b_matches_report():
    stats = model_stats(load_config("deepseek-v3-671b").model, seq_len=4096, dtype="bfloat16")
    assert stats["total_params"] == pytest.approx(671e9, rel=0.015)
    assert stats["active_params"] == pytest.approx(37e9, rel=0.015)
    assert stats["flops_per_token"] == pytest.approx(250e9, rel=0.02)
    assert stats["kv_cache_bytes_per_token"] == 61 * 576 * 2 == 70272
    assert stats["mtp_params"] == pytest.approx(11.6e9, rel=0.02)


def test_info_counts_equal_allocated_model():
    cfg = tiny()
    model = build_model(cfg, seed=None)
    stats = model_stats(cfg, seq_len=256, dtype="float32")
    main = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("mtp."))
    assert stats["total_params"] == main
    assert stats["mtp_params"] == sum(p.numel() for n, p in model.named_parameters() if n.startswith("mtp."))


def test_info_cli_json(capsys):
    from sourcelm.cli import main

    assert main(["info", "deepseek-v3-671b", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {"total_params", "active_params", "flops_per_token", "kv_cache_bytes_per_token"} <= set(data)
    assert main(["info", "tiny"]) == 0
