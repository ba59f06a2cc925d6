"""The deterministic loader: global sample index -> window of seq_len + 1 tokens.

Windows tile the token stream without overlap: window w is tokens [w*L, w*L + L + 1) with L =
seq_len (its last token is the next window's first, the target of the last position). The sample
at global index i is a pure function of (seed, i): epoch e = i // num_windows, and within an epoch
a permutation of the windows drawn by numpy's PCG64 seeded from (seed, e). So the data order does
not depend on the number of ranks: rank r of `world` takes its contiguous slice of each global
batch, and resuming needs only the number of samples consumed, which the trainer keeps.

Mixtures: with weights {"web": 0.7, "code": 0.3}, each source is its own window set with its own
per-epoch permutation, and a schedule assigns every global index to a source: the weights are made
exact fractions, one period of P indices holds each source exactly weight*P times, in an order
shuffled per period by a seeded permutation. Over any whole number of periods the proportions are
exact; `mixture_report` gives the realised counts.
"""

from __future__ import annotations

import json
import math
import zlib
from fractions import Fraction
from pathlib import Path

import numpy as np
import xxhash

from sourcelm.tokens.indexed import ShardReader, find_shards
from sourcelm.tokens.stream import TokenStream, read_doc_sources, split_mask

_MIX_TAG = 0x6D6978  # "mix": keeps the schedule's random stream apart from the windows'
_MAX_PERIOD = 1_000_000


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


