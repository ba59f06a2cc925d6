"""Data curation, one subpackage per concern:

pipeline/  the machinery: documents, the Step API, the step registry, plans, tasks, executors, reports, audit
formats/   reading raw inputs (WARC, JSONL, Parquet, HTML/text folders) and writing the curated shards
steps/     the per-document steps: extraction, URL / language / quality filters, PII, sampling, decontamination
dedup/     the global dedup steps: exact and MinHash, and their union-find
corpus/    the demo corpus and `sourcelm corpus fetch`, which builds it from package registries
pipelines/ (data, not code) the pipeline TOMLs shipped in the package, e.g. `sourcelm curate demo`
commands.py registers `curate`, `audit` and `corpus fetch` with the CLI.
"""
