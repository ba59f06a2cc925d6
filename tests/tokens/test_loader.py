"""The deterministic loader: tiling, order as a pure function of (seed, i), rank slices, resume,
validation split, mixtures."""

import numpy as np
import pytest
import torch

from sourcelm.tokens.indexed import ShardWriter
from sourcelm.tokens.loader import TokenWindows
from sourcelm.tokens.stream import write_doc_sources


def write_shard(prefix, docs, sources=None):
    with ShardWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    if sources is not None:
        write_doc_sources(prefix, sources)
    return str(prefix)


def counting_docs(start, lengths):
    """Documents whose tokens count up from `start`: the stream is then start, start+1, ..."""
    out, t = [], start
    for n in lengths:
        out.append(np.arange(t, t + n))
        t += n
    return out


def test_windows_tile_the_stream_across_shards(tmp_path):
    a = write_shard(tmp_path / "a", counting_docs(0, [5, 7, 1]))
    b = write_shard(tmp_path / "b", counting_docs(13, [20, 3]))  # stream = 0..35
    tw = TokenWindows([str(tmp_path)], seq_len=4, seed=0)
    assert tw.num_windows == (36 - 1) // 4
    seen = sorted(tuple(tw.sample(i)) for i in range(tw.num_windows))
    assert seen == [tuple(range(4 * w, 4 * w + 5)) for w in range(tw.num_windows)]
    assert tw.sample(0).dtype == np.int64 and tw.sample(0).shape == (5,)
    # prefixes give the same data as the dir
    assert tw.state() == TokenWindows([a, b], seq_len=4, seed=0).state()


