"""The writer's rollups and notable checkouts, batch by batch, against a plain reference.

The rollups the writer computes (``_rollups.Rollups``) and the notable checkouts it marks
(``_retention.Notable``) take vectorised short cuts: groups found by counting where ids
are close, histograms binned in one pass, runs of sorted records reduced at once. Here
random batches (every kind, NULLs, records out of order, periods crossed, ids near and
far, the same minute fed twice) go through them and through a reference that walks the
records one by one, in the order the rollups document; every row must be equal, sums to
the bit. And the batch read from the C queue equals the batch read from the list queue.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from instrument import _histogram as hist
from instrument import _native, _rollups, _writer
from instrument._record import RECORD_FIELDS, RECORD_WIDTH
from instrument._retention import LEAK_MARK_KINDS, Notable
from instrument._retention import RETURN_KINDS as ENDING_KINDS
from instrument._rollups import KINDS, Batch, Rollups

P = 60
T0 = 1_790_000_040.0  # a whole minute
SITE_KINDS = {"checkout", "checkin", "gc_checkin", "timeout", "leak_suspected", "connect"}


def _random_batch(rng: np.random.Generator, t_from: float, shape: str) -> Batch:
    """A batch as the writer sees one: mostly checkouts and checkins of a few pools and
    call sites, in clock order but for a few; ``shape`` picks the ids' spread."""
    n = int(rng.integers(1, 400))
    weights = np.array([30, 30, 3, 2, 2, 2, 2, 2, 3, 3, 2, 2, 2, 1], dtype=float)
    kinds = rng.choice(np.arange(-1, len(KINDS)), size=n, p=weights / weights.sum())
    at = t_from + np.sort(rng.uniform(0, float(rng.choice([0.5, 20.0, 150.0])), n))
    if rng.random() < 0.5:  # a few records out of order
        swap = rng.integers(0, n, size=(max(1, n // 20), 2))
        at[swap[:, 0]], at[swap[:, 1]] = at[swap[:, 1]], at[swap[:, 0]].copy()
    if rng.random() < 0.3:
        at[rng.integers(0, n, n // 10)] = at[0]  # equal times
    # near: the common batch; many: past the pools compared one by one, and call sites
    # too far apart to count; far: ids past the bit fields, buckets far apart.
    pools, stacks = {
        "near": ([1, 2, 3][: int(rng.integers(1, 4))], [0, 6, 7, 8, 40]),
        "many": (list(range(1, 41)), [0, 6, 200_000]),
        "far": ([1, 3, 1 << 21], [0, 9, 1 << 28]),
    }[shape]
    pool = rng.choice(pools, n)
    stack = rng.choice(stacks, n)
    ids = rng.integers(1, max(2, n // 2), n).astype(float)
    if shape == "far":
        ids[rng.integers(0, n, 3)] = 1e9  # a checkout returned long after
    cid = np.where(rng.random(n) < 0.05, np.nan, ids)

    def numbers(scale: float, null: float) -> np.ndarray:
        x = rng.lognormal(math.log(scale), 2, n)
        x[rng.random(n) < 0.1] = 0.0
        if shape == "far":
            x[rng.random(n) < 0.02] = 1e30  # buckets far apart: binned by sorting
        return np.where(rng.random(n) < null, np.nan, x)

    def counts(top: int, null: float) -> np.ndarray:
        return np.where(rng.random(n) < null, np.nan, rng.integers(0, top, n).astype(float))

    return Batch(
        at=at,
        pool=pool.astype(np.int64),
        kind=kinds.astype(np.int16),
        checkout_id=cid,
        in_use=counts(20, 0.05),
        overflow=counts(5, 0.2),
        waiters=counts(4, 0.3),
        stack=stack.astype(np.int64),
        wait_s=numbers(1e-4, 0.3),
        connect_s=numbers(1e-2, 0.5),
        hold_s=numbers(1e-2, 0.2),
        count=counts(3, 0.5),
    )


# -- the reference: one record at a time ---------------------------------------------


def _start(at: float) -> float:
    return float(math.floor(at / P) * P)


def _bucket(seconds: float) -> int:
    return int(hist.buckets_of(np.array([seconds]))[0])


def _clean(x: float) -> float:
    return 0.0 if math.isnan(x) else x


class Reference:
    """The rollups of the batches fed, record by record."""

    def __init__(self) -> None:
        self.rows: dict[tuple[float, int, int], dict[str, Any]] = {}
        self.pool_rows: dict[tuple[float, int], dict[str, Any]] = {}
        self.last: dict[int, tuple[float, float]] = {}

    def feed(self, b: Batch) -> None:
        n = len(b)
        kind = [KINDS[k] if k >= 0 else "other" for k in b.kind.tolist()]
        delta: dict[tuple[float, int, int], dict[str, Any]] = {}
        for i in range(n):
            if kind[i] not in SITE_KINDS:
                continue
            key = (_start(b.at[i]), int(b.pool[i]), int(b.stack[i]))
            row = delta.setdefault(key, defaultdict(int, hold=[], wait=[], hold_sum_s=0.0,
                                                    wait_sum_s=0.0, connect_sum_s=0.0))  # fmt: skip
            k = kind[i]
            if k == "checkout":
                row["checkouts"] += 1
                row["wait_sum_s"] += _clean(b.wait_s[i])
                row["wait"].append(b.wait_s[i])
            elif k in ("checkin", "gc_checkin"):
                row["returns"] += 1
                row["gc_returned"] += k == "gc_checkin"
                row["hold_sum_s"] += _clean(b.hold_s[i])
                row["hold"].append(b.hold_s[i])
            elif k == "timeout":
                row["timeouts"] += 1
            elif k == "leak_suspected":
                row["leaks"] += 1
            elif k == "connect":
                row["connects"] += 1
                row["connect_sum_s"] += _clean(b.connect_s[i])
        for key, row in delta.items():
            holds = [float(v) for v in row["hold"] if not math.isnan(v)]
            waits = [float(v) for v in row["wait"] if not math.isnan(v)]
            out = {name: row[name] for name in _rollups._SUMS}
            out["hold_max_s"] = max(holds) if holds else None
            out["wait_max_s"] = max(waits) if waits else None
            out["hold_hist"] = _hist(holds)
            out["wait_hist"] = _hist(waits)
            have = self.rows.get(key)
            if have is None:
                self.rows[key] = {**dict(zip(_rollups.ROLLUP_KEY, (P, key[0], 1, key[1], key[2]),
                                             strict=True)), **out}  # fmt: skip
            else:
                _rollups._merge_into(have, out, _rollups._SUMS, _rollups._MAXES, _rollups._HISTS)
        for pool in sorted(set(b.pool.tolist())):
            idx = sorted((i for i in range(n) if b.pool[i] == pool), key=lambda i: b.at[i])
            self._feed_pool(b, kind, pool, idx)

    def _feed_pool(self, b: Batch, kind: list[str], pool: int, idx: list[int]) -> None:
        at = [float(b.at[i]) for i in idx]
        in_use = [float(b.in_use[i]) for i in idx]
        times, values = at, in_use
        if pool in self.last:
            times, values = [self.last[pool][0], *at], [self.last[pool][1], *in_use]
        # The integral: the intervals within one period added in order, period by
        # period, then those that cross periods, split at each period's end.
        within: dict[float, float] = {}
        crossing = []
        for j in range(len(times) - 1):
            start, end = times[j], max(times[j + 1], times[j])
            value = _clean(values[j])
            if end < _start(start) + P:
                within[_start(start)] = within.get(_start(start), 0.0) + (end - start) * value
            else:
                crossing.append((start, end, value))
        integral = dict(sorted(within.items()))
        for t, end, value in crossing:
            while t < end:
                upto = min(end, _start(t) + P)
                integral[_start(t)] = integral.get(_start(t), 0.0) + (upto - t) * value
                t = upto
        self.last[pool] = (at[-1], _clean(in_use[-1]))
        periods: dict[float, dict[str, Any]] = {}
        for i in idx:
            row = periods.setdefault(
                _start(b.at[i]),
                {"events": 0, "invalidations": 0, "disconnects": 0, "peaks": defaultdict(list)},
            )
            row["events"] += 1
            if kind[i] == "invalidate":
                row["invalidations"] += 1
                row["disconnects"] += b.count[i] == 1
            waiters = float(b.waiters[i])
            for name, value in (
                ("peak_in_use", b.in_use[i]),
                ("peak_overflow", b.overflow[i]),
                ("peak_waiters", waiters),
                ("peak_demand", b.in_use[i] + _clean(waiters)),
            ):
                if not math.isnan(value):
                    row["peaks"][name].append(float(value))
        for start, row in periods.items():
            delta = {
                "events": row["events"],
                "in_use_s": integral.pop(start, 0.0),
                "invalidations": row["invalidations"],
                "disconnects": int(row["disconnects"]),
            }
            for name in _rollups._POOL_MAXES:
                delta[name] = int(max(row["peaks"][name])) if row["peaks"][name] else None
            self._add_pool(start, pool, delta)
        for start, value in integral.items():
            self._add_pool(start, pool, {"events": 0, "in_use_s": value, "invalidations": 0,
                                         "disconnects": 0})  # fmt: skip

    def _add_pool(self, start: float, pool: int, delta: dict[str, Any]) -> None:
        have = self.pool_rows.get((start, pool))
        if have is None:
            row = dict(zip(_rollups.POOL_ROLLUP_KEY, (P, start, 1, pool), strict=True))
            row.update(dict.fromkeys(_rollups._POOL_MAXES))
            row.update(delta)
            self.pool_rows[(start, pool)] = row
        else:
            _rollups._merge_into(have, delta, _rollups._POOL_SUMS, _rollups._POOL_MAXES, ())


def _hist(values: list[float]) -> Any:
    if not values:
        return None
    counts: dict[int, int] = defaultdict(int)
    for v in values:
        counts[_bucket(v)] += 1
    return dict(sorted(counts.items()))


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with its histograms as ``{bucket: count}`` (``None`` when empty)."""
    out = dict(row)
    for name in _rollups._HISTS:
        if out.get(name) is not None:
            indices, counts = hist.merge(out[name])
            out[name] = dict(zip(indices.tolist(), counts.tolist(), strict=True)) or None
    return out


def _reference_marks(
    b: Batch, leak_after: dict[int, float], open_: dict[tuple[int, int], float]
) -> list[tuple[int, int, str]]:
    out = []
    kind = [KINDS[k] if k >= 0 else "other" for k in b.kind.tolist()]
    n = len(b)
    has = [not math.isnan(c) for c in b.checkout_id.tolist()]
    cid = [int(c) if h else -1 for c, h in zip(b.checkout_id.tolist(), has, strict=True)]
    pool = b.pool.tolist()
    out += [(pool[i], cid[i], "leak") for i in range(n) if has[i] and kind[i] in LEAK_MARK_KINDS]
    ending = [has[i] and kind[i] in ENDING_KINDS for i in range(n)]
    if leak_after:
        out += [
            (pool[i], cid[i], "long_hold")
            for i in range(n)
            if ending[i] and b.hold_s[i] > leak_after.get(pool[i], math.inf)
        ]
    co = [has[i] and kind[i] == "checkout" for i in range(n)]
    for j in range(n):
        if kind[j] != "timeout":
            continue
        t, p = b.at[j], pool[j]
        held = {c for (q, c), at in open_.items() if q == p and at <= t}
        held |= {cid[i] for i in range(n) if co[i] and pool[i] == p and b.at[i] <= t}
        held -= {cid[i] for i in range(n) if ending[i] and pool[i] == p and b.at[i] <= t}
        out += [(p, c, "timeout_holder") for c in sorted(held)]
    returned = {(pool[i], cid[i]) for i in range(n) if ending[i]}
    checked_out = {(pool[i], cid[i]) for i in range(n) if co[i]}
    for i in range(n):
        if co[i] and (pool[i], cid[i]) not in returned:
            open_[(pool[i], cid[i])] = float(b.at[i])
    for key in [(pool[i], cid[i]) for i in range(n) if ending[i]]:
        if key not in checked_out:
            open_.pop(key, None)
    return out


@pytest.mark.parametrize("shape", ["near", "many", "far"])
@pytest.mark.parametrize("seed", range(25))
def test_rollups_and_marks_equal_a_record_by_record_reference(seed: int, shape: str) -> None:
    rng = np.random.default_rng(seed)
    rollups, reference = Rollups(1, P), Reference()
    notable, open_ = Notable(), {}  # type: ignore[var-annotated]
    leak_after = {1: 0.05, 2: 1.0, 7: 0.5, **({1 << 21: 0.01} if shape == "far" else {})}
    t = T0
    for step in range(int(rng.integers(1, 5))):
        b = _random_batch(rng, t, shape)
        t += float(rng.choice([0.5, 20.0, 200.0]))  # the next batch: same minute, or later
        rollups.feed(b)
        reference.feed(b)
        assert notable.marks(b, leak_after) == _reference_marks(b, leak_after, open_)
        assert notable.open == open_
        if step % 2 or rng.random() < 0.5:  # sometimes two batches merge before a flush
            rows, pool_rows = rollups.flush_rows()
            assert {k: _plain(r) for k, r in _keyed(rows, _rollups.ROLLUP_KEY).items()} == {
                k: _plain(r) for k, r in _keyed(list(reference.rows.values()),
                                                _rollups.ROLLUP_KEY).items()
            }  # fmt: skip
            assert _keyed(pool_rows, _rollups.POOL_ROLLUP_KEY) == _keyed(
                list(reference.pool_rows.values()), _rollups.POOL_ROLLUP_KEY
            )
            reference.rows, reference.pool_rows = {}, {}


def _keyed(rows: list[dict[str, Any]], key: tuple[str, ...]) -> dict[tuple[Any, ...], Any]:
    out = {tuple(r[k] for k in key): r for r in rows}
    assert len(out) == len(rows)
    return out


def test_merge_adds_in_the_same_order_as_a_sort_would() -> None:
    """The histogram merge bins small buckets by counting and far ones by sorting: the
    same sorted buckets and counts either way."""
    rng = np.random.default_rng(3)
    for _ in range(200):
        parts = []
        for _ in range(int(rng.integers(1, 4))):
            k = int(rng.integers(0, 30))
            top = int(rng.choice([50, 5000, 1 << 31]))
            parts.append((rng.integers(0, top, k), rng.integers(-1, 5, k)))
        indices = np.concatenate([p[0] for p in parts]).astype(np.int64)
        counts = np.concatenate([p[1] for p in parts]).astype(np.int64)
        expect: dict[int, int] = defaultdict(int)
        for i, c in zip(indices.tolist(), counts.tolist(), strict=True):
            if c > 0:
                expect[i] += c
        got = hist.merge(parts)
        assert dict(zip(got[0].tolist(), got[1].tolist(), strict=True)) == dict(expect)
        assert got[0].tolist() == sorted(expect)
        for a, b in zip(hist.decode(hist.encode(parts)), got, strict=True):
            np.testing.assert_array_equal(a, b)


def _random_records(rng: np.random.Generator, n: int) -> list[tuple[Any, ...]]:
    null = _writer.NULL
    out = []
    for i in range(n):
        kind = str(rng.choice([*KINDS, "something_else"]))
        values: list[Any] = []
        for field in RECORD_FIELDS:
            if field == "at":
                values.append(T0 + float(rng.uniform(0, 100)))
            elif field == "kind":
                values.append(kind)
            elif field in ("thread", "task"):
                values.append(str(rng.choice(["MainThread", "gc_checkin", "worker-1", ""])))
            elif rng.random() < 0.3:
                values.append(null if rng.random() < 0.5 else None)
            elif field in ("pool", "stack", "checkout_id", "connection_id"):
                values.append(int(rng.integers(0, 9)) + i % 3)
            else:
                values.append(float(rng.uniform(0, 5)))
        out.append(tuple(values))
    return out


def test_batch_from_the_c_queue_equals_the_batch_from_the_list() -> None:
    """``Batch.from_flat`` reads the C queue's values in C (``Events.numbers``) and the
    list queue's in Python: the same columns, NULL as NaN, ids mapped alike."""
    if _writer.sqlite_rows is None:
        if _native.disabled():
            pytest.skip("POOLSCOPE_NO_CEXT is set: the C helpers are off")
        pytest.skip("the C inserter is not built")
    rng = np.random.default_rng(11)
    records = _random_records(rng, 500)
    events = _writer.sqlite_rows.Events(RECORD_WIDTH)
    flat: list[Any] = []
    for r in records:
        events.extend(r)
        flat.extend(r)
    pool_ids, stack_ids = {1: 11, 2: 12, 5: 15}, {0: 100, 3: 103, 4: None}
    for ids in ((pool_ids, stack_ids), (None, None)):
        a, b = Batch.from_flat(events, *ids), Batch.from_flat(flat, *ids)
        for name in Batch.COLUMNS:
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype, name
            np.testing.assert_array_equal(x, y, err_msg=name)


def _records_of(b: Batch) -> list[tuple[Any, ...]]:
    """Batch ``b`` as the queue's records (kinds as text, NaN as NULL, other fields NULL)."""
    fields = dict(zip(_rollups.NUMBER_FIELDS, Batch.COLUMNS, strict=True))
    out = []
    for i in range(len(b)):
        values: list[Any] = [_writer.NULL] * RECORD_WIDTH
        for field, column in fields.items():
            x = getattr(b, column)[i].item()
            if column == "kind":
                x = KINDS[x] if x >= 0 else "something_else"
            elif isinstance(x, float) and math.isnan(x):
                x = None if i % 2 else _writer.NULL
            values[field] = x
        out.append(tuple(values))
    return out


def _queue_of(records: list[tuple[Any, ...]]) -> Any:
    """The C queue (an ``Events``) holding ``records``."""
    events = _writer.sqlite_rows.Events(RECORD_WIDTH)
    for record in records:
        events.extend(record)
    return events


def _random_queues(rng: np.random.Generator, shape: str, n: int) -> Iterator[tuple[Batch, Any]]:
    """``n`` random batches, one after the other in time, each with the C queue of it."""
    t = T0
    for _ in range(n):
        b = _random_batch(rng, t, shape)
        t += float(rng.choice([0.5, 20.0, 200.0]))
        yield b, _queue_of(_records_of(b))


@pytest.mark.parametrize("mapped", [False, True])
@pytest.mark.parametrize("shape", ["near", "many", "far"])
def test_rollups_from_the_c_queue_equal_the_rollups_from_numpy(shape: str, mapped: bool) -> None:
    """``Rollups.feed_events`` rolls the C queue's records up in C, in one pass: the very
    rows ``Rollups.feed`` makes of the same batches (sums to the bit, the in-use integral
    carried from batch to batch), or it declines (a pool's records out of order) and the
    batch goes to numpy as the writer's keeper sends it."""
    if _writer.sqlite_rows is None:
        pytest.skip("POOLSCOPE_NO_CEXT is set, or the C inserter is not built")
    in_c, accepted = Rollups(1, P), 0
    in_numpy = Rollups(1, P)
    rng = np.random.default_rng(21)
    ids: tuple[Any, Any] = (None, None)
    if mapped:  # local keys to store ids; unknown ones and NULL become 0
        ids = ({1: 11, 2: 12, 3: 13, 1 << 21: 5}, {0: 100, 6: 106, 7: None, 9: 109, 40: 140})
    for step, (_, events) in enumerate(_random_queues(rng, shape, 60)):
        if in_c.feed_events(events, *ids):
            accepted += 1
        else:
            in_c.feed(Batch.from_flat(events, *ids))
        in_numpy.feed(Batch.from_flat(events, *ids))
        if step % 3 == 2:
            (rows_c, pools_c), (rows_n, pools_n) = in_c.flush_rows(), in_numpy.flush_rows()
            assert {k: _plain(r) for k, r in _keyed(rows_c, _rollups.ROLLUP_KEY).items()} == {
                k: _plain(r) for k, r in _keyed(rows_n, _rollups.ROLLUP_KEY).items()
            }
            assert _keyed(pools_c, _rollups.POOL_ROLLUP_KEY) == _keyed(
                pools_n, _rollups.POOL_ROLLUP_KEY
            )
            assert in_c._last == in_numpy._last
    assert in_c.fed == in_numpy.fed
    assert 15 < accepted < 60  # about half the batches have records out of order


def test_the_c_rollups_leave_unusual_batches_to_numpy() -> None:
    """Records of a pool out of time order, an infinite value or text where a number goes:
    ``feed_events`` declines and feeds nothing."""
    if _writer.sqlite_rows is None:
        pytest.skip("POOLSCOPE_NO_CEXT is set, or the C inserter is not built")
    base = _records_of(_random_batch(np.random.default_rng(5), T0, "near"))
    at, in_use = _rollups.NUMBER_FIELDS[0], RECORD_FIELDS.index("in_use")
    late = list(base[0])
    late[at] = T0 - 5.0
    infinite = list(base[0])
    infinite[in_use] = math.inf
    text = list(base[0])
    text[in_use] = "three"
    for odd in (late, infinite, text):
        rollups = Rollups(1, P)
        assert not rollups.feed_events(_queue_of([*base, tuple(odd)]), None, None)
        assert rollups.fed == 0 and not rollups.pending() and not rollups._last


@pytest.mark.parametrize("shape", ["near", "many", "far"])
def test_notable_checkouts_from_the_c_survey_equal_those_of_the_whole_batch(shape: str) -> None:
    """The keeper reads the C queue's batch in C (``_retention._survey``) and hands
    ``Notable.marks`` only the records it finds anything in: the same marks and open
    checkouts as the whole batch gives, batch after batch, the same kind counts and span;
    a batch with a timeout is read whole."""
    if _writer.sqlite_rows is None:
        pytest.skip("POOLSCOPE_NO_CEXT is set, or the C inserter is not built")
    from instrument import _retention

    rng = np.random.default_rng(33)
    whole, reduced = Notable(), Notable()
    # A NaN threshold first: the lowest is found past it, as numpy finds it.
    leak_after = {99: math.nan, 1: 0.05, 2: 1.0, 7: 0.5, 12: 0.2}
    ids = ({1: 1, 2: 2, 3: 12, 1 << 21: 7}, None)
    picked, total, timeouts = 0, 0, 0
    for _, events in _random_queues(rng, shape, 80):
        full = Batch.from_flat(events, *ids)
        survey = _retention._survey(events, *ids, leak_after)
        assert survey is not None
        counts, first, last, notable = survey
        assert counts == full.kind_counts().tolist()
        assert (first, last) == (float(full.at.min()), float(full.at.max()))
        if full.has("timeout"):
            timeouts += 1
            assert len(notable) == len(full)
        else:
            picked += len(notable)
            total += len(full)
        assert reduced.marks(notable, leak_after) == whole.marks(full, leak_after)
        assert reduced.open == whole.open
    assert timeouts and 0 < picked < total / 2  # both ways were taken


def _day_long_holds(sites: int, pool: Any = 1) -> list[tuple[Any, ...]]:
    """A return held about a day at each of ``sites`` call sites, in time order."""
    out = []
    for stack in range(sites):
        values: list[Any] = [_writer.NULL] * RECORD_WIDTH
        for field, value in (("at", T0 + stack * 1e-3), ("pool", pool), ("kind", "checkin"),
                             ("checkout_id", stack), ("in_use", 1), ("stack", stack),
                             ("hold_s", 86_400.0 + stack)):  # fmt: skip
            values[RECORD_FIELDS.index(field)] = value
        out.append(tuple(values))
    return out


def test_the_c_rollups_keep_their_histograms_within_a_budget() -> None:
    """Thousands of call sites each with a day-long hold would take the C pass's
    histograms past 16 MB: that batch goes to numpy; a hundred of them stay in C, and
    give numpy's rows. A pool key past int64 is no key, as numpy reads it."""
    if _writer.sqlite_rows is None:
        pytest.skip("POOLSCOPE_NO_CEXT is set, or the C inserter is not built")
    assert not Rollups(1, P).feed_events(_queue_of(_day_long_holds(3000)), None, None)
    for pool in (1, 1e30):
        events = _queue_of(_day_long_holds(100, pool))
        in_c, in_numpy = Rollups(1, P), Rollups(1, P)
        assert in_c.feed_events(events, {1: 7}, None)
        with np.errstate(invalid="ignore"):  # numpy's cast of 1e30 says so
            in_numpy.feed(Batch.from_flat(events, {1: 7}, None))
        (rows_c, pools_c), (rows_n, pools_n) = in_c.flush_rows(), in_numpy.flush_rows()
        assert [_plain(r) for r in rows_c] == [_plain(r) for r in rows_n]
        assert pools_c == pools_n
        assert {r["pool_id"] for r in pools_c} == {7 if pool == 1 else 0}
