import torch

from sourcelm.config import load_config
from sourcelm.model.moe import Router


def test_bf16_model_keeps_the_exact_fp32_expert_bias():
    """Bias updates (γ = 1e-3) are below bf16 resolution near 1: a cast would erase them."""
    router = Router(load_config("tiny").model)
    router.e_score_correction_bias.fill_(1.001)
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == torch.tensor(1.001).item()
