"""The shard format, checked with a reader written here from Megatron-LM's format description."""

import struct

import numpy as np
import pytest

from sourcelm.tokens.indexed import (
    ShardReader,
    ShardWriter,
    dtype_for_vocab,
    find_shards,
)


@pytest.mark.parametrize("vocab,code", [(8192, 8), (65536, 8), (65537, 4), (200_000, 4)])
def test_writer_matches_megatron_layout(tmp_path, vocab, code, megatron_read):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n) for n in (5, 0, 1, 17, 3)]
    docs[0][0] = vocab - 1  # the largest id must survive the dtype
    prefix = tmp_path / "shard"
    with ShardWriter(prefix, dtype_for_vocab(vocab)) as w:
        for d in docs:
            w.add_document(d)
    version, got_code, doc_idx, seqs = megatron_read(prefix)
    assert (version, got_code) == (1, code)
    assert doc_idx.tolist() == list(range(len(docs) + 1))
    assert [s.tolist() for s in seqs] == [d.tolist() for d in docs]
    r = ShardReader(prefix)
    assert len(r) == len(docs) and r.num_tokens == sum(map(len, docs))
    assert [r[i].tolist() for i in range(len(docs))] == [d.tolist() for d in docs]
    assert r[-1].tolist() == docs[-1].tolist()


def test_idx_bytes_exact(tmp_path):
    """Two documents [7, 9] and [3] as uint16: every byte of the .idx spelled out."""
    prefix = tmp_path / "s"
    with ShardWriter(prefix, np.uint16) as w:
        w.add_document([7, 9])
        w.add_document([3])
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 2, 3) + struct.pack("<ii", 2, 1)
                + struct.pack("<qq", 0, 4) + struct.pack("<qqq", 0, 1, 2))
    assert (tmp_path / "s.idx").read_bytes() == expected
    assert (tmp_path / "s.bin").read_bytes() == struct.pack("<HHH", 7, 9, 3)


def test_reader_multi_sequence_documents(tmp_path):
    """Megatron shards with sentence splitting: a document of several sequences reads as one."""
    prefix = tmp_path / "m"
    lengths, tokens = [2, 3, 1], np.arange(6, dtype="<u2")
    pointers = [0, 4, 10]
    doc_idx = [0, 2, 3]  # doc 0 = sequences 0-1, doc 1 = sequence 2
    (tmp_path / "m.bin").write_bytes(tokens.tobytes())
    (tmp_path / "m.idx").write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 3, 3)
                                     + np.array(lengths, "<i4").tobytes()
                                     + np.array(pointers, "<i8").tobytes()
                                     + np.array(doc_idx, "<i8").tobytes())
    r = ShardReader(prefix)
    assert len(r) == 2 and r[0].tolist() == [0, 1, 2, 3, 4] and r[1].tolist() == [5]


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="outside the range"):
        with ShardWriter(tmp_path / "a", np.uint16) as w:
            w.add_document([70000])
    assert not list(tmp_path.iterdir()), "an aborted shard leaves no files"
    with ShardWriter(tmp_path / "b", np.uint16) as w:
        w.add_document([1, 2, 3])
    (tmp_path / "b.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="index describes 3 tokens"):
        ShardReader(tmp_path / "b")
    (tmp_path / "c.idx").write_bytes(b"NOTANIDX" + bytes(40))
    with pytest.raises(ValueError, match="not a Megatron index"):
        ShardReader(tmp_path / "c")


def test_empty_shard_and_find(tmp_path):
    with ShardWriter(tmp_path / "e", np.uint16):
        pass
    r = ShardReader(tmp_path / "e")
    assert len(r) == 0 and r.num_tokens == 0
    assert find_shards(tmp_path) == [str(tmp_path / "e")]
    assert find_shards(tmp_path / "e.bin") == [str(tmp_path / "e")]
    with pytest.raises(FileNotFoundError):
        find_shards(tmp_path / "missing")


@pytest.mark.parametrize("token_size", [2, 4])
def test_identical_bytes_to_datatrove_writer(tmp_path, token_size):
    """datatrove writes Megatron shards too: the same documents give the same bytes."""
    pytest.importorskip("datatrove")
    from datatrove.pipeline.tokens.megatron_tokenizer import MegatronTokenizedFile

    docs = [[5, 6, 7], [1], [9, 9, 9, 9, 1000]]
    theirs = MegatronTokenizedFile(str(tmp_path / "dt"), "x", token_size=token_size)
    for d in docs:
        theirs.write(d)
    theirs.close()
    with ShardWriter(tmp_path / "ours", np.uint16 if token_size == 2 else np.int32) as w:
        for d in docs:
            w.add_document(d)
    for ext in ("bin", "idx"):
        assert (tmp_path / f"ours.{ext}").read_bytes() == (tmp_path / "dt" / f"x.{ext}").read_bytes()
