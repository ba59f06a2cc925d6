"""`tokenizer train` and `tokenize` on inputs people have: plain JSONL (.jsonl, .gz, .zst; any text key), Parquet and
folders of text files, with curation's handling of bad input (skipped, counted, logged with the reason)."""

import gzip
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from sourcelm.cli import main
from sourcelm.tokens.documents import DocumentInput
from sourcelm.tokens.indexed import ShardReader

TEXTS = [f"Document number {i}: the quick brown fox jumps over {i} lazy dogs, again and again." for i in range(40)]


def jsonl(records) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in records).encode()


@pytest.fixture
def plain(tmp_path):
    """A folder of every plain format, each with some bad records; the expected documents and skips."""
    root = tmp_path / "plain"
    (root / "web").mkdir(parents=True)
    (root / "notes").mkdir()
    good = [{"text": t, "url": f"https://x/{i}"} for i, t in enumerate(TEXTS[:10])]
    (root / "web" / "a.jsonl").write_bytes(jsonl(good) + b"{not json\n" + jsonl([{"txt": "no text field"},
                                                                                 {"text": "   "}, {"text": 3}]))
    (root / "web" / "b.jsonl.gz").write_bytes(gzip.compress(jsonl({"text": t} for t in TEXTS[10:20])))
    (root / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl({"text": t} for t in TEXTS[20:30])))
    (root / "cut.jsonl.gz").write_bytes(gzip.compress(jsonl({"text": t} for t in TEXTS))[:60])  # truncated
    pq.write_table(pa.table({"text": TEXTS[30:36] + [None]}), root / "d.parquet")
    for i, t in enumerate(TEXTS[36:]):
        (root / "notes" / f"{i}.txt").write_text(t)
    (root / "notes" / "empty.md").write_text("")
    (root / "notes" / "binary.txt").write_bytes(b"\x00\x01\x02" * 10)
    (root / "notes" / "README.pdf").write_bytes(b"%PDF")  # not a document format: not read
    expected_skips = {"invalid_json": 1, "missing_text": 2, "empty_text": 1, "text_not_a_string": 1,
                      "truncated_or_corrupt_file": 1, "empty_file": 1, "binary_file": 1}
    return root, expected_skips


def test_every_plain_format_is_read_and_bad_records_are_counted_by_reason(plain):
    root, expected_skips = plain
    source = DocumentInput(root)
    assert not source.curated
    units = source.units()
    assert [source.label(u) for u in units] == ["c", "cut", "d", "web/a", "web/b", "notes"]
    skipped, skip_log = Counter(), []
    docs = [d for u in units for d in source.documents(u, skipped, skip_log)]
    assert sorted(d["text"] for d in docs) == sorted(TEXTS)
    assert dict(skipped) == expected_skips
    assert {r["reason"] for r in skip_log} == set(expected_skips) and all(r["file"] for r in skip_log)
    assert len({d["id"] for d in docs}) == len(docs)  # ids stay distinct, text files included
    assert {d["source"] for d in docs} == {"c", "d", "web/a", "web/b", "notes"}
    again = [d["id"] for u in units for d in source.documents(u)]
    assert again == [d["id"] for d in docs]  # stable across reads


def test_a_text_key_other_than_text(tmp_path):
    f = tmp_path / "chat.jsonl"
    f.write_bytes(jsonl([{"content": "hello there"}, {"text": "not this key"}]))
    skipped = Counter()
    docs = [d for u in DocumentInput(f, "content").units() for d in DocumentInput(f, "content").documents(u, skipped)]
    assert [d["text"] for d in docs] == ["hello there"] and skipped == Counter(missing_text=1)


def test_an_input_with_no_documents_names_the_formats(tmp_path):
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(FileNotFoundError, match="JSONL"):
        DocumentInput(tmp_path).units()


def test_tokenizer_train_and_tokenize_commands_on_plain_inputs(plain, tmp_path, megatron_read):
    root, expected_skips = plain
    tok, out = tmp_path / "tok", tmp_path / "tokens"
    assert main(["tokenizer", "train", "--input", str(root), "--vocab-size", "400", "--output", str(tok),
                 "--no-progress", "--heldout-fraction", "0"]) == 0
    assert json.loads((tok / "report.json").read_text())["skipped_documents"] == expected_skips
    assert main(["tokenize", "--input", str(root), "--tokenizer", str(tok), "--output", str(out), "--no-progress",
                 "--valid-fraction", "0"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == expected_skips
    assert manifest["splits"]["train"]["documents"] == len(TEXTS)
    assert set(manifest["splits"]["train"]["sources"]) == {"c", "d", "web/a", "web/b", "notes"}
    assert {r["reason"] for r in map(json.loads, (out / "tasks" / "web__a.skipped.jsonl").read_text().splitlines())} \
        == {"invalid_json", "missing_text", "empty_text", "text_not_a_string"}
    assert len(ShardReader(out / "train" / "notes")) == 4 and megatron_read(out / "train" / "web__b")[2].size == 11
    recorded = {i["path"].rsplit("/", 1)[-1] for i in manifest["inputs"]}
    assert {"a.jsonl", "b.jsonl.gz", "d.parquet", "0.txt"} <= recorded and "README.pdf" not in recorded
