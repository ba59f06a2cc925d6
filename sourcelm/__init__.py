"""sourcelm: the open training stack for DeepSeek-V3-style Mixture-of-Experts language models."""

__version__ = "0.1.0"
