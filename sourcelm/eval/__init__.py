"""Evaluation: lm-evaluation-harness on exported models, the offline tasks packaged in `tasks/`, and the
curation step that keeps their texts out of the training data."""
