"""Shared helpers for the tokens tests: an independent Megatron shard reader and a small curated
corpus in the documents format of `sourcelm curate`."""

import json
import struct

import numpy as np
import pytest
import zstandard

# Megatron's DType enum values, restated independently of the code under test
MEGATRON_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}


def read_megatron(prefix):
    """Minimal reader following Megatron's _IndexReader: header, lengths, pointers, doc index."""
    with open(f"{prefix}.idx", "rb") as f:
        data = f.read()
    assert data[:9] == b"MMIDIDX\x00\x00"
    (version,) = struct.unpack("<Q", data[9:17])
    (code,) = struct.unpack("<B", data[17:18])
    (seq_count,) = struct.unpack("<Q", data[18:26])
    (doc_count,) = struct.unpack("<Q", data[26:34])
    off = 34
    lengths = np.frombuffer(data, "<i4", seq_count, off)
    off += lengths.nbytes
    pointers = np.frombuffer(data, "<i8", seq_count, off)
    off += pointers.nbytes
    doc_idx = np.frombuffer(data, "<i8", doc_count, off)
    off += doc_idx.nbytes
    assert off == len(data), "trailing bytes after the document index"
    dtype = np.dtype(MEGATRON_CODES[code])
    with open(f"{prefix}.bin", "rb") as f:
        bin_bytes = f.read()
    seqs = [np.frombuffer(bin_bytes, dtype, int(n), int(p)) for n, p in zip(lengths, pointers)]
    return version, code, doc_idx, seqs


@pytest.fixture
def megatron_read():
    """A reader written from Megatron-LM's format description (megatron/core/datasets/indexed_dataset.py)."""
    return read_megatron


# real sentences in the demo languages, code with tabs and spaces, emoji sequences
SAMPLES = {
    "en": "The committee will publish its report on 12 March 2024, after 3 rounds of review.",
    "de": "Größere Übungen für Äpfel und Bäume: Straße, weiß, schön – „Anführungszeichen“.",
    "ru": "Съешь же ещё этих мягких французских булок, да выпей чаю. Ёжик в тумане.",
    "ja": "東京は日本の首都です。いろはにほへと ちりぬるを、カタカナも混ぜる。",
    "zh": "我能吞下玻璃而不伤身体。中华人民共和国成立于1949年10月1日。",
    "ar": "نص حكيم له سر قاطع وذو شأن عظيم مكتوب على ثوب أخضر ومغلف بجلد أزرق.",
    "code": "def area(r):\n\tif r < 0:\n\t\traise ValueError('r')\n    return 3.14159 * r ** 2  # π r²\n\n\n",
    "emoji": "Hello 👋🏽 world 🌍! Family 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵, zero-width\u200bjoiner.",
}


def make_curated(root, files=3, docs_per_file=60, bad_lines=True, seed=0):
    """Writes root/documents/NNNNN.jsonl.zst with documents {id, text, source, url, metadata}; with
    bad_lines, each file also holds an empty text, invalid UTF-8, a lone surrogate and broken JSON."""
    rng = np.random.default_rng(seed)
    langs = sorted(SAMPLES)
    docs = []
    (root / "documents").mkdir(parents=True, exist_ok=True)
    for f in range(files):
        lines = []
        for i in range(docs_per_file):
            lang = langs[int(rng.integers(len(langs)))]
            words = SAMPLES[lang].split(" ")
            rng.shuffle(words)
            doc = {"id": f"f{f}d{i}", "text": " ".join(words) + f" {i}", "url": None,
                   "source": "code" if lang == "code" else "web", "metadata": {"language": lang}}
            docs.append(doc)
            lines.append(json.dumps(doc, ensure_ascii=False).encode())
        if bad_lines:
            lines.insert(3, json.dumps({"id": f"f{f}empty", "text": "", "source": "web"}).encode())
            lines.insert(5, b'{"id": "bad-utf8", "text": "caf\xe9 \xff", "source": "web"}')
            lines.insert(7, b'{"id": "f%dsurrogate", "text": "a\\ud800b", "source": "web"}' % f)
            lines.insert(9, b'{"id": "broken", "text": ')
        data = b"\n".join(lines) + b"\n"
        (root / "documents" / f"{f:05d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
    (root / "manifest.json").write_text(json.dumps({"stage": "curate", "outputs": {}}) + "\n")
    return docs


@pytest.fixture
def curated_factory():
    return make_curated


@pytest.fixture
def samples():
    return dict(SAMPLES)
