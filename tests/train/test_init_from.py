"""Continued training from an HF checkpoint (`sourcelm train CONFIG --init-from HF_DIR`): the weights read rank by
rank, the checks that name every bad tensor, the config resolution, the provenance link, and the peak RSS of a rank."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sourcelm.config import load_config
from sourcelm.interop import fp8_checkpoint, hf
from sourcelm.interop.hf import load_hf, save_hf
from sourcelm.model import build_model
from sourcelm.train import hf_reader
from sourcelm.train.context import SingleProcess
from sourcelm.train.init_from import BASE_MANIFEST, BaseWeights, resolve_config
from tests.train.conftest import SMALL

CPU = torch.device("cpu")


def exported(tmp_path, fp8=False, dtype=torch.float32, shard_bytes=200_000, **model):
    """A SMALL-config model with nonzero expert biases, exported in the HF layout; (model, Config, dir)."""
    cfg = load_config("tiny", SMALL + [f"model.{k}={v}" for k, v in model.items()])
    m = build_model(cfg.model, seed=3)
    for _, moe in m.moe_layers():
        moe.gate.e_score_correction_bias.normal_()
    out = tmp_path / "hf"
    save_hf(m, out, dtype=dtype, max_shard_bytes=shard_bytes, fp8=fp8)
    return m, cfg, out


def test_the_hf_names_repeated_in_train_equal_interops():
    assert hf_reader.EXPERT_NAMES == hf.EXPERT_NAMES and hf_reader.INDEX_NAME == hf.INDEX_NAME
    assert hf_reader.SCALE_SUFFIX == fp8_checkpoint.SCALE_SUFFIX


def test_loaded_weights_equal_the_exported_model_bit_for_bit_mtp_and_biases_included(tmp_path):
    m, cfg, out = exported(tmp_path)
    assert len(list(out.glob("model-*.safetensors"))) > 1  # sharded: the index is followed
    loaded = BaseWeights(out).build_model(resolve_config("tiny", SMALL, out).model, SingleProcess(), CPU)
    a, b = m.state_dict(), loaded.state_dict()
    assert set(a) == set(b) and any(k.startswith("mtp.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    x = torch.randint(0, 512, (2, 16))
    assert torch.equal(m(x).logits, loaded(x).logits)  # the rotary table rebuilt, not left uninitialised


@pytest.mark.parametrize("layout", ["bf16", "fp8", "fused_experts"])
def test_other_layouts_load_as_load_hf_reads_them(tmp_path, layout):
    m, cfg, out = exported(tmp_path, fp8=layout == "fp8", dtype=torch.bfloat16 if layout == "bf16" else torch.float32)
    if layout == "fused_experts":  # transformers 5 saves [E, 2I, H] / [E, H, I]
        files = sorted(out.glob("model-*.safetensors"))
        tensors = {k: v for f in files for k, v in load_file(f).items()}
        for f in files:
            f.unlink()
        (out / hf.INDEX_NAME).unlink()
        for i in range(cfg.model.first_k_dense_replace, cfg.model.num_hidden_layers + 1):
            p = f"model.layers.{i}.mlp.experts"
            gate, up, down = ([tensors.pop(f"{p}.{e}.{w}.weight") for e in range(8)]
                              for w in ("gate_proj", "up_proj", "down_proj"))
            tensors[f"{p}.gate_up_proj"] = torch.cat([torch.stack(gate), torch.stack(up)], dim=1)
            tensors[f"{p}.down_proj"] = torch.stack(down)
        save_file(tensors, out / "model.safetensors")
    reference = load_hf(out).state_dict()
    loaded = BaseWeights(out).build_model(resolve_config("tiny", SMALL, out).model, SingleProcess(), CPU).state_dict()
    assert all(torch.equal(reference[k], loaded[k]) for k in reference)
    if layout != "fused_experts":
        assert not all(torch.equal(m.state_dict()[k], loaded[k]) for k in loaded)  # rounded: not the fp32 values


def test_missing_extra_and_misshapen_tensors_are_each_named_before_any_weight_is_read(tmp_path):
    _, cfg, out = exported(tmp_path, shard_bytes=10**9)
    f = out / "model-00001-of-00001.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.experts.5.up_proj.weight"], tensors["model.layers.0.self_attn.o_proj.weight"]
    tensors["model.layers.0.self_attn.q_b_proj.weight"] = torch.zeros(3, 3)
    tensors["model.layers.0.mlp.surprise.weight"] = torch.zeros(2)
    save_file(tensors, f)
    (out / hf.INDEX_NAME).write_text(json.dumps({"weight_map": {k: f.name for k in tensors}}))
    with pytest.raises(ValueError) as e:
        BaseWeights(out).build_model(resolve_config("tiny", SMALL, out).model, SingleProcess(), CPU)
    msg = str(e.value)
    assert "4 problem(s)" in msg
    for part in ("missing model.layers.1.mlp.experts.5.up_proj.weight", "missing model.layers.0.self_attn.o_proj",
                 "misshapen model.layers.0.self_attn.q_b_proj.weight: [3, 3]", "extra model.layers.0.mlp.surprise"):
        assert part in msg


def test_config_comes_from_the_checkpoint_training_settings_from_config_and_overrides_win(tmp_path):
    _, cfg, out = exported(tmp_path, num_nextn_predict_layers=1)
    resolved = resolve_config("tiny", ["schedule.steps=7", "model.routed_scaling_factor=1.5"], out)
    assert resolved.model.hidden_size == 64 and resolved.model.n_routed_experts == 8  # not tiny's 256 / 16
    assert resolved.schedule.steps == 7 and resolved.model.routed_scaling_factor == 1.5
    assert resolved.model.group_score_topk is None  # the released routing rule


def test_a_continued_run_starts_from_the_weights_and_links_the_base_in_its_provenance(tmp_path, small_args):
    from sourcelm.provenance.graph import walk
    from sourcelm.train.checkpoint import load_checkpoint
    from sourcelm.train.entry import train_main

    m, _, out = exported(tmp_path)
    train, valid = small_args[-2:]
    run = tmp_path / "run"
    # lr 0 and γ 0: the run's weights stay the base's, so what it starts from is seen exactly
    assert train_main("tiny", ["schedule.steps=2", "checkpoint.every=1", "checkpoint.keep=0", "logging.valid_every=1",
                               "logging.valid_batches=1", "logging.tensorboard=false", "logging.progress=false",
                               "logging.plots=false", "data.seq_len=32", "schedule.global_batch=4",
                               "schedule.micro_batch=2", "optim.lr=0.0",
                               "schedule.bias_update_speed=0.0", train, valid], str(run), init_from=str(out)) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base = next(r for r in records if r.get("kind") == "base")
    first = next(r for r in records if r.get("step") == 1 and "loss" in r)
    assert base["valid_loss"] == first["valid_loss"]  # measured on the base's weights before training
    tensors, optim, state = load_checkpoint(run / "checkpoints/step_000001")
    reference = m.state_dict()
    assert set(tensors) == set(reference) and all(torch.equal(tensors[k], reference[k]) for k in reference)
    assert state["optimizer_step"] == 1 and state["step"] == 1  # a fresh optimizer and schedule
    manifest = json.loads((run / "checkpoints/step_000001/manifest.json").read_text())
    assert any(i["path"].endswith(BASE_MANIFEST) for i in manifest["inputs"])
    base_manifest = json.loads((run / BASE_MANIFEST).read_text())
    assert {Path(i["path"]).name for i in base_manifest["inputs"]} >= {"config.json", hf.INDEX_NAME}
    assert walk(run).ok, walk(run).failures
    (out / "config.json").write_text((out / "config.json").read_text() + " ")  # the base changed after the run
    assert any("config.json" in c.path for c in walk(run).failures)


RANK_SCRIPT = """
import json, sys, torch
from sourcelm.config import load_config
from sourcelm.train.distributed import DistributedContext
from sourcelm.train.init_from import BaseWeights
cfg = load_config(json.loads(sys.argv[1]))
weights = BaseWeights(sys.argv[2])
model = weights.build_model(cfg.model, DistributedContext(cfg), torch.device("cpu"))
print(json.dumps(weights.load_stats))
"""


@pytest.mark.slow
def test_peak_rss_of_each_rank_at_ep4_is_its_own_part_plus_one_tensor_not_the_model(tmp_path):
    """A 4-process EP 4 load of a model whose experts dominate: each rank's peak RSS during the load must stay
    under its own part plus the largest stored tensor (+ 24 MB of allocator slack), a limit the whole model
    exceeds. RSS counts the pages of the memory-mapped files a process touched, so this also checks that no
    handle keeps a whole file's pages mapped."""
    cfg = load_config("tiny", ["model.vocab_size=1024", "model.hidden_size=256", "model.moe_intermediate_size=1024",
                               "model.num_hidden_layers=4", "parallel.ep=4", "logging.progress=false"])
    m = build_model(cfg.model, seed=0)
    out = tmp_path / "hf"
    save_hf(m, out, max_shard_bytes=10**9)  # one file: a per-file handle would map it all
    full = sum(t.numel() * t.element_size() for t in m.state_dict().values())
    del m
    stored = hf_reader.read_header(out / "model-00001-of-00001.safetensors").values()
    largest = max(4 * torch.Size(t.shape).numel() for t in stored)  # all fp32
    port = _free_port()
    env = {**os.environ, "WORLD_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, json.dumps(cfg.to_dict()), str(out)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(4)]
    stats = [json.loads(p.communicate(timeout=300)[0].strip().splitlines()[-1]) for p in procs]
    for s in stats:
        own = s["rank_state_bytes"]
        assert own < full / 2  # the rank holds a quarter of the experts
        limit = (own + largest) / 2**20 + 24
        grown = s["peak_rss_mb"] - s["rss_before_mb"]
        assert grown < limit < full / 2**20, (grown, limit, full / 2**20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
