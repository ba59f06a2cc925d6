"""MinHash LSH near-duplicate removal, vectorised with numpy.

Text → words: NFKC, lowercase, then the runs of word characters (`\\w+`, Unicode-aware), so
punctuation and spacing never make two copies differ. A run of CJK characters counts as one word.

Words → shingles: every run of `ngram` consecutive words (5 by default, as FineWeb). A document
shorter than `ngram` words is one shingle of all its words, so short texts (quotes, titles) are
still compared; an empty document is never a duplicate. Each word is hashed once with xxh3-64;
a shingle's 64-bit hash is a polynomial over its word hashes mod 2^64 followed by the murmur3
finaliser, computed for all positions of a document at once.

Shingles → signature: `bands × rows` (14 × 8 = 112 by default) permutations of the 64-bit space,
each h_i(x) = a_i·x + b_i mod 2^64 with a_i odd (a bijection, so a true permutation), applied to a
whole batch of documents' shingles as one (shingles × permutations) array and reduced with
`np.minimum.reduceat` per document. The inputs are already avalanche-mixed hashes, which is what
makes this cheap family behave like random permutations (the S-curve test checks it). With
`hash_bits = 32` the signature keeps the top 32 bits (multiply-shift).

Signature → candidates: per band, the `rows` values are hashed to one 64-bit key, the keys are
sorted with numpy, and neighbours in the sorted order with equal keys (and equal rows, checked, so
no hash collision makes an edge) become edges. Bands run in parallel (`workers` threads; numpy
sorting and ufuncs release the GIL). Candidates → clusters: `union_find.connected_components`.
Kept per cluster: the document with the smallest global position, i.e. the smallest
(task, position in task): the first copy in input order. All others are dropped as
"near_duplicate".

Files under the step's work dir (numpy `.npy` and JSON, never pickle):
  sig_TTTTT.npy        per task, (bands, docs, rows) uint64/uint32: band-major, so the band stage
                       reads one contiguous slice per task (out-of-core: memory is one band at a time)
  ids_TTTTT.json       per task, the document ids in collect order, and which were empty
  edges_BBB.npy        per band, (2, E) int64 global positions of candidate pairs
  drop_TTTTT.json      per task, {dropped doc id: kept doc id of its cluster}
  minhash_stats.json   counts and timings of the global stage
The probability that a pair of Jaccard similarity s becomes a candidate is 1 − (1 − s^rows)^bands;
with 14 × 8 the S-curve's midpoint is near (1/14)^(1/8) ≈ 0.72.
"""

from __future__ import annotations

import itertools
import re
import time
import unicodedata
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import xxhash

from sourcelm.config import ConfigError
from sourcelm.data.dedup.exact import DedupStep, load_task_ids, save_npy, write_json
from sourcelm.data.dedup.union_find import connected_components
from sourcelm.data.pipeline.document import Document

_WORD = re.compile(r"\w+")
_POLY = np.uint64(0x9E3779B97F4A7C15)  # odd multiplier for the polynomial over word hashes
_FMIX1 = np.uint64(0xFF51AFD7ED558CCD)  # murmur3 fmix64 constants
_FMIX2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_COLLECT_BATCH = 4096  # documents whose texts are held at once while collecting
_BATCH_SHINGLES = 1024  # rows of the (shingles × permutations) work array: ~0.9 MB at 112, cache-sized


def words(text: str) -> list[str]:
    """The normalised words of `text` (NFKC, lowercase, Unicode word characters)."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())


def _fmix64(x: np.ndarray) -> np.ndarray:
    """murmur3's 64-bit finaliser, in place: every input bit affects every output bit."""
    x ^= x >> _S33
    x *= _FMIX1
    x ^= x >> _S33
    x *= _FMIX2
    x ^= x >> _S33
    return x


def ngram_hashes(tokens: list[str], n: int, short_as_one: bool = True) -> np.ndarray:
    """64-bit hashes of every run of n consecutive tokens (uint64, one per position).

    Fewer than n tokens: one hash of all of them when `short_as_one`, else none."""
    if not tokens:
        return np.empty(0, dtype=np.uint64)
    wh = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, tokens)), dtype=np.uint64, count=len(tokens))
    if len(tokens) < n:
        if not short_as_one:
            return np.empty(0, dtype=np.uint64)
        n = len(tokens)
    m = len(tokens) - n + 1
    h = wh[:m].copy()
    for k in range(1, n):
        h *= _POLY
        h += wh[k:k + m]
    return _fmix64(h)


@dataclass(frozen=True)
class MinhashParams:
    ngram: int = 5
    bands: int = 14
    rows: int = 8
    hash_bits: int = 64
    seed: int = 1

    def __post_init__(self) -> None:
        for field_name in ("ngram", "bands", "rows"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"minhash_dedup.{field_name} = {value!r}: must be a positive integer")
        if self.hash_bits not in (32, 64):
            raise ConfigError(f"minhash_dedup.hash_bits = {self.hash_bits!r}: use 32 or 64")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"minhash_dedup.seed = {self.seed!r}: must be a non-negative integer")

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint64 if self.hash_bits == 64 else np.uint32)

    def candidate_probability(self, s: float | np.ndarray) -> float | np.ndarray:
        """P(a pair of Jaccard similarity s shares at least one band): the LSH S-curve."""
        return 1.0 - (1.0 - np.asarray(s, dtype=np.float64) ** self.rows) ** self.bands


