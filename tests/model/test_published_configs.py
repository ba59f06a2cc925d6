"""`sourcelm info` on the released configs kept in configs/published/ (DeepSeek-V3, Kimi-K2, Moonlight) gives
the sizes their publishers state, at the precision they state them; the loader takes the files as published."""

import json
from pathlib import Path

import pytest

from sourcelm.cli import main
from sourcelm.config import load_config, load_model_config

PUBLISHED = Path(__file__).resolve().parents[2] / "configs" / "published"

# file -> [(stat, published figure, unit, decimals the figure is given to), ...]; sources in the README there
FIGURES = {
    "deepseek-v3.config.json": [
        ("total_params", 671, 1e9, 0), ("active_params", 37, 1e9, 0), ("active_params", 36.6, 1e9, 1)],
    "kimi-k2-instruct.config.json": [
        ("total_params", 1, 1e12, 0), ("active_params", 32, 1e9, 0),
        ("total_params", 1_026_408_209_408, 1, 0)],  # the weights in the released safetensors, to the unit
    "moonlight-16b-a3b-instruct.config.json": [
        ("total_params", 16, 1e9, 0), ("active_params", 3, 1e9, 0),
        ("total_params_without_embeddings", 15.29, 1e9, 2), ("active_params_without_embeddings", 2.24, 1e9, 2)],
}


def _info(path: Path, capsys) -> dict:
    assert main(["info", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_info_gives_the_published_sizes(name, capsys):
    stats = _info(PUBLISHED / name, capsys)
    for stat, figure, unit, decimals in FIGURES[name]:
        assert round(stats[stat] / unit, decimals) == figure, (stat, stats[stat])


def test_every_published_config_is_checked_and_named_in_the_readme():
    files = sorted(p.name for p in PUBLISHED.glob("*.json"))
    assert files == sorted(FIGURES)
    readme = (PUBLISHED / "README.md").read_text()
    assert all(f"`{name}`" in readme for name in files)


def test_the_loader_takes_the_files_as_published():
    raw = {p.name: json.loads(p.read_text()) for p in PUBLISHED.glob("*.json")}
    assert raw["deepseek-v3.config.json"]["quantization_config"]["quant_method"] == "fp8"
    assert raw["kimi-k2-instruct.config.json"]["model_type"] == "kimi_k2"
    kimi = load_model_config(PUBLISHED / "kimi-k2-instruct.config.json")
    assert (kimi.n_group, kimi.topk_group, kimi.num_experts_per_tok, kimi.n_routed_experts) == (1, 1, 8, 384)
    assert kimi.group_score_topk is None and kimi.rope_scaling["factor"] == 32.0
    moonlight = load_model_config(PUBLISHED / "moonlight-16b-a3b-instruct.config.json")
    assert moonlight.q_lora_rank is None and moonlight.num_experts_per_tok == 6 and moonlight.rope_scaling is None
    # the published DeepSeek-V3 is the preset, but for the init std (the report's 0.006, not HF's 0.02)
    v3 = load_model_config(PUBLISHED / "deepseek-v3.config.json")
    preset = load_config("deepseek-v3-671b").model
    assert v3.initializer_range == 0.02 and preset.initializer_range == 0.006
    v3.initializer_range = preset.initializer_range
    assert v3 == preset
