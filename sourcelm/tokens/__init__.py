"""Tokenizer training, the token shard format and the deterministic loader the trainer reads."""
