"""Log-bucket histograms of durations in seconds, as the rollups store them.

Bucket ``0`` holds values ``<= 1e-6`` s (zero and negatives included). Bucket ``i >= 1``
holds ``(1e-6 * G**(i-1), 1e-6 * G**i]`` with ``G = 1.02``. A bucket's value is its
geometric midpoint ``1e-6 * G**(i - 0.5)``, so a value read back from its bucket is within
``sqrt(G) - 1`` (0.995 %, under 1 %) of the value recorded; bucket ``0`` reads back as
``0.0`` (an absolute error of at most 1 µs). A quantile computed from a histogram is the
value of the bucket holding the sample of that rank, so it is within 1 % of that sample.

A histogram is stored as a BLOB of little-endian uint32 pairs ``(bucket, count)``, sorted
by bucket, one pair per non-empty bucket. Pure Python and numpy: the same code serves the
writer, ``compact`` and the readers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

BASE = 1e-6
"""The upper bound of bucket 0, in seconds."""

G = 1.02
"""The ratio of a bucket's upper bound to its lower bound."""

LOG_G = math.log(G)

MAX_RELATIVE_ERROR = math.sqrt(G) - 1
"""The most a bucket's value differs from a value in it, relative to that value (0.995 %)."""

_DTYPE = np.dtype("<u4")

Histogram = Mapping[int, int] | tuple[Any, Any] | bytes | None
"""A histogram in any form :func:`merge` and :func:`encode` accept: ``{bucket: count}``,
``(indices, counts)`` arrays, an encoded BLOB, or ``None`` (empty)."""


def bucket_of(seconds: float) -> int:
    """The bucket that holds ``seconds``."""
    if not seconds > BASE:  # NaN lands in bucket 0 too
        return 0
    return max(1, math.ceil(math.log(seconds / BASE) / LOG_G - 1e-9))


