"""Node-limited routing equals transformers' (the released rule: a group scores the sum of its top 2 biased
affinities) over a grid of group settings, in both directions: ours -> save_hf -> transformers, and a
transformers model -> save_pretrained -> load_hf -> ours. fp32, CPU, tiny models so that the grid
runs in seconds; `bench/routing_parity.py` prints the same measurements as a table."""

import dataclasses

import pytest
import torch

from sourcelm.config import ConfigError, ModelConfig
from sourcelm.interop.hf import load_hf, save_hf
from sourcelm.model import build_model

transformers = pytest.importorskip("transformers")

N_EXPERTS = 8
TINY = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
            first_k_dense_replace=0, num_attention_heads=2, num_key_value_heads=2, q_lora_rank=None,
            kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=N_EXPERTS,
            n_shared_experts=1, num_nextn_predict_layers=0, max_position_embeddings=64)
TOLERANCE = 1e-5  # DESIGN invariant 6: fp32 logits equal to 1e-5 relative
GROUP_SETTINGS = [(g, m) for g in (1, 2, 4) for m in range(1, g + 1)]  # (n_group, topk_group)


def kept_experts(n_group: int, topk_group: int) -> int:
    return topk_group * N_EXPERTS // n_group


def grid_config(n_group: int, topk_group: int, k: int, **extra) -> ModelConfig:
    cfg = ModelConfig(**TINY, n_group=n_group, topk_group=topk_group, num_experts_per_tok=k, **extra)
    cfg.validate()
    return cfg


def report_reading(n_group: int, topk_group: int, k: int) -> int | None:
    """The report's K / M count where it is a whole number that differs from the released 2 and decides
    something (a group is dropped); None elsewhere."""
    if n_group == 1 or topk_group == n_group or k % topk_group or k // topk_group == 2:
        return None
    return k // topk_group


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, TINY["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(seed))


def _spread_weights(named_params, named_buffers, seed: int) -> None:
    """Weights large enough that every layer moves the logits, router weights that spread the sigmoid scores
    over (0, 1) so that tokens disagree on their groups, and a nonzero bias with negative entries."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_params:
            if name.endswith("mlp.gate.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            elif p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.08)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
        for name, b in named_buffers:
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.3 - 0.1)


def ours_to_transformers_error(cfg: ModelConfig, out_dir, seed: int = 0) -> float:
    model = build_model(cfg, seed=seed)
    _spread_weights(model.named_parameters(), model.named_buffers(), seed)
    model.eval()
    save_hf(model, out_dir)
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(out_dir).eval()
    ids = _tokens(seed)
    with torch.no_grad():
        return rel_err(model(ids).logits, hf(ids).logits)


def transformers_to_ours_errors(cfg: ModelConfig, out_dir, seed: int = 0, reading: int | None = None):
    """(error of load_hf's model, error of the same weights routed with `reading` as group_score_topk or None)."""
    hf_dict = {k: v for k, v in cfg.to_hf_dict().items() if k not in ("architectures", "model_type", "torch_dtype")}
    hf = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_dict))
    _spread_weights(hf.named_parameters(), hf.named_buffers(), seed)
    hf.eval()
    hf.save_pretrained(out_dir)
    ours = load_hf(out_dir)
    assert ours.config.group_score_topk is None  # a model from HF always routes by the released rule
    ids = _tokens(seed)
    with torch.no_grad():
        theirs = hf(ids).logits
        err = rel_err(ours(ids).logits, theirs)
        if reading is None:
            return err, None
        other = build_model(dataclasses.replace(ours.config, group_score_topk=reading), seed=None)
        other.load_state_dict(ours.state_dict())
        return err, rel_err(other.eval()(ids).logits, theirs)


def grid_cells(n_group: int, topk_group: int):
    return [(n_group, topk_group, k) for k in range(1, kept_experts(n_group, topk_group) + 1)]


@pytest.fixture(autouse=True)
def quiet_transformers():
    transformers.logging.set_verbosity_error()
    yield


@pytest.mark.parametrize("n_group,topk_group", GROUP_SETTINGS)
def test_ours_to_transformers_over_the_group_grid(n_group, topk_group, tmp_path):
    for cell in grid_cells(n_group, topk_group):
        assert ours_to_transformers_error(grid_config(*cell), tmp_path / str(cell[2])) < TOLERANCE, cell


@pytest.mark.parametrize("n_group,topk_group", GROUP_SETTINGS)
def test_transformers_to_ours_over_the_group_grid(n_group, topk_group, tmp_path):
    for cell in grid_cells(n_group, topk_group):
        err, _ = transformers_to_ours_errors(grid_config(*cell), tmp_path / str(cell[2]))
        assert err < TOLERANCE, cell


def test_the_grid_sees_the_group_score_rule(tmp_path):
    """The grid can fail: the report's K/M count (the rule before this fix) is far from transformers in the
    issue's cell (8 experts, 2 groups, keep 1, K = 4), while the released rule matches."""
    err, reading_err = transformers_to_ours_errors(grid_config(2, 1, 4), tmp_path, reading=4)
    assert err < TOLERANCE and reading_err > 1e-2


def test_a_count_that_keeps_every_group_exports(tmp_path):
    """With topk_group = n_group the group scores choose nothing, so any count routes as transformers does."""
    cfg = grid_config(2, 2, 3, group_score_topk=4)
    assert ours_to_transformers_error(cfg, tmp_path) < TOLERANCE


@pytest.mark.parametrize("extra, message", [
    (dict(n_group=2, topk_group=1, num_experts_per_tok=4, group_score_topk=4), "model.group_score_topk = 4"),
    (dict(n_group=8, topk_group=4, num_experts_per_tok=4, group_score_topk=1), "leaves 1 expert per group"),
])
def test_export_refuses_routing_transformers_cannot_reproduce(extra, message, tmp_path):
    model = build_model(ModelConfig(**{**TINY, **extra}), seed=0)
    with pytest.raises(ConfigError, match=message):
        save_hf(model, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything is written
