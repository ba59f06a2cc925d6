"""Parity with transformers' DeepseekV3ForCausalLM in both directions (fp32, CPU, small configs)."""

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sourcelm.config import load_config
from sourcelm.interop.hf import load_hf, save_hf
from sourcelm.model import build_model

transformers = pytest.importorskip("transformers")

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}

BASE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, max_position_embeddings=128)

CONFIGS = {
    "q_lora_groups4_dense1": dict(q_lora_rank=48, n_group=4, topk_group=2, num_experts_per_tok=4,
                                  first_k_dense_replace=1),
    "plain_q_one_group_no_dense": dict(q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=2,
                                       first_k_dense_replace=0, num_nextn_predict_layers=0),
    "yarn_groups8_dense2": dict(q_lora_rank=24, n_group=8, topk_group=2, num_experts_per_tok=4,
                                first_k_dense_replace=2, rope_scaling=YARN),
    "two_shared_unnormalised": dict(q_lora_rank=None, n_group=2, topk_group=1, num_experts_per_tok=2,
                                    n_shared_experts=2, norm_topk_prob=False, routed_scaling_factor=1.5,
                                    num_nextn_predict_layers=2),
}


def make_cfg(name):
    return dataclasses.replace(load_config("tiny").model, **BASE, **copy.deepcopy(CONFIGS[name]))


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def hf_config(cfg):
    d = copy.deepcopy(cfg.to_hf_dict())  # transformers edits rope dicts in place
    for key in ("architectures", "model_type", "torch_dtype"):
        d.pop(key)
    return transformers.DeepseekV3Config(**d)


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()
    yield


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_to_transformers(name, tmp_path):
    cfg = make_cfg(name)
    model = build_model(cfg, seed=1)
    with torch.no_grad():
        for p in model.parameters():  # larger weights than 0.006 so that every layer matters in the logits
            p.mul_(8.0) if p.dim() > 1 else p.add_(0.1 * torch.randn_like(p))
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(0.0, 0.2)
    model.eval()
    save_hf(model, tmp_path, max_shard_bytes=200_000)
    assert len(json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(ids).logits, hf(ids).logits
    assert rel_err(ours, theirs) < 1e-5
    # HF reloaded every weight we wrote for the main model (MTP layers it ignores)
    hf_state = hf.state_dict()
    assert torch.equal(hf_state["model.layers.2.mlp.gate.e_score_correction_bias"],
                       model.state_dict()["model.layers.2.mlp.gate.e_score_correction_bias"])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_to_ours(name, tmp_path):
    cfg = make_cfg(name)
    torch.manual_seed(2)
    hf = transformers.DeepseekV3ForCausalLM(hf_config(cfg))
    with torch.no_grad():
        for _n, p in hf.named_parameters():
            p.copy_(torch.randn_like(p) * (0.05 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0.0))
        for n, b in hf.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.2)  # nonzero, some negative: both mask dropped groups with -inf
    hf.eval()
    hf.save_pretrained(tmp_path)
    assert "rope_parameters" in json.loads((tmp_path / "config.json").read_text())  # the transformers-5 spelling
    ours = load_hf(tmp_path)
    assert ours.config.num_nextn_predict_layers == 0  # transformers does not save MTP weights
    ids = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(ours(ids).logits, hf(ids).logits) < 1e-5

    # the fused in-memory layout of transformers 5 (gate_up_proj [E, 2I, H], down_proj [E, H, I]) loads too
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(fused / "model.safetensors"))
    assert any(k.endswith("experts.gate_up_proj") for k in load_file(str(fused / "model.safetensors")))
    (fused / "config.json").write_text((tmp_path / "config.json").read_text())
    again = load_hf(fused)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ours(ids).logits)


def test_round_trip_keeps_every_tensor_including_mtp(tmp_path, caplog):
    cfg = make_cfg("yarn_groups8_dense2")
    model = build_model(cfg, seed=5)
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.1, 0.1)
    save_hf(model, tmp_path, dtype=torch.bfloat16)
    tensors = {}
    for f in tmp_path.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    n = cfg.num_hidden_layers
    assert tensors[f"model.layers.{n}.eh_proj.weight"].shape == (64, 128)
    assert torch.equal(tensors[f"model.layers.{n}.embed_tokens.weight"], tensors["model.embed_tokens.weight"])
    assert torch.equal(tensors[f"model.layers.{n}.shared_head.head.weight"], tensors["lm_head.weight"])
    assert tensors["model.layers.2.mlp.experts.15.down_proj.weight"].shape == (64, 32)
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert tensors["model.layers.2.mlp.gate.weight"].dtype == torch.bfloat16
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["rope_scaling"]["type"] == "yarn" and config["rope_theta"] == 10000.0
    assert config["num_nextn_predict_layers"] == 1 and config["topk_method"] == "noaux_tc"
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == cfg.eos_token_id

    back = load_hf(tmp_path)
    assert back.config.rope_scaling == cfg.rope_scaling
    ref = {k: v.to(torch.bfloat16).float() if not k.endswith("bias") else v for k, v in model.state_dict().items()}
    got = back.state_dict()
    assert set(got) == set(ref)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
