"""Generation with the compressed (absorbed-weight) MLA cache."""

from sourcelm.infer.generate import generate
from sourcelm.infer.mla_cache import MLACache, forward_cached

__all__ = ["MLACache", "forward_cached", "generate"]