def buckets_of(seconds: np.ndarray) -> np.ndarray:
    """The bucket of each value of ``seconds`` (int64; NaN and values ``<= 1e-6`` give 0)."""
    x = np.asarray(seconds, dtype=np.float64)
    big = x > BASE
    if big.all():  # the common case: the same steps, in place, without selecting
        y = x / BASE
        np.log(y, out=y)
        y /= LOG_G
        y -= 1e-9
        np.ceil(y, out=y)
        np.maximum(y, 1, out=y)
        return y.astype(np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    if big.any():
        out[big] = np.maximum(1, np.ceil(np.log(x[big] / BASE) / LOG_G - 1e-9)).astype(np.int64)
    return out


def value_of(index: int | np.ndarray) -> Any:
    """A bucket's representative value in seconds (its geometric midpoint; 0.0 for bucket 0)."""
    if isinstance(index, np.ndarray):
        i = index.astype(np.float64)
        return np.where(i > 0, BASE * np.power(G, i - 0.5), 0.0)
    return BASE * G ** (index - 0.5) if index > 0 else 0.0


def upper_of(index: int) -> float:
    """A bucket's upper bound in seconds."""
    return BASE * G**index


def from_values(seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The histogram of ``seconds`` (NaN values left out) as ``(indices, counts)``."""
    x = np.asarray(seconds, dtype=np.float64)
    x = x[~np.isnan(x)]
    if not x.size:
        return _empty()
    idx, counts = np.unique(buckets_of(x), return_counts=True)
    return idx.astype(np.int64), counts.astype(np.int64)


class Merged(tuple):  # type: ignore[type-arg]
    """A histogram as :func:`merge` returns it, ``(indices, counts)``: int64 arrays, the
    indices ascending and unique, the counts positive. :func:`encode` and :func:`merge`
    take it as it is (merging it alone would give it back)."""

    __slots__ = ()


def _empty() -> tuple[np.ndarray, np.ndarray]:
    return Merged((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)))


def _pairs(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """``hist`` in any accepted form as ``(indices, counts)`` int64 arrays (not merged)."""
    if hist is None:
        return _empty()
    if isinstance(hist, (bytes, bytearray, memoryview)):
        return decode(bytes(hist))
    if isinstance(hist, Mapping):
        if not hist:
            return _empty()
        return (
            np.fromiter(hist.keys(), dtype=np.int64, count=len(hist)),
            np.fromiter(hist.values(), dtype=np.int64, count=len(hist)),
        )
    indices, counts = hist
    return np.asarray(indices, dtype=np.int64), np.asarray(counts, dtype=np.int64)


def encode(hist: Histogram) -> bytes:
    """The BLOB of ``hist``: sorted little-endian uint32 ``(bucket, count)`` pairs, no zeros.

    Equal buckets are summed; a count past uint32 is not expected in one rollup row (4e9
    checkouts in an hour) and is clipped.
    """
    indices, counts = hist if isinstance(hist, Merged) else merge(hist)
    out = np.empty((indices.size, 2), dtype=_DTYPE)
    out[:, 0] = indices
    out[:, 1] = np.minimum(counts, 0xFFFFFFFF)
    return out.tobytes()


def decode(blob: bytes | None) -> tuple[np.ndarray, np.ndarray]:
    """``(indices, counts)`` as int64 arrays from a BLOB :func:`encode` made (``None``: empty)."""
    if not blob:
        return _empty()
    pairs = np.frombuffer(blob, dtype=_DTYPE).reshape(-1, 2)
    return pairs[:, 0].astype(np.int64), pairs[:, 1].astype(np.int64)


def merge(*hists: Histogram | Iterable[Histogram]) -> tuple[np.ndarray, np.ndarray]:
    """The sum of ``hists`` (each in any accepted form, or one list of them) as sorted
    ``(indices, counts)`` arrays without empty buckets."""
    if len(hists) == 1 and isinstance(hists[0], list):
        hists = tuple(hists[0])
    if len(hists) == 1 and isinstance(hists[0], Merged):
        return hists[0]
    parts = [_counted(h) for h in hists]  # type: ignore[arg-type]
    parts = [p for p in parts if p[0].size]
    if not parts:
        return _empty()
    size = sum(p[0].size for p in parts)
    low = min(int(p[0].min()) for p in parts)
    top = max(int(p[0].max()) for p in parts)
    if low >= 0 and top < 4096 + 16 * size:
        # Buckets are small numbers: add the counts bucket by bucket, no sort. The counts
        # are whole numbers, added exactly in float64 (below 2**53) in any order.
        sums = np.bincount(parts[0][0], weights=parts[0][1], minlength=top + 1)
        for indices, counts in parts[1:]:
            sums += np.bincount(indices, weights=counts, minlength=top + 1)
        uniq = np.flatnonzero(sums)
        return Merged((uniq.astype(np.int64, copy=False), sums[uniq].astype(np.int64)))
    indices = np.concatenate([p[0] for p in parts]).astype(np.int64, copy=False)
    counts = np.concatenate([p[1] for p in parts]).astype(np.int64, copy=False)
    keep = counts > 0
    indices, counts = indices[keep], counts[keep]
    if not indices.size:
        return _empty()
    uniq, inverse = np.unique(indices, return_inverse=True)
    return Merged((uniq.astype(np.int64), np.bincount(inverse, weights=counts).astype(np.int64)))


def _counted(hist: Histogram) -> tuple[np.ndarray, np.ndarray]:
    """``hist`` as ``(indices, counts)`` arrays without a negative count (the entries of a
    count of 0 or less are left out, but where every count is unsigned: a BLOB's)."""
    if isinstance(hist, (bytes, bytearray, memoryview)):
        if not hist:
            return _empty()
        pairs = np.frombuffer(hist, dtype=_DTYPE).reshape(-1, 2)
        return pairs[:, 0], pairs[:, 1]
    if isinstance(hist, Merged):
        return hist
    indices, counts = _pairs(hist)
    keep = counts > 0
    return (indices, counts) if keep.all() else (indices[keep], counts[keep])


def count(hist: Histogram) -> int:
    """How many values ``hist`` holds."""
    return int(_pairs(hist)[1].sum())


def quantile(indices: Any, counts: Any = None, q: Any = 0.5) -> Any:
    """The ``q`` quantile (0..1, a number or an array) of a histogram, in seconds.

    ``indices, counts`` as :func:`decode` gives them (or one histogram in any accepted form
    as ``indices`` with ``counts`` ``None``). The value is that of the bucket holding the
    sample of rank ``ceil(q * n)`` (at least 1): within 1 % of that sample. NaN when empty.
    """
    if counts is None:
        indices, counts = merge(indices)
    else:
        indices, counts = merge((indices, counts))
    qs = np.atleast_1d(np.asarray(q, dtype=np.float64))
    total = int(counts.sum())
    if total == 0:
        out = np.full(qs.shape, np.nan)
    else:
        ranks = np.clip(np.ceil(qs * total), 1, total)
        where = np.searchsorted(np.cumsum(counts), ranks, side="left")
        out = value_of(indices[np.minimum(where, indices.size - 1)])
    return float(out[0]) if np.ndim(q) == 0 else out
