import torch
from torch import nn

from sourcelm.train.balancer import LoadBalancer, load_statistics


class FakeMoE(nn.Module):
    def __init__(self, e):
        super().__init__()
        self.gate = nn.Module()
        self.gate.register_buffer("e_score_correction_bias", torch.zeros(e))


def test_sign_rule_moves_against_load():
    layers = [("a", FakeMoE(4)), ("b", FakeMoE(4))]
    bal = LoadBalancer(layers)
    counts = torch.tensor([[10, 0, 5, 5], [5, 5, 5, 5]])
    stats = bal.update(counts, gamma=0.001)
    # mean 5: expert 0 overloaded (−γ), expert 1 underloaded (+γ), balanced ones unchanged
    assert torch.equal(layers[0][1].gate.e_score_correction_bias, torch.tensor([-0.001, 0.001, 0.0, 0.0]))
    assert torch.equal(layers[1][1].gate.e_score_correction_bias, torch.zeros(4))
    assert stats["max_violation"][0] == 1.0 and stats["max_violation"][1] == 0.0
    assert stats["bias_norm"][1] == 0.0


def test_gamma_zero_freezes_bias_and_counts_accumulate_over_microbatches():
    layers = [("a", FakeMoE(3))]
    bal = LoadBalancer(layers)
    bal.accumulate(torch.tensor([[1, 2, 3]]))
    bal.accumulate(torch.tensor([[3, 2, 1]]))
    counts = bal.take()
    assert counts.tolist() == [[4, 4, 4]]
    assert bal.take().tolist() == [[0, 0, 0]]  # a fresh accumulator per step
    bal.update(torch.tensor([[9, 0, 0]]), gamma=0.0)
    assert torch.equal(layers[0][1].gate.e_score_correction_bias, torch.zeros(3))


def test_statistics_cv():
    s = load_statistics(torch.tensor([[2, 4, 6, 8]]))
    mean = 5.0
    std = (sum((x - mean) ** 2 for x in (2, 4, 6, 8)) / 4) ** 0.5
    assert abs(s["load_cv"][0] - std / mean) < 1e-12
    assert abs(s["max_violation"][0] - (8 / 5 - 1)) < 1e-12


def test_repeated_updates_drive_a_biased_router_towards_balance():
    """A router whose affinities favour expert 0 ends up spreading tokens once the biases adapt."""
    torch.manual_seed(0)
    layers = [("a", FakeMoE(8))]
    bal = LoadBalancer(layers)
    bias = layers[0][1].gate.e_score_correction_bias
    skew = torch.linspace(0.3, 0.0, 8)
    first = None
    for _ in range(400):
        scores = torch.rand(512, 8) * 0.1 + skew
        top = (scores + bias).topk(2, dim=1).indices
        counts = torch.bincount(top.flatten(), minlength=8)[None]
        stats = bal.update(counts, gamma=0.002)
        first = first if first is not None else stats["max_violation"][0]
    assert first > 2.0 and stats["max_violation"][0] < 0.3
