"""Input readers (WARC, JSONL, Parquet, HTML/text folders) and the curated shards' writers."""
