"""The count of best biased affinities that scores a group (`ModelConfig.group_score_topk`): the default is the
released rule (top 2, as transformers), an explicit count changes which groups stay, and the native selection
kernel equals its torch code index for index for every count the config allows."""

import pytest
import torch

from sourcelm.config import ModelConfig
from sourcelm.kernels import cpu_moe, reference
from sourcelm.model.moe import Router

# 8 experts in 2 groups of 4, keep 1 group, top 2. Group 0 has the single best expert, group 1 the better pair
# and the better four: the top 1 keeps group 0, the top 2 (released) and top 4 (the report's K/M reading with
# K = 4, M = 1) keep group 1.
BIASED = torch.tensor([0.90, 0.05, 0.04, 0.03, 0.50, 0.48, 0.47, 0.46])


def _router(group_score_topk=None, k=2):
    cfg = ModelConfig(hidden_size=8, n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=k,
                      group_score_topk=group_score_topk)
    cfg.validate()
    router = Router(cfg)
    with torch.no_grad():
        router.weight.zero_()  # every score is sigmoid(0) = 0.5; the bias sets s' = 0.5 + b
        router.e_score_correction_bias.copy_(BIASED - 0.5)
    return router


@pytest.mark.parametrize("count, experts", [(None, [4, 5]), (1, [0, 1]), (2, [4, 5]), (4, [4, 5])])
def test_the_count_decides_which_group_stays(count, experts):
    idx, _, _ = _router(count)(torch.randn(3, 8))
    assert idx.sort(-1).values.tolist() == [experts] * 3


def test_the_default_routes_as_transformers():
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    hf = DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=8, n_routed_experts=8, n_group=2, topk_group=1,
                                               num_experts_per_tok=4))
    ours = _router(k=4)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(5, 8)
    _, _, hf_idx = hf(x)
    assert torch.equal(ours(x)[0].sort(-1).values, hf_idx.sort(-1).values)
    assert ours(x)[0].sort(-1).values.tolist() == [[4, 5, 6, 7]] * 5  # group 1 by its top 2, not group 0 by its top 1


def _exact_scores(tokens, e, seed):
    """Scores and bias whose biased values s' = s + b are distinct multiples of 1/64: every sum of them is exact in
    fp32 whatever the order of the additions, so the kernel (sequential sums) and torch (vectorised sums) differ
    only where two groups tie, which `_untied` leaves out."""
    g = torch.Generator().manual_seed(seed)
    biased = torch.stack([(1 + torch.randperm(e, generator=g).float()) / 64 for _ in range(tokens)])
    bias = (torch.randint(-2, 3, (e,), generator=g) * 0.125).float()  # multiples of 1/8: s = s' - b stays exact
    return biased - bias, bias


def _untied(biased, groups, count):
    """Rows whose group scores (sum of the top `count` of each group) are all different."""
    scores = biased.view(len(biased), groups, -1).double().topk(count, -1).values.sum(-1).sort(-1).values
    return (scores.diff(dim=-1) != 0).all(-1)


@pytest.mark.parametrize("e,groups", [(8, 8), (16, 2), (16, 4), (16, 8), (24, 3), (24, 6)])
def test_kernel_equals_torch_code_for_every_count(e, groups):
    per_group = e // groups
    scores, bias = _exact_scores(400, e, seed=e * groups)
    decided = 0
    for count in range(1, per_group + 1):
        rows = _untied(scores + bias, groups, count)
        assert rows.sum() >= 20, count
        s = scores[rows]
        for keep in range(1, groups + 1):
            for k in sorted({1, keep * per_group // 2 or 1, keep * per_group}):
                assert cpu_moe.route_takes(s, groups, keep, k)
                got = cpu_moe.route_topk(s, bias, groups, count, keep, k)
                assert torch.equal(got, reference.route_topk(s, bias, groups, count, keep, k)), (keep, count, k)
                if count > 1 and keep < groups:  # the count matters: it keeps other groups than count - 1 does
                    before = reference.route_topk(s, bias, groups, count - 1, keep, k)
                    decided += int((got.sort(-1).values != before.sort(-1).values).any(-1).sum())
    assert decided > 0 or per_group == 1  # groups of one expert: count 1 is the only count
