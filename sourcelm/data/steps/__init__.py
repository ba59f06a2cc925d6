"""Per-document pipeline steps: HTML extraction, URL / language / quality filters, PII, sampling, decontamination."""
