import json

import torch

from sourcelm.train import checkpoint as ckpt


def write(root, step, value, keep=2):
    return ckpt.save_checkpoint(root, step, {"w": torch.full((3,), float(value))}, {"w.exp_avg": torch.zeros(3)},
                                {"step": step}, keep=keep)


def test_keep_last_and_atomic_layout(tmp_path):
    for step in (1, 2, 3):
        write(tmp_path, step, step)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    assert not list(tmp_path.glob(".*tmp"))
    model, optim, state = ckpt.load_checkpoint(tmp_path / "step_000003")
    assert model["w"].tolist() == [3.0] * 3 and state["step"] == 3
    assert json.loads((tmp_path / "step_000003" / "manifest.json").read_text())["stage"] == "checkpoint"


def test_damaged_newest_falls_back_to_previous(tmp_path):
    write(tmp_path, 1, 1)
    newest = write(tmp_path, 2, 2)
    data = bytearray((newest / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (newest / "model.safetensors").write_bytes(bytes(data))
    assert "SHA-256" in ckpt.verify_checkpoint(newest)
    assert ckpt.newest_valid_checkpoint(tmp_path).name == "step_000001"
    (tmp_path / "step_000001" / "optimizer.safetensors").write_bytes(b"")  # truncated
    assert ckpt.newest_valid_checkpoint(tmp_path) is None


def test_leftover_temp_dir_from_a_crash_is_ignored(tmp_path):
    write(tmp_path, 1, 1)
    (tmp_path / ".step_000002.tmp").mkdir()  # a write that died before the rename
    (tmp_path / ".step_000002.tmp" / "model.safetensors").write_bytes(b"partial")
    assert ckpt.newest_valid_checkpoint(tmp_path).name == "step_000001"
    write(tmp_path, 2, 2)
    assert ckpt.newest_valid_checkpoint(tmp_path).name == "step_000002"
