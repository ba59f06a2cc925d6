"""Byte-level BPE tokenizer training on curated documents (Hugging Face `tokenizers`).

Design:
- byte-level: the base alphabet is the 256 bytes, so any string encodes and decodes back exactly;
  no normalizer, for the same reason;
- pre-tokenisation for code and many languages: every digit is its own piece (numbers are read
  digit by digit), letters keep their combining marks (Devanagari, Arabic vowels), whitespace
  runs are kept whole except that the last space joins the next word (code indentation becomes a
  few tokens), punctuation runs stay together;
- special tokens first: <|begin_of_text|> = 0 and <|end_of_text|> = 1 (ModelConfig's bos/eos
  defaults), <|pad|> = 2, then reserved tokens up to a block of `SPECIAL_BLOCK` ids;
- training streams the documents (an iterator; the trainer keeps word counts, not the corpus); a
  fixed fraction of documents, chosen by a hash of their id, is held out for the compression report;
- deterministic: the same documents and settings give a byte-identical tokenizer.json;
- a default chat template (`CHAT_TEMPLATE`, saved in tokenizer_config.json so exported models carry
  it and `apply_chat_template` works on them): each message is `<|reserved_0|>` + its role + a
  newline + its content + `<|end_of_text|>`, after one `<|begin_of_text|>`. The reserved token marks
  a message header (it is never produced by text), and the end-of-text token closes every turn, so a
  model fine-tuned on it stops generating where its answer ends.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

from sourcelm.artifacts import atomic_write_bytes, sha256_file, write_manifest
from sourcelm.tokens.documents import DocumentInput, language_of
from sourcelm.tokens.stream import in_valid_split

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
SPECIAL_BLOCK = 64  # ids 0..63 are special: bos, eos, pad, then <|reserved_0|> ... <|reserved_60|>
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
CHAT_HEADER = "<|reserved_0|>"  # starts each message: CHAT_HEADER role "\n" content EOS
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    + CHAT_HEADER + "{{ message['role'] }}\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}" + CHAT_HEADER + "assistant\n{% endif %}"
)

# Pieces, tried in order at each position. Digits were split off one by one before this runs.
_PIECES = "|".join([
    r"'(?i:[sdmt]|ll|ve|re)",  # English contractions stay one piece
    r"[^\r\n\p{L}\p{M}\p{N}]?[\p{L}\p{M}]+",  # a word with at most one leading space or symbol
    r" ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*",  # a punctuation/symbol run, with the newlines after it
    r"\s*[\r\n]+",  # line breaks with the blanks before them
    r"\s+(?!\S)",  # a whitespace run, leaving its last space to the next word
    r"\s+",
])


def special_tokens() -> list[str]:
    return [BOS, EOS, PAD] + [f"<|reserved_{i}|>" for i in range(SPECIAL_BLOCK - 3)]


def new_tokenizer():
    """An untrained byte-level BPE tokenizer with this project's pre-tokenisation and decoder."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def _training_texts(source: DocumentInput, files: list[Path], heldout_fraction: float, skipped: Counter,
                    progress=None, task=None) -> Iterator[str]:
    for path in files:
        for doc in source.documents(path, skipped):
            if not in_valid_split(doc["id"].encode(), heldout_fraction):
                yield doc["text"]
        if progress is not None:
            progress.advance(task)


