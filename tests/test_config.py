import json

import pytest

from sourcelm.config import Config, ConfigError, ModelConfig, load_config, load_model_config, parse_overrides


def test_presets_load_and_the_671b_preset_is_the_published_config():
    tiny = load_config("tiny")
    assert (tiny.model.hidden_size, tiny.model.num_hidden_layers, tiny.model.first_k_dense_replace) == (256, 4, 1)
    assert (tiny.model.n_routed_experts, tiny.model.num_experts_per_tok, tiny.model.n_group, tiny.model.topk_group) \
        == (16, 4, 4, 2)
    v3 = load_config("deepseek-v3-671b").model
    assert (v3.hidden_size, v3.num_hidden_layers, v3.n_routed_experts, v3.num_experts_per_tok) == (7168, 61, 256, 8)
    assert (v3.q_lora_rank, v3.kv_lora_rank, v3.first_k_dense_replace, v3.routed_scaling_factor) == (1536, 512, 3, 2.5)
    assert v3.rope_scaling["factor"] == 40.0 and v3.vocab_size == 129280


def test_overrides_are_typed_toml_values():
    cfg = load_config("tiny", ["optim.lr=1e-3", "data.train=['a', 'b']", "model.q_lora_rank=32",
                               "train.dtype=bfloat16", "schedule.steps=7"])
    assert cfg.optim.lr == 1e-3 and cfg.data.train == ["a", "b"] and cfg.train.dtype == "bfloat16"
    assert parse_overrides(["a.b.c=3"]) == {"a": {"b": {"c": 3}}}
    assert load_config("tiny", ["optim.lr=1"]).optim.lr == 1.0  # an int where a float is expected is fine


@pytest.mark.parametrize("override, message", [
    ("model.hiden_size=3", "did you mean 'hidden_size'"),
    ("model.hidden_size=0", "model.hidden_size = 0 must be positive"),
    ("model.hidden_size='big'", "model.hidden_size"),
    ("model.n_group=3", "not divisible by model.n_group"),
    ("model.topk_group=5", "topk_group = 5 > model.n_group = 4"),
    ("model.num_experts_per_tok=12", "exceeds the 8 experts in the 2 kept groups"),
    ("model.group_score_topk=5", "model.group_score_topk = 5: a group's score sums 1 to 4 of its 4 experts"),
    ("model.group_score_topk=0", "model.group_score_topk = 0"),
    ("model.n_group=16 model.num_experts_per_tok=2", "model.n_group = 16 leaves 1 expert per group"),
    ("model.norm_topk_prob=1", "expected bool"),
    ("schedule.micro_batch=3", "schedule.micro_batch"),
    ("parallel.ep=3", "parallel.ep = 3 must divide model.n_routed_experts"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.gc_every=-1", "train.gc_every = -1 must be >= 0"),
    ("nosuch.key=1", "unknown key 'nosuch'"),
])
def test_bad_values_fail_at_load_naming_the_field(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("tiny", override.split())  # space-separated overrides apply together


def test_bad_toml_and_unknown_preset(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nhidden_size = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="presets: deepseek-v3-671b, small, tiny"):
        load_config("no-such-preset")


def test_hf_dict_round_trip_and_both_rope_spellings():
    v3 = load_config("deepseek-v3-671b").model
    d = v3.to_hf_dict()
    assert d["model_type"] == "deepseek_v3" and d["topk_method"] == "noaux_tc" and d["scoring_func"] == "sigmoid"
    assert "balance_loss_alpha" not in d and "moe_impl" not in d
    d["rope_scaling"]["factor"] = 1.0  # a copy: the config itself is untouched
    assert v3.rope_scaling["factor"] == 40.0
    assert ModelConfig.from_hf_dict(v3.to_hf_dict()) == v3
    v5 = {k: v for k, v in v3.to_hf_dict().items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **{k: v for k, v in v3.rope_scaling.items()
                                                                           if k != "type"}}
    assert ModelConfig.from_hf_dict(v5) == v3


def test_resolved_config_round_trips_through_json(tmp_path):
    cfg = load_config("small", ["schedule.steps=5"])
    again = load_config(json.loads(cfg.to_json()))
    assert again == cfg and isinstance(again, Config)
    (tmp_path / "config.json").write_text(json.dumps(cfg.model.to_hf_dict()))
    assert load_model_config(tmp_path) == cfg.model


def test_group_score_count_defaults_to_the_released_rule_and_stays_out_of_config_json():
    tiny = load_config("tiny").model
    assert tiny.group_score_topk is None and tiny.resolved_group_score_topk == 2
    # K not divisible by topk_group (valid in transformers) loads; so does an explicit count, e.g. the report's K/M
    odd = load_config("tiny", ["model.num_experts_per_tok=3"]).model
    assert (odd.num_experts_per_tok, odd.topk_group, odd.resolved_group_score_topk) == (3, 2, 2)
    assert load_config("tiny", ["model.group_score_topk=4"]).model.resolved_group_score_topk == 4
    # one expert per group needs an explicit count of 1, which the released rule cannot express
    single = load_config("tiny", ["model.n_group=16", "model.num_experts_per_tok=2", "model.group_score_topk=1"]).model
    assert single.resolved_group_score_topk == 1
    d = load_config("tiny", ["model.group_score_topk=4"]).model.to_hf_dict()
    assert "group_score_topk" not in d
    assert ModelConfig.from_hf_dict({**d, "group_score_topk": 4}).group_score_topk is None  # HF: the released rule