class _WindowSet:
    """All windows of one stream, and their per-epoch permutations."""

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, tag: tuple[int, ...], name: str):
        self.stream, self.seq_len, self.seed, self.tag = stream, seq_len, seed, tag
        self.num_windows = max(0, (stream.num_tokens - 1) // seq_len)
        if self.num_windows == 0:
            raise ValueError(f"{name}: {stream.num_tokens} tokens do not fill one window of "
                             f"seq_len + 1 = {seq_len + 1}; add data or lower data.seq_len")
        self._perms: dict[int, np.ndarray] = {}

    def permutation(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            if len(self._perms) >= 2:  # a batch spans at most two epochs at a time
                self._perms.pop(next(iter(self._perms)))
            perm = _rng(self.seed, epoch, *self.tag).permutation(self.num_windows)
            self._perms[epoch] = perm
        return perm

    def window(self, w: int) -> np.ndarray:
        return self.stream.read(w * self.seq_len, self.seq_len + 1)

    def window_index(self, i: int) -> int:
        epoch, pos = divmod(i, self.num_windows)
        return int(self.permutation(epoch)[pos])

    def sample(self, i: int) -> np.ndarray:
        return self.window(self.window_index(i))


class _TokenSources:
    """The source of every token of a stream: that of the document the token belongs to (a shard's
    `.sources.json` sidecar; a shard without one counts as the source named after the shard file).
    Ids index `names`, one list for every stream of a TokenWindows, so ranks and windows agree."""

    def __init__(self, stream: TokenStream, index: dict[str, int]):
        self.stream = stream
        self.doc_source = []  # per shard of the stream: the source id of each document
        for shard in stream.shards:
            recorded = read_doc_sources(shard.prefix, len(shard))
            if recorded is None:
                self.doc_source.append(np.full(len(shard), index[Path(shard.prefix).name], dtype=np.int64))
            else:
                names, idx = recorded
                self.doc_source.append(np.array([index[_source_name(n)] for n in names], dtype=np.int64)[idx])

    def read(self, start: int, length: int) -> np.ndarray:
        """Source ids of the stream's tokens [start, start + length)."""
        st = self.stream
        pos = np.arange(start, start + length, dtype=np.int64)
        seg = np.searchsorted(st.seg_begin, pos, side="right") - 1
        offset = st.seg_start[seg] + pos - st.seg_begin[seg]  # token offset inside its shard
        out = np.empty(length, dtype=np.int64)
        for k in np.unique(st.seg_shard[seg]):
            here = st.seg_shard[seg] == k
            doc = np.searchsorted(st.shards[k].doc_offsets, offset[here], side="right") - 1
            out[here] = self.doc_source[k][doc]
        return out


def _source_name(recorded: str) -> str:
    return recorded or "(no source)"


def _source_names(readers: dict[str, ShardReader]) -> list[str]:
    names = set()
    for prefix, reader in readers.items():
        recorded = read_doc_sources(prefix, len(reader))
        names.update(map(_source_name, recorded[0]) if recorded else [Path(prefix).name])
    return sorted(names)


class _MixtureSchedule:
    """Global index -> (source, that source's own sample index), exactly proportioned per period."""

    def __init__(self, weights: dict[str, float], seed: int):
        names = sorted(weights)
        for n in names:
            if not (isinstance(weights[n], (int, float)) and weights[n] > 0):
                raise ValueError(f"mixture weight of {n!r} is {weights[n]!r}; weights must be positive numbers")
        approx = [Fraction(weights[n]).limit_denominator(1000) for n in names]
        total = sum(approx)
        exact = [a / total for a in approx]
        self.period = math.lcm(*(f.denominator for f in exact))
        if self.period > _MAX_PERIOD:
            raise ValueError(f"mixture weights {weights} need a schedule period of {self.period}; "
                             "round them (e.g. to 3 decimals with few sources)")
        self.names = names
        self.counts = np.array([int(f * self.period) for f in exact], dtype=np.int64)
        self.seed = seed
        self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

    def _period(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._cache is None or self._cache[0] != k:
            slots = np.repeat(np.arange(len(self.names)), self.counts)
            order = slots[_rng(self.seed, k, _MIX_TAG).permutation(self.period)]
            rank = np.empty(self.period, dtype=np.int64)  # how many earlier slots of the same source
            for s in range(len(self.names)):
                where = np.flatnonzero(order == s)
                rank[where] = np.arange(where.size)
            self._cache = (k, order, rank)
        return self._cache[1], self._cache[2]

    def locate(self, i: int) -> tuple[int, int]:
        k, j = divmod(i, self.period)
        order, rank = self._period(k)
        s = int(order[j])
        return s, k * int(self.counts[s]) + int(rank[j])

    def counts_before(self, n: int) -> np.ndarray:
        """How many of the global indices 0..n-1 each source receives."""
        k, j = divmod(n, self.period)
        out = k * self.counts
        if j:
            order, _ = self._period(k)
            out = out + np.bincount(order[:j], minlength=len(self.names))
        return out


def _resolve(path: str, split: str) -> list[str]:
    """A shard prefix, a dir of shards, or a tokenize output dir (then its `split` subdir)."""
    p = Path(path)
    if p.is_dir() and not any(p.glob("*.idx")) and (p / split).is_dir():
        p = p / split
    manifest = p / "manifest.json"
    if p.is_dir() and manifest.exists():  # a tokenize output: exactly the shards its manifest lists
        shards = json.loads(manifest.read_text()).get("shards")
        if isinstance(shards, dict):
            return [str(p / name) for name in sorted(shards)]
    return find_shards(p)


class TokenWindows:
    """All windows of seq_len + 1 tokens over the documents of `paths` (see the module doc).

    paths: shard prefixes, dirs of shards, or `sourcelm tokenize` output dirs (their `split`
        subdir is read).
    valid_fraction > 0: the shards are not split yet; documents are assigned to "train" or "valid"
        by a hash of their tokens and only `split` is kept.
    mixture: {source: weight}; a source is one of `paths` (matched exactly or by its last name), or
        a `source` recorded per document by `sourcelm tokenize`.
    """

    def __init__(self, paths: list[str], seq_len: int, seed: int, split: str = "train",
                 valid_fraction: float = 0.0, mixture: dict | None = None):
        if isinstance(paths, (str, Path)):
            paths = [str(paths)]
        if not paths:
            raise ValueError("data paths are empty: set data.train (and data.valid) to token shard dirs")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        if split not in ("train", "valid"):
            raise ValueError(f"split must be 'train' or 'valid', got {split!r}")
        if not 0.0 <= valid_fraction < 1.0:
            raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
        self.seq_len, self.seed, self.split, self.valid_fraction = seq_len, int(seed), split, valid_fraction
        self.mixture = dict(mixture) if mixture else None
        prefixes = {p: _resolve(str(p), split) for p in map(str, paths)}
        readers = {pre: ShardReader(pre) for pres in prefixes.values() for pre in pres}
        base_masks = {pre: (split_mask(r, split, valid_fraction) if valid_fraction > 0 else None)
                      for pre, r in readers.items()}
        self.prefixes = [pre for pres in prefixes.values() for pre in pres]
        if self.mixture is None:
            stream = TokenStream([readers[p] for p in self.prefixes], [base_masks[p] for p in self.prefixes])
            self.sets = [_WindowSet(stream, seq_len, self.seed, (), "data")]
            self.schedule = None
        else:
            self.schedule = _MixtureSchedule(self.mixture, self.seed)
            self.sets = [self._source_set(name, prefixes, readers, base_masks) for name in self.schedule.names]
        self.num_windows = sum(s.num_windows for s in self.sets)
        self.fingerprint = self._fingerprint(readers)
        self._readers, self._names, self._token_sources = readers, None, None  # built when first asked for

    def _source_set(self, name, prefixes, readers, base_masks) -> _WindowSet:
        tag = (zlib.crc32(name.encode()) | 1,)
        for path, pres in prefixes.items():  # a source given as one of the paths
            if name == path or Path(path).name == name:
                stream = TokenStream([readers[p] for p in pres], [base_masks[p] for p in pres])
                return _WindowSet(stream, self.seq_len, self.seed, tag, f"mixture source {name!r}")
        shards, masks, seen = [], [], set()
        for pre in self.prefixes:  # a source recorded per document
            r = readers[pre]
            recorded = read_doc_sources(pre, len(r))
            if recorded is None:
                continue
            names, idx = recorded
            seen.update(names)
            if name not in names:
                continue
            mask = idx == names.index(name)
            if base_masks[pre] is not None:
                mask &= base_masks[pre]
            shards.append(r)
            masks.append(mask)
        if not shards:
            raise ValueError(f"mixture source {name!r} is neither one of the data paths {list(prefixes)} "
                             f"nor a recorded document source {sorted(seen)}; fix the mixture keys")
        return _WindowSet(TokenStream(shards, masks), self.seq_len, self.seed, tag, f"mixture source {name!r}")

    def _fingerprint(self, readers: dict[str, ShardReader]) -> int:
        desc = [[Path(p).name, readers[p].num_tokens, len(readers[p])] for p in self.prefixes]
        desc.append([self.split, self.valid_fraction, sorted((self.mixture or {}).items())])
        return xxhash.xxh3_64_intdigest(json.dumps(desc).encode()) & ((1 << 63) - 1)

    def __len__(self) -> int:
        return self.num_windows

    def sample(self, i: int) -> np.ndarray:
        """int64 [seq_len + 1]: the window at global sample index i (any i >= 0; epochs repeat)."""
        if i < 0:
            raise IndexError(f"sample index must be >= 0, got {i}")
        if self.schedule is None:
            return self.sets[0].sample(i)
        s, local = self.schedule.locate(i)
        return self.sets[s].sample(local)

    def batch(self, start: int, size: int, rank: int = 0, world: int = 1):
        """LongTensor [size / world, seq_len + 1]: this rank's contiguous slice of the global batch of
        samples start .. start + size - 1."""
        import torch

        if size % world:
            raise ValueError(f"global batch {size} is not divisible by the data-parallel world {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world {world}")
        per = size // world
        first = start + rank * per
        rows = [self.sample(i) for i in range(first, first + per)]
        out = np.stack(rows) if rows else np.zeros((0, self.seq_len + 1), dtype=np.int64)
        return torch.from_numpy(out)

    @property
    def source_names(self) -> list[str]:
        """The document sources of this data, sorted; `batch_sources` gives indices into this list."""
        if self._names is None:
            self._names = _source_names(self._readers)
            index = {n: i for i, n in enumerate(self._names)}
            self._token_sources = [_TokenSources(s.stream, index) for s in self.sets]
        return self._names

    def batch_sources(self, start: int, size: int, rank: int = 0, world: int = 1):
        """LongTensor shaped like `batch(start, size, rank, world)`: for each token, the index in `source_names`
        of the source of the document it belongs to (a window may span documents of several sources)."""
        import torch

        if self._token_sources is None:
            self.source_names  # noqa: B018 (the property builds the per-stream tables)
        per = size // world
        rows = []
        for i in range(start + rank * per, start + (rank + 1) * per):
            s, local = (0, i) if self.schedule is None else self.schedule.locate(i)
            w = self.sets[s].window_index(local)
            rows.append(self._token_sources[s].read(w * self.seq_len, self.seq_len + 1))
        return torch.from_numpy(np.stack(rows) if rows else np.zeros((0, self.seq_len + 1), dtype=np.int64))

    def state(self) -> dict:
        """A few integers identifying the order (the trainer keeps consumed_samples itself)."""
        return {"seed": self.seed, "seq_len": self.seq_len, "num_windows": self.num_windows,
                "fingerprint": self.fingerprint}

    def load_state(self, d: dict) -> None:
        """Checks a saved state against this data; resuming on other data would be silently wrong."""
        for key, value in self.state().items():
            if key in d and int(d[key]) != value:
                raise ValueError(f"loader state mismatch in {key}: checkpoint has {d[key]}, this data has "
                                 f"{value}; resume with the same data.train/seq_len/seed, or start a new run")

    def mixture_report(self, num_samples: int) -> dict:
        """Per source: weight, samples and tokens served among global indices 0..num_samples-1, its
        window count and how many epochs of it that is."""
        if self.schedule is None:
            return {"data": {"weight": 1.0, "samples": num_samples, "tokens": num_samples * self.seq_len,
                             "windows": self.num_windows, "epochs": num_samples / self.num_windows}}
        counts = self.schedule.counts_before(num_samples)
        return {name: {"weight": int(self.schedule.counts[s]) / self.schedule.period,
                       "samples": int(counts[s]), "tokens": int(counts[s]) * self.seq_len,
                       "windows": self.sets[s].num_windows,
                       "epochs": int(counts[s]) / self.sets[s].num_windows}
                for s, name in enumerate(self.schedule.names)}