def train_tokenizer(curated_dir: str | Path, vocab_size: int, output: str | Path,
                    heldout_fraction: float = 0.02, min_frequency: int = 2,
                    report_docs: int = 2000, show_progress: bool = True, text_key: str = "text") -> dict:
    """Trains, saves to `output` (loadable by transformers.AutoTokenizer), writes the compression
    report and the manifest. Returns the report. `curated_dir`: or plain JSONL / Parquet / text
    (`DocumentInput`; `text_key` names plain records' text field)."""
    from tokenizers import pre_tokenizers, trainers

    from sourcelm.tokens.progress import progress_bar

    if vocab_size < SPECIAL_BLOCK + 256 + 1:
        raise ValueError(f"--vocab-size {vocab_size} is too small: the {SPECIAL_BLOCK} special tokens and the "
                         f"256 bytes need {SPECIAL_BLOCK + 256}; use at least {SPECIAL_BLOCK + 257}")
    source = DocumentInput(Path(curated_dir), text_key)
    files = source.units()
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    tok = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=special_tokens(),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    skipped: Counter = Counter()
    with progress_bar(show_progress) as progress:
        task = progress.add_task("tokenizer: reading documents", total=len(files), unit="files")
        tok.train_from_iterator(_training_texts(source, files, heldout_fraction, skipped, progress, task), trainer)
    save_tokenizer(tok, out)
    report = compression_report(tok, source, files, heldout_fraction, report_docs)
    report["vocab_size"] = tok.get_vocab_size()
    report["requested_vocab_size"] = vocab_size
    report["skipped_documents"] = dict(skipped)
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=2, sort_keys=True) + "\n").encode())
    write_manifest(out, "tokenizer", outputs=[*TOKENIZER_FILES, "report.json"],
                   inputs=source.provenance_inputs(files),
                   config={"vocab_size": vocab_size, "heldout_fraction": heldout_fraction,
                           "min_frequency": min_frequency, "special_block": SPECIAL_BLOCK},
                   extra={"tokenizer_sha256": sha256_file(out / "tokenizer.json"),
                          "vocab_size": tok.get_vocab_size(),
                          "special_tokens": {"bos": [BOS, 0], "eos": [EOS, 1], "pad": [PAD, 2]},
                          "input_files": {source.label(p): source.unit_sha256(p) for p in files}})
    return report


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json plus the two small files transformers reads next to it."""
    atomic_write_bytes(out / "tokenizer.json", (tok.to_str(pretty=True) + "\n").encode())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
        # decode must give back the exact text: no space clean-up, no BOS added on encode
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False, "add_eos_token": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "chat_template": CHAT_TEMPLATE,  # the module doc's format
    }
    atomic_write_bytes(out / "tokenizer_config.json", (json.dumps(config, indent=2) + "\n").encode())
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    atomic_write_bytes(out / "special_tokens_map.json", (json.dumps(special, indent=2) + "\n").encode())


def load_tokenizer(directory: str | Path):
    from tokenizers import Tokenizer

    path = Path(directory) / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing; train one with `sourcelm tokenizer train`")
    return Tokenizer.from_file(str(path))


def compression_report(tok, source: DocumentInput, files: list[Path], heldout_fraction: float, max_docs: int) -> dict:
    """Bytes (UTF-8) per token on the held-out documents, per language and per source, and whether
    every one of them decoded back to its exact text."""
    docs = []
    for path in files:
        for doc in source.documents(path):
            if in_valid_split(doc["id"].encode(), heldout_fraction):
                docs.append(doc)
                if len(docs) >= max_docs:
                    break
        if len(docs) >= max_docs:
            break
    stats: dict[str, dict[str, list[int]]] = {"language": defaultdict(lambda: [0, 0, 0]),
                                              "source": defaultdict(lambda: [0, 0, 0])}
    roundtrip_failures = 0
    encodings = tok.encode_batch([d["text"] for d in docs], add_special_tokens=False) if docs else []
    for doc, enc in zip(docs, encodings):
        nbytes = len(doc["text"].encode("utf-8"))
        roundtrip_failures += tok.decode(enc.ids, skip_special_tokens=False) != doc["text"]
        for kind, key in (("language", language_of(doc.get("metadata") or {})), ("source", doc.get("source", ""))):
            s = stats[kind][key]
            s[0] += 1
            s[1] += nbytes
            s[2] += len(enc.ids)

    def table(d):
        return {k: {"documents": v[0], "bytes": v[1], "tokens": v[2],
                    "bytes_per_token": round(v[1] / v[2], 4) if v[2] else None} for k, v in sorted(d.items())}

    total_bytes = sum(v[1] for v in stats["source"].values())
    total_tokens = sum(v[2] for v in stats["source"].values())
    return {"heldout_documents": len(docs), "roundtrip_failures": roundtrip_failures,
            "bytes_per_token": round(total_bytes / total_tokens, 4) if total_tokens else None,
            "per_language": table(stats["language"]), "per_source": table(stats["source"]),
            "reference_tokenizer": None}  # none ships offline with the project's dependencies
