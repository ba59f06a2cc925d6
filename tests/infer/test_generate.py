"""Cached decoding with absorbed MLA weights against the full forward, the cache size, sampling, the CLI."""

import dataclasses

import pytest
import torch

from sourcelm.cli import main
from sourcelm.config import load_config
from sourcelm.infer import MLACache, forward_cached, generate
from sourcelm.interop.hf import save_hf
from sourcelm.model import build_model
from sourcelm.model.flops import model_stats

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}


def small(**over):
    base = dict(vocab_size=300, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=2, num_key_value_heads=2, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256)
    return dataclasses.replace(load_config("tiny").model, **{**base, **over})


def sharpen(model):
    with torch.no_grad():  # larger weights than the 0.006 init so greedy choices are decisive
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(10.0)
    return model


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None, "rope_scaling": YARN}])
def test_cached_logits_match_full_forward(over):
    model = sharpen(build_model(small(**over), seed=0)).eval()
    ids = torch.randint(0, 300, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids).logits
    cache = MLACache(model.config, 2, 30)
    pieces = [forward_cached(model, ids[:, :12], cache)]  # prefill
    pieces += [forward_cached(model, ids[:, t:t + 1], cache) for t in range(12, 30)]  # one token at a time
    cached = torch.cat(pieces, dim=1)
    assert ((cached - full).abs().max() / full.abs().max()).item() < 1e-5


def test_greedy_with_cache_equals_rerunning_full_forward():
    model = sharpen(build_model(small(), seed=1)).eval()
    prompt = torch.tensor([[5, 17, 42, 7]])
    out = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    ids = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(out, ids)


def test_cache_holds_latent_and_rope_key_only():
    cfg = small()
    cache = MLACache(cfg, batch=3, max_len=10, dtype=torch.bfloat16)
    expect = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 2
    assert cache.bytes_per_token() == expect == model_stats(cfg, dtype="bfloat16")["kv_cache_bytes_per_token"]


def test_sampling_is_seeded_and_top_p_near_zero_is_greedy():
    model = sharpen(build_model(small(), seed=2)).eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    b = generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    assert torch.equal(a, b)
    greedy = generate(model, prompt, max_new_tokens=8)
    assert torch.equal(generate(model, prompt, max_new_tokens=8, temperature=1.0, top_p=1e-6, seed=4), greedy)
    stop = generate(model, prompt, max_new_tokens=8, eos_token_id=int(greedy[0, 3]))
    assert stop.shape[1] == 4  # stops at the first end-of-sequence token


def _train_tokenizer(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, trainer)
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))


def test_generate_cli_text_and_ids(tmp_path, capsys):
    _train_tokenizer(tmp_path / "tok")
    model = sharpen(build_model(small(), seed=3))
    save_hf(model, tmp_path / "hf", tokenizer_dir=tmp_path / "tok")
    assert main(["generate", str(tmp_path / "hf"), "--prompt", "the quick", "--max-new-tokens", "5"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the quick") and len(text.strip()) > len("the quick")

    save_hf(model, tmp_path / "bare")
    assert main(["generate", str(tmp_path / "bare"), "--prompt-ids", "5,6,7", "--max-new-tokens", "4"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.strip().split(",")]
    expect = generate(model, torch.tensor([[5, 6, 7]]), max_new_tokens=4, eos_token_id=model.config.eos_token_id)
    assert ids == expect[0].tolist()
