"""Tokenizer training: exact round trip in every demo language, determinism, transformers loading,
special token ids, the report and the manifest."""

import json

import pytest

from sourcelm.tokens.tokenizer import (
    BOS,
    EOS,
    PAD,
    SPECIAL_BLOCK,
    load_tokenizer,
    train_tokenizer,
)


@pytest.fixture
def tok_dir(tmp_path, curated_factory):
    curated_factory(tmp_path / "cur")
    train_tokenizer(tmp_path / "cur", 700, tmp_path / "tok", show_progress=False, heldout_fraction=0.1)
    return tmp_path


def test_round_trip_every_language(tok_dir, samples):
    tok = load_tokenizer(tok_dir / "tok")
    extra = {"mixed": "".join(samples.values()), "bytes": "\x00\x01\x7f\ufeff\U0010ffff \r\n\t  ",
             "indent": "\t\t    \t x = 1\n" * 3}
    for name, text in {**samples, **extra}.items():
        ids = tok.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids, skip_special_tokens=False) == text, name
    assert not any(t.startswith("<|") for t in tok.encode(samples["code"]).tokens)


def test_pretokenisation_splits_digits_and_keeps_whitespace_runs(tok_dir):
    tok = load_tokenizer(tok_dir / "tok")
    pieces = [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("x = 2024\n        return  y")]
    assert pieces[:6] == ["x", "Ġ=", "Ġ", "2", "0", "2"]
    assert "ĠĠĠĠĠĠĠ" in pieces and "Ġreturn" in pieces  # 8 spaces: a run of 7, the 8th joins the word


def test_special_tokens_and_transformers_loading(tok_dir, samples):
    from transformers import AutoTokenizer

    tok = load_tokenizer(tok_dir / "tok")
    assert [tok.token_to_id(t) for t in (BOS, EOS, PAD)] == [0, 1, 2]
    assert tok.token_to_id(f"<|reserved_{SPECIAL_BLOCK - 4}|>") == SPECIAL_BLOCK - 1
    assert tok.get_vocab_size() == 700
    hf = AutoTokenizer.from_pretrained(str(tok_dir / "tok"))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (0, 1, 2)
    for text in samples.values():
        ids = hf(text)["input_ids"]
        assert ids == tok.encode(text, add_special_tokens=False).ids
        assert hf.decode(ids) == text


def test_byte_identical_across_trainings(tmp_path, curated_factory):
    curated_factory(tmp_path / "cur", files=2, docs_per_file=80)
    blobs = []
    for k in range(2):
        train_tokenizer(tmp_path / "cur", 500, tmp_path / f"t{k}", show_progress=False)
        blobs.append((tmp_path / f"t{k}" / "tokenizer.json").read_bytes())
    assert blobs[0] == blobs[1]
    train_tokenizer(tmp_path / "cur", 520, tmp_path / "t2", show_progress=False)
    assert (tmp_path / "t2" / "tokenizer.json").read_bytes() != blobs[0]


def test_report_and_manifest(tok_dir):
    out = tok_dir / "tok"
    report = json.loads((out / "report.json").read_text())
    assert report["vocab_size"] == 700 and report["roundtrip_failures"] == 0
    assert report["heldout_documents"] > 0
    assert report["skipped_documents"] == {"empty": 3, "invalid_utf8": 3, "invalid_unicode": 3, "malformed_json": 3}
    per_source = report["per_source"]
    assert set(per_source) <= {"web", "code"} and report["per_language"]
    for s in per_source.values():
        assert s["bytes_per_token"] == round(s["bytes"] / s["tokens"], 4) and s["bytes_per_token"] > 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "tokenizer"
    assert set(manifest["outputs"]) == {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                        "report.json"}
    assert [i["path"] for i in manifest["inputs"]] == ["../cur/manifest.json"]
    assert len(manifest["input_files"]) == 3


def test_too_small_vocab_names_the_fix(tmp_path, curated_factory):
    curated_factory(tmp_path / "cur", files=1, docs_per_file=5)
    with pytest.raises(ValueError, match="--vocab-size 100 is too small"):
        train_tokenizer(tmp_path / "cur", 100, tmp_path / "t", show_progress=False)
