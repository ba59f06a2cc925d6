"""MinHash: signatures estimate Jaccard without bias, the LSH S-curve matches theory, and the
global step's decisions are deterministic and independent of tasks and workers."""

import itertools
import json

import numpy as np
import pytest

from sourcelm.config import ConfigError
from sourcelm.data.dedup.minhash import (
    MinhashDedup,
    MinhashParams,
    MinhashSigner,
    ngram_hashes,
    words,
)
from sourcelm.data.pipeline.document import Document


def shifted_pair(rng, length, shift):
    """Two texts over distinct random words: B is A's word window moved by `shift`, so they share
    length - shift - 4 of their 5-word shingles."""
    vocab = rng.choice(10**7, size=length + shift, replace=False)
    tokens = [f"w{x}" for x in vocab]
    return " ".join(tokens[:length]), " ".join(tokens[shift:shift + length])


def exact_jaccard(a, b, n=5):
    wa, wb = words(a), words(b)
    sa = {tuple(wa[i:i + n]) for i in range(len(wa) - n + 1)}
    sb = {tuple(wb[i:i + n]) for i in range(len(wb) - n + 1)}
    return len(sa & sb) / len(sa | sb)


def test_words_and_shingles_ignore_case_punctuation_and_spacing():
    assert words("Hello, WORLD!  It's\tfine.") == ["hello", "world", "it", "s", "fine"]
    a = ngram_hashes(words("One two three four five six"), 5)
    b = ngram_hashes(words("one, TWO three\nfour five six!"), 5)
    np.testing.assert_array_equal(a, b)
    assert a.size == 2 and a[0] != a[1]
    assert ngram_hashes(words("just three words"), 5).size == 1  # a short text is one shingle
    assert ngram_hashes(words("just three words"), 5, short_as_one=False).size == 0


def test_signature_agreement_estimates_jaccard_without_bias():
    rng = np.random.default_rng(0)
    signer = MinhashSigner(MinhashParams())
    k = signer.params.num_perm
    for length, shift in [(300, 30), (300, 100), (200, 150)]:
        agree, truth = [], []
        for _ in range(40):
            a, b = shifted_pair(rng, length, shift)
            sig, _ = signer.signatures([signer.shingles(a), signer.shingles(b)])
            agree.append(np.mean(sig[0] == sig[1]))
            truth.append(exact_jaccard(a, b))
        j = np.mean(truth)
        sd = np.sqrt(j * (1 - j) / (k * len(agree)))  # binomial standard error of the mean estimate
        assert abs(np.mean(agree) - j) < 4 * sd, (length, shift, np.mean(agree), j)


def run_step(texts, tmp_path, splits=None, workers=1, **params):
    step = MinhashDedup(**params)
    docs = [Document(id=f"d{i:04d}", text=t, source="test") for i, t in enumerate(texts)]
    splits = splits or [0, len(docs)]
    tasks = [docs[a:b] for a, b in itertools.pairwise(splits)]
    for t, part in enumerate(tasks):
        step.collect(iter(part), tmp_path, t)
    step.resolve(tmp_path, len(tasks), workers)
    fresh = MinhashDedup(**params)
    return {d.id: fresh.decide(d, tmp_path, t) for t, part in enumerate(tasks) for d in part}


def test_s_curve_and_precision_recall_at_075_match_theory(tmp_path):
    """Pairs of known exact Jaccard between 0.45 and 1: the fraction found at each similarity, and the
    precision/recall at the 0.75 threshold, are what 1 - (1 - s^8)^14 predicts."""
    rng = np.random.default_rng(1)
    params = MinhashParams()
    texts, truth = [], []
    for shift in rng.integers(0, 80, size=400):
        a, b = shifted_pair(rng, 200, int(shift))
        texts += [a, b]
        truth.append(exact_jaccard(a, b))
    truth = np.array(truth)
    decisions = run_step(texts, tmp_path, splits=[0, 301, 800], workers=2)
    found = np.array([decisions[f"d{2 * i + 1:04d}"] == "near_duplicate" for i in range(400)])
    assert all(decisions[f"d{2 * i:04d}"] is None for i in range(400))  # the first of each pair is kept
    p = params.candidate_probability(truth)
    # overall count within 4 standard deviations of the expected number
    assert abs(found.sum() - p.sum()) < 4 * np.sqrt((p * (1 - p)).sum())
    # per similarity bin
    for lo, hi in [(0.45, 0.65), (0.65, 0.75), (0.75, 0.85), (0.85, 1.01)]:
        sel = (truth >= lo) & (truth < hi)
        if sel.sum() < 20:
            continue
        assert abs(found[sel].sum() - p[sel].sum()) < 4 * np.sqrt((p[sel] * (1 - p[sel])).sum()) + 1, (lo, hi)
    positive = truth >= 0.75
    recall = found[positive].mean()
    precision = found[positive].sum() / max(found.sum(), 1)
    expected_recall = p[positive].mean()
    expected_precision = p[positive].sum() / p.sum()
    assert abs(recall - expected_recall) < 0.06 and recall > 0.9
    assert abs(precision - expected_precision) < 0.08


