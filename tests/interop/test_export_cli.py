"""`sourcelm export`: a training checkpoint directory to the HF layout, with its manifest."""

import json

import pytest
import torch

from sourcelm.artifacts import read_manifest, sha256_file
from sourcelm.cli import main
from sourcelm.config import load_config
from sourcelm.interop.hf import load_hf
from sourcelm.model import build_model
from sourcelm.train.checkpoint import save_checkpoint

SMALL = ["model.vocab_size=512", "model.hidden_size=64", "model.intermediate_size=96",
         "model.moe_intermediate_size=32", "model.num_hidden_layers=2", "model.q_lora_rank=32",
         "model.kv_lora_rank=32", "model.qk_nope_head_dim=16", "model.qk_rope_head_dim=8", "model.v_head_dim=16",
         "data.seq_len=64"]


def write_checkpoint(path, tokenizer_dir=None):
    config = load_config("tiny", SMALL)
    model = build_model(config.model, seed=4)
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.gate.e_score_correction_bias.uniform_(-0.01, 0.01)
    state = {"config": config.to_dict(), "step": 10}
    if tokenizer_dir:
        state["tokenizer_dir"] = str(tokenizer_dir)
    written = save_checkpoint(path.parent, 10, model.state_dict(), {}, state, keep=0)
    written.rename(path)
    return model


def test_export_refuses_a_damaged_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    write_checkpoint(ckpt)
    data = bytearray((ckpt / "model.safetensors").read_bytes())
    data[-3] ^= 0x01
    (ckpt / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="model.safetensors does not match its recorded SHA-256"):
        main(["export", str(ckpt), "--hf", str(tmp_path / "hf")])
    assert not (tmp_path / "hf" / "config.json").exists()


def test_export_writes_hf_layout_and_manifest(tmp_path):
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text('{"version": "1.0"}')
    (tok / "tokenizer_config.json").write_text("{}")
    ckpt, out = tmp_path / "ckpt", tmp_path / "hf"
    model = write_checkpoint(ckpt, tok)

    assert main(["export", str(ckpt), "--hf", str(out), "--max-shard-gb", "0.001"]) == 0
    for name in ("config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
                 "tokenizer_config.json", "manifest.json"):
        assert (out / name).is_file(), name
    manifest = read_manifest(out)
    assert manifest["stage"] == "export"
    inputs = {entry["path"].split("/")[-1]: entry["sha256"] for entry in manifest["inputs"]}
    assert inputs["state.json"] == sha256_file(ckpt / "state.json")
    assert inputs["model.safetensors"] == sha256_file(ckpt / "model.safetensors")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        assert manifest["outputs"][shard] == sha256_file(out / shard)

    back = load_hf(out)
    ref = model.state_dict()
    assert set(back.state_dict()) == set(ref)
    assert all(torch.equal(v, ref[k]) for k, v in back.state_dict().items())


def test_export_of_a_non_checkpoint_fails_clearly(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    try:
        main(["export", str(tmp_path / "empty"), "--hf", str(tmp_path / "out")])
    except SystemExit as e:
        assert "state.json" in str(e)
    else:
        raise AssertionError("export of an empty directory must fail")
