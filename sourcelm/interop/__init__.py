"""Weights in and out of the Hugging Face DeepSeek-V3 format."""

from sourcelm.interop.hf import load_hf, save_hf

__all__ = ["load_hf", "save_hf"]
