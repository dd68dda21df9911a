"""The rollups' log-bucket histograms: bucket bounds, the BLOB, merging and quantiles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from instrument import _histogram as h


def test_bucket_bounds_follow_the_contract() -> None:
    assert h.bucket_of(0.0) == 0
    assert h.bucket_of(1e-6) == 0
    assert h.bucket_of(-1.0) == 0
    assert h.bucket_of(1.0000001e-6) == 1
    assert h.bucket_of(1.02e-6) == 1
    for i in (1, 5, 100, 700, 1200):
        upper = 1e-6 * 1.02**i
        assert h.bucket_of(upper * 0.9999999) == i
        assert h.bucket_of(upper * 1.0000001) == i + 1


def test_a_value_reads_back_within_one_percent() -> None:
    rng = np.random.default_rng(1)
    values = np.exp(rng.uniform(math.log(2e-6), math.log(3600.0), 100_000))
    back = h.value_of(h.buckets_of(values))
    assert np.max(np.abs(back - values) / values) <= h.MAX_RELATIVE_ERROR + 1e-12
    assert h.MAX_RELATIVE_ERROR < 0.01
    scalar = [h.bucket_of(float(v)) for v in values[:2000]]
    assert scalar == h.buckets_of(values[:2000]).tolist()


def test_blob_is_sorted_little_endian_uint32_pairs() -> None:
    blob = h.encode({7: 2, 3: 5, 9: 0})
    assert blob == np.array([[3, 5], [7, 2]], dtype="<u4").tobytes()
    idx, counts = h.decode(blob)
    assert idx.dtype == np.int64 and counts.dtype == np.int64
    assert idx.tolist() == [3, 7] and counts.tolist() == [5, 2]
    assert h.decode(None)[0].size == 0 and h.encode({}) == b""


def test_merge_adds_counts_of_every_form() -> None:
    arrays = (np.array([1]), np.array([4]))
    idx, counts = h.merge(h.encode({1: 1, 2: 2}), {2: 3, 5: 1}, arrays, None)
    assert dict(zip(idx.tolist(), counts.tolist(), strict=True)) == {1: 5, 2: 5, 5: 1}


def test_quantiles_agree_with_the_samples_within_one_percent() -> None:
    rng = np.random.default_rng(2)
    values = rng.lognormal(mean=-5, sigma=1.5, size=50_000)
    idx, counts = h.from_values(values)
    assert int(counts.sum()) == values.size
    ordered = np.sort(values)
    for q in (0.01, 0.5, 0.9, 0.99, 0.999, 1.0):
        sample = ordered[max(1, math.ceil(q * values.size)) - 1]
        assert h.quantile(idx, counts, q) == pytest.approx(sample, rel=0.01)
    many = h.quantile(idx, counts, [0.5, 0.99])
    assert many.shape == (2,)
    assert math.isnan(h.quantile(h.encode({}), None, 0.5))