def test_order_is_pcg64_permutation_per_epoch(tmp_path):
    write_shard(tmp_path / "a", counting_docs(0, [101]))
    tw = TokenWindows([str(tmp_path)], seq_len=10, seed=7)
    n = tw.num_windows
    for epoch in (0, 1, 5):
        perm = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, epoch]))).permutation(n)
        got = [int(tw.sample(epoch * n + j)[0]) // 10 for j in range(n)]
        assert got == perm.tolist()
    assert [tw.sample(i)[0] for i in range(n)] != [tw.sample(n + i)[0] for i in range(n)]
    other = TokenWindows([str(tmp_path)], seq_len=10, seed=8)
    assert [other.sample(i)[0] for i in range(n)] != [tw.sample(i)[0] for i in range(n)]


def test_batches_across_world_sizes_and_resume(tmp_path):
    write_shard(tmp_path / "a", counting_docs(0, [50, 60, 70]))
    write_shard(tmp_path / "b", counting_docs(180, [90]))
    ref = TokenWindows([str(tmp_path)], seq_len=8, seed=3)
    size, steps = 8, 12  # 96 samples: crosses epoch boundaries (33 windows per epoch)
    straight = [ref.batch(s * size, size) for s in range(steps)]
    for world in (1, 2, 4):
        ranks = [TokenWindows([str(tmp_path)], seq_len=8, seed=3) for _ in range(world)]
        for s in range(steps):
            parts = [ranks[r].batch(s * size, size, rank=r, world=world) for r in range(world)]
            assert all(p.shape == (size // world, 9) for p in parts)
            assert torch.equal(torch.cat(parts), straight[s])
    # resume at step 5 on a fresh instance with a different world size: same data
    resumed = TokenWindows([str(tmp_path)], seq_len=8, seed=3)
    resumed.load_state(ref.state())
    for s in range(5, steps):
        parts = [resumed.batch(s * size, size, rank=r, world=2) for r in range(2)]
        assert torch.equal(torch.cat(parts), straight[s])
    assert straight[0].dtype == torch.int64
    with pytest.raises(ValueError, match="not divisible"):
        ref.batch(0, 6, rank=0, world=4)


def test_state_mismatch_is_refused(tmp_path):
    write_shard(tmp_path / "a", counting_docs(0, [100]))
    tw = TokenWindows([str(tmp_path)], seq_len=8, seed=3)
    st = tw.state()
    assert set(st) == {"seed", "seq_len", "num_windows", "fingerprint"}
    assert all(isinstance(v, int) for v in st.values())
    with pytest.raises(ValueError, match="seed"):
        TokenWindows([str(tmp_path)], seq_len=8, seed=4).load_state(st)
    write_shard(tmp_path / "b", counting_docs(100, [3]))
    with pytest.raises(ValueError, match="mismatch"):
        TokenWindows([str(tmp_path)], seq_len=8, seed=3).load_state(st)


def test_too_little_data_names_the_fix(tmp_path):
    write_shard(tmp_path / "a", counting_docs(0, [4]))
    with pytest.raises(ValueError, match="seq_len"):
        TokenWindows([str(tmp_path)], seq_len=8, seed=0)


def test_valid_split_by_document_hash(tmp_path):
    rng = np.random.default_rng(1)
    docs = [rng.integers(2, 5000, size=rng.integers(3, 12)) for _ in range(400)]
    write_shard(tmp_path / "a", docs)

    def doc_tokens(tw):
        stream = tw.sets[0].stream
        return stream.read(0, stream.num_tokens)

    train = TokenWindows([str(tmp_path)], seq_len=4, seed=0, split="train", valid_fraction=0.2)
    valid = TokenWindows([str(tmp_path)], seq_len=4, seed=0, split="valid", valid_fraction=0.2)
    t, v = doc_tokens(train), doc_tokens(valid)
    assert t.size + v.size == sum(map(len, docs))
    # each document lands whole in exactly one split, in order
    ti = vi = n_valid = 0
    for d in docs:
        if ti + len(d) <= t.size and np.array_equal(t[ti: ti + len(d)], d):
            ti += len(d)
        else:
            assert np.array_equal(v[vi: vi + len(d)], d)
            vi += len(d)
            n_valid += 1
    assert (ti, vi) == (t.size, v.size)
    assert 40 <= n_valid <= 120  # 20% of 400, loosely
    again = TokenWindows([str(tmp_path)], seq_len=4, seed=9, split="valid", valid_fraction=0.2)
    assert np.array_equal(doc_tokens(again), v), "the split does not depend on the seed"


def test_tokenize_output_dir_resolves_split_subdir(tmp_path):
    write_shard(tmp_path / "train" / "00000", counting_docs(0, [40]))
    write_shard(tmp_path / "valid" / "00000", counting_docs(1000, [20]))
    assert TokenWindows([str(tmp_path)], 4, 0).sample(0).min() < 1000
    assert TokenWindows([str(tmp_path)], 4, 0, split="valid").sample(0).min() >= 1000


def test_mixture_by_paths_is_exact_per_period(tmp_path):
    write_shard(tmp_path / "web" / "s", counting_docs(0, [400]))  # tokens < 400
    write_shard(tmp_path / "code" / "s", counting_docs(10_000, [130]))  # tokens >= 10000
    mix = {"web": 0.7, "code": 0.3}
    tw = TokenWindows([str(tmp_path / "web"), str(tmp_path / "code")], 4, seed=5, mixture=mix)
    assert tw.schedule.period == 10
    is_code = [bool(tw.sample(i)[0] >= 10_000) for i in range(200)]
    for k in range(20):
        assert sum(is_code[10 * k: 10 * k + 10]) == 3
    assert is_code[:10] != is_code[10:20] or is_code[10:20] != is_code[20:30], "period order is shuffled"
    rep = tw.mixture_report(200)
    assert rep["code"]["samples"] == 60 and rep["web"]["samples"] == 140
    assert rep["code"]["epochs"] == pytest.approx(60 / 32)
    assert tw.mixture_report(13)["code"]["samples"] == 3 + sum(is_code[10:13])
    # code samples follow the code source's own permutation: 32 windows, each once per epoch
    code_windows = [int(tw.sample(i)[0] - 10_000) // 4 for i in range(200) if is_code[i]]
    assert sorted(code_windows[:32]) == list(range(32))
    # identical across instances and world sizes
    tw2 = TokenWindows([str(tmp_path / "web"), str(tmp_path / "code")], 4, seed=5, mixture=mix)
    assert torch.equal(torch.cat([tw2.batch(40, 8, r, 4) for r in range(4)]), tw.batch(40, 8))


def test_mixture_by_recorded_document_source(tmp_path):
    docs = counting_docs(0, [30, 40, 50, 60])
    write_shard(tmp_path / "a", docs, sources=["web", "code", "web", "code"])
    tw = TokenWindows([str(tmp_path)], 5, seed=2, mixture={"web": 1, "code": 3})
    assert tw.schedule.period == 4
    web = set(range(30)) | set(range(70, 120))
    names = []
    for i in range(40):
        s, _ = tw.schedule.locate(i)
        names.append(tw.schedule.names[s])
        window = set(tw.sample(i).tolist())
        assert window <= web if names[-1] == "web" else not window & web
    assert all(names[4 * k: 4 * k + 4].count("web") == 1 for k in range(10))
    with pytest.raises(ValueError, match="neither one of the data paths"):
        TokenWindows([str(tmp_path)], 5, seed=2, mixture={"books": 1})
