"""`train.dtype = "auto"`: bf16 only where the CPU has native bf16 matmuls (read from /proc/cpuinfo)."""

import torch

from sourcelm.kernels import hardware


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nmodel name\t: test\nflags\t\t: fpu sse avx2 {flags}\n\n")
    return path


def test_cpu_bf16_flags_are_read_from_cpuinfo(tmp_path):
    assert hardware.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f amx_tile amx_bf16"))
    assert hardware.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512_bf16"))
    assert not hardware.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx512f avx512bw"))
    assert not hardware.cpu_has_native_bf16(tmp_path / "missing")  # not Linux: fp32


def test_auto_resolves_by_hardware_and_explicit_names_stay(monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.resolve_dtype("float32", cpu) == "float32"
    assert hardware.resolve_dtype("bfloat16", cpu) == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.resolve_dtype("auto", cpu) == "bfloat16"
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: False)
    assert hardware.resolve_dtype("auto", cpu) == "float32"
