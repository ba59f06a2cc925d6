"""Data curation: readers, HTML extraction, filters, dedup, PII, the pipeline and its executors."""
