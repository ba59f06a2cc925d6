"""Global dedup steps: exact (normalised text hash) and MinHash near-duplicates, with their union-find."""