class MinhashSigner:
    """Computes MinHash signatures for many documents at once."""

    def __init__(self, params: MinhashParams) -> None:
        self.params = params
        rng = np.random.Generator(np.random.PCG64(params.seed))  # same parameters on every platform
        k = params.num_perm
        self.a = rng.integers(0, 2**64 - 1, size=k, dtype=np.uint64, endpoint=True) | np.uint64(1)
        self.b = rng.integers(0, 2**64 - 1, size=k, dtype=np.uint64, endpoint=True)

    def shingles(self, text: str) -> np.ndarray:
        return ngram_hashes(words(text), self.params.ngram)

    def shingles_many(self, texts: list[str]) -> list[np.ndarray]:
        """`[self.shingles(t) for t in texts]`, computed for all texts at once: short documents
        (quotes, titles) would otherwise pay a dozen numpy calls each. The word hashes of all texts
        are concatenated, the n-gram polynomial runs over every position, and the positions whose
        window crosses into the next document are left out."""
        n = self.params.ngram
        tokens = [words(t) for t in texts]
        lens = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        counts = np.maximum(lens - n + 1, 0)
        out: list[np.ndarray]
        if counts.sum() == 0:
            out = [np.empty(0, dtype=np.uint64) for _ in texts]
        else:
            total = int(lens.sum())
            flat = itertools.chain.from_iterable(tokens)
            wh = np.fromiter(map(xxhash.xxh3_64_intdigest, map(str.encode, flat)), dtype=np.uint64, count=total)
            m = total - n + 1
            h = wh[:m].copy()
            for k in range(1, n):
                h *= _POLY
                h += wh[k:k + m]
            _fmix64(h)
            starts = np.cumsum(lens) - lens
            first = np.cumsum(counts) - counts
            pos = np.repeat(starts - first, counts) + np.arange(int(counts.sum()))
            out = np.split(h[pos], np.cumsum(counts)[:-1])
        for i in np.flatnonzero((lens > 0) & (lens < n)).tolist():  # shorter than one shingle
            out[i] = ngram_hashes(tokens[i], n)
        return out

    def _min_over(self, shingles: np.ndarray, buf: np.ndarray) -> np.ndarray:
        """Signature of one long shingle array, a buffer-sized chunk at a time."""
        out = np.full(self.params.num_perm, np.iinfo(np.uint64).max, dtype=np.uint64)
        for start in range(0, shingles.size, buf.shape[0]):
            chunk = shingles[start:start + buf.shape[0]]
            work = buf[:chunk.size]
            np.multiply(chunk[:, None], self.a[None, :], out=work)
            work += self.b
            np.minimum(out, work.min(axis=0), out=out)
        return out

    def signatures(self, shingle_sets: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """(signatures (docs, num_perm) in params.dtype, valid mask). Empty documents get an
        all-ones signature and valid = False."""
        n, k = len(shingle_sets), self.params.num_perm
        sig = np.full((n, k), np.iinfo(np.uint64).max, dtype=np.uint64)
        valid = np.fromiter((s.size > 0 for s in shingle_sets), dtype=bool, count=n)
        buf = np.empty((_BATCH_SHINGLES, k), dtype=np.uint64)
        batch: list[int] = []
        batch_rows = 0

        def flush() -> None:
            nonlocal batch, batch_rows
            if not batch:
                return
            parts = [shingle_sets[i] for i in batch]
            allsh = np.concatenate(parts)
            work = buf[:allsh.size]
            np.multiply(allsh[:, None], self.a[None, :], out=work)
            work += self.b
            starts = np.cumsum([0] + [p.size for p in parts[:-1]])
            sig[batch] = np.minimum.reduceat(work, starts, axis=0)
            batch, batch_rows = [], 0

        for i, sh in enumerate(shingle_sets):
            if sh.size == 0:
                continue
            if sh.size > _BATCH_SHINGLES:  # a long document: on its own, in chunks
                sig[i] = self._min_over(sh, buf)
                continue
            if batch_rows + sh.size > _BATCH_SHINGLES:
                flush()
            batch.append(i)
            batch_rows += sh.size
        flush()
        if self.params.hash_bits == 32:
            return (sig >> np.uint64(32)).astype(np.uint32), valid
        return sig, valid


def _batched(items: Iterable) -> Iterable[tuple]:
    """Tuples of up to _COLLECT_BATCH items (itertools.batched arrives in Python 3.12)."""
    it = iter(items)
    while batch := tuple(itertools.islice(it, _COLLECT_BATCH)):
        yield batch


def band_keys(band: np.ndarray) -> np.ndarray:
    """One 64-bit key per row of a (docs, rows) band, equal rows giving equal keys."""
    key = band[:, 0].astype(np.uint64)
    for j in range(1, band.shape[1]):
        key = key * _POLY + band[:, j].astype(np.uint64)
    return _fmix64(key)


def band_edges(band: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Candidate pairs (2, E) of `positions` whose band rows are identical: sort the keys, link
    each row to its predecessor when both key and rows are equal (a chain spans each bucket)."""
    keys = band_keys(band)
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    same = np.flatnonzero(sk[1:] == sk[:-1])
    left, right = order[same], order[same + 1]
    exact = np.all(band[left] == band[right], axis=1)  # a 64-bit key collision never makes an edge
    return np.stack([positions[left[exact]], positions[right[exact]]])


class MinhashDedup(DedupStep):
    """Near-duplicate removal with MinHash LSH. Pipeline TOML keys: ngram, bands, rows,
    hash_bits, seed (defaults 5, 14, 8, 64, 1: FineWeb's settings)."""

    name = "minhash_dedup"
    reason = "near_duplicate"

    def __init__(self, ngram: int = 5, bands: int = 14, rows: int = 8, hash_bits: int = 64,
                 seed: int = 1) -> None:
        super().__init__()
        self.params = MinhashParams(ngram=ngram, bands=bands, rows=rows, hash_bits=hash_bits, seed=seed)
        self.signer = MinhashSigner(self.params)

    # ---------------------------------------------------------------- per task: signatures
    def collect(self, docs: Iterable[Document], work_dir: Path, task: int) -> None:
        work_dir = Path(work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        ids, sigs, valids = [], [], []
        for batch in _batched(docs):
            ids += [doc.id for doc in batch]
            sig, valid = self.signer.signatures(self.signer.shingles_many([doc.text for doc in batch]))
            sigs.append(sig)
            valids.append(valid)
        p = self.params
        sig = np.concatenate(sigs) if sigs else np.empty((0, p.num_perm), dtype=p.dtype)
        valid = np.concatenate(valids) if valids else np.empty(0, dtype=bool)
        band_major = np.ascontiguousarray(sig.reshape(len(ids), p.bands, p.rows).transpose(1, 0, 2))
        self.counters["docs"] += len(ids)
        self.counters["empty"] += int((~valid).sum())
        save_npy(work_dir / f"sig_{task:05d}.npy", band_major)
        write_json(work_dir / f"ids_{task:05d}.json",
                   {"ids": ids, "empty": np.flatnonzero(~valid).tolist(), "params": asdict(p)})

    # ---------------------------------------------------------------- global: buckets + clusters
    def _load_ids(self, work_dir: Path, num_tasks: int) -> list[dict]:
        metas = load_task_ids(work_dir, "ids", num_tasks)
        for task, meta in enumerate(metas):
            if meta.get("params") != asdict(self.params):
                raise ConfigError(f"{work_dir}/ids_{task:05d}.json was written with MinHash parameters "
                                  f"{meta.get('params')}, but this step has {asdict(self.params)}: "
                                  f"clear {work_dir} or use the same parameters")
        return metas

    def _band(self, work_dir: Path, band: int, num_tasks: int, valid: np.ndarray) -> int:
        """Candidate edges of one band, written to edges_BBB.npy; returns their number."""
        parts = [np.load(work_dir / f"sig_{t:05d}.npy", mmap_mode="r")[band] for t in range(num_tasks)]
        rows = np.concatenate(parts) if parts else np.empty((0, self.params.rows), self.params.dtype)
        positions = np.flatnonzero(valid)
        edges = band_edges(rows[positions], positions)
        save_npy(work_dir / f"edges_{band:03d}.npy", edges)
        return edges.shape[1]

    def resolve(self, work_dir: Path, num_tasks: int, workers: int = 1) -> None:
        work_dir = Path(work_dir)
        t0 = time.perf_counter()
        metas = self._load_ids(work_dir, num_tasks)
        counts = np.array([len(m["ids"]) for m in metas], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        n = int(offsets[-1])
        valid = np.ones(n, dtype=bool)
        for t, m in enumerate(metas):
            valid[offsets[t] + np.asarray(m["empty"], dtype=np.int64)] = False
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            per_band = list(pool.map(lambda b: self._band(work_dir, b, num_tasks, valid),
                                     range(self.params.bands)))
        t1 = time.perf_counter()
        edges = np.concatenate([np.load(work_dir / f"edges_{b:03d}.npy") for b in range(self.params.bands)],
                               axis=1)
        labels = connected_components(n, edges[0], edges[1])
        t2 = time.perf_counter()
        ids = [i for m in metas for i in m["ids"]]
        dropped = self.write_decisions(work_dir, offsets, ids, labels)
        clusters = np.unique(labels[labels != np.arange(n)]).size
        stats = {"docs": n, "empty": int((~valid).sum()), "candidate_edges_per_band": per_band,
                 "clusters_with_duplicates": int(clusters), "near_duplicates": dropped,
                 "seconds": {"buckets": t1 - t0, "clusters": t2 - t1, "decisions": time.perf_counter() - t2},
                 "params": asdict(self.params)}
        write_json(work_dir / "minhash_stats.json", stats)
        self.counters["near_duplicates"] += dropped
        self.counters["clusters_with_duplicates"] += int(clusters)