def test_clusters_keep_first_document_and_are_independent_of_tasks_and_workers(tmp_path):
    rng = np.random.default_rng(2)
    base, _ = shifted_pair(rng, 400, 0)
    other, _ = shifted_pair(rng, 400, 0)
    w = base.split()
    near1 = " ".join(w[:200] + ["changed"] + w[201:])
    near2 = " ".join(w[:100] + ["edited"] + w[101:])
    texts = [other, near1, "", base, near2, "", "short text", "SHORT, text!", other.upper()]
    a = run_step(texts, tmp_path / "a", splits=[0, 9], workers=1)
    b = run_step(texts, tmp_path / "b", splits=[0, 2, 3, 7, 9], workers=3)
    assert a == b
    assert a == {"d0000": None, "d0001": None, "d0002": None, "d0003": "near_duplicate",
                 "d0004": "near_duplicate", "d0005": None, "d0006": None, "d0007": "near_duplicate",
                 "d0008": "near_duplicate"}
    drops = json.loads((tmp_path / "b" / "drop_00002.json").read_text())
    assert drops["d0003"] == "d0001" and drops["d0004"] == "d0001"  # cluster representative named
    stats = json.loads((tmp_path / "b" / "minhash_stats.json").read_text())
    assert stats["empty"] == 2 and stats["near_duplicates"] == 4 and stats["clusters_with_duplicates"] == 3
    # bit-identical decision files whatever the split and worker count
    assert json.loads((tmp_path / "a" / "minhash_stats.json").read_text())["near_duplicates"] == 4


def test_32_bit_signatures_and_other_band_shapes(tmp_path):
    rng = np.random.default_rng(3)
    a, b = shifted_pair(rng, 300, 3)  # Jaccard ~0.98
    c, _ = shifted_pair(rng, 300, 0)
    got = run_step([a, b, c], tmp_path, hash_bits=32, bands=20, rows=5, ngram=3)
    assert got == {"d0000": None, "d0001": "near_duplicate", "d0002": None}
    sig = np.load(tmp_path / "sig_00000.npy")
    assert sig.dtype == np.uint32 and sig.shape == (20, 3, 5)


def test_signatures_are_deterministic_and_seeded():
    texts = ["alpha beta gamma delta epsilon zeta eta theta", "a b c d e f g h i j k"]
    s1 = MinhashSigner(MinhashParams(seed=5))
    s2 = MinhashSigner(MinhashParams(seed=5))
    s3 = MinhashSigner(MinhashParams(seed=6))
    sig1, _ = s1.signatures([s1.shingles(t) for t in texts])
    sig2, _ = s2.signatures([s2.shingles(t) for t in texts])
    sig3, _ = s3.signatures([s3.shingles(t) for t in texts])
    np.testing.assert_array_equal(sig1, sig2)
    assert not np.array_equal(sig1, sig3)


def test_long_documents_match_the_batched_path():
    """A document longer than the batch buffer is reduced in chunks; the result is the plain min."""
    rng = np.random.default_rng(4)
    text, _ = shifted_pair(rng, 5000, 0)
    signer = MinhashSigner(MinhashParams())
    sh = signer.shingles(text)
    sig, valid = signer.signatures([sh])
    ref = (sh[:, None] * signer.a[None, :] + signer.b[None, :]).min(axis=0)
    np.testing.assert_array_equal(sig[0], ref)
    assert valid.all()


@pytest.mark.parametrize("kwargs,field", [({"bands": 0}, "bands"), ({"rows": -1}, "rows"),
                                          ({"hash_bits": 16}, "hash_bits"), ({"ngram": 2.5}, "ngram")])
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ConfigError, match=f"minhash_dedup.{field}"):
        MinhashDedup(**kwargs)


def test_resolve_refuses_signatures_made_with_other_parameters(tmp_path):
    MinhashDedup(rows=8).collect(iter([Document(id="x", text="some words here", source="s")]), tmp_path, 0)
    with pytest.raises(ConfigError, match="same parameters"):
        MinhashDedup(rows=4, bands=28).resolve(tmp_path, 1, 1)


def test_batched_shingles_equal_per_document_shingles():
    rng = np.random.default_rng(5)
    long_text, _ = shifted_pair(rng, 3000, 0)
    texts = ["", "one", "two words", "exactly five words here now", "six words are in this text",
             "Ünïcödé, 東京 and ＦＵＬＬ-width: text with punctuation!", "   ", long_text, "a b c d"]
    signer = MinhashSigner(MinhashParams())
    many = signer.shingles_many(texts)
    assert len(many) == len(texts)
    for text, got in zip(texts, many, strict=True):
        np.testing.assert_array_equal(got, signer.shingles(text))
    assert signer.shingles_many([]) == [] and signer.shingles_many(["", ""])[1].size == 0
