"""`train.dtype = "auto"`: bf16 only where the CPU has native bf16 matmuls (read from /proc/cpuinfo)."""

import torch

from sourcelm.train import device


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse avx2 {flags}\n\n")
    return path


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    assert device.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f amx_tile amx_bf16"))
    assert device.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert not device.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))
    assert not device.cpu_has_native_bf16(tmp_path / "missing")  # not Linux: fp32


def test_auto_resolves_by_hardware_and_explicit_names_stay(monkeypatch):
    cpu = torch.device("cpu")
    assert device.resolve_dtype("float32", cpu) == "float32"
    assert device.resolve_dtype("bfloat16", cpu) == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    assert device.resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    assert device.resolve_dtype("auto", cpu) == "float32"
