"""Rollups: per period, process, pool and call site aggregates computed from written records.

Independent of the store: :class:`Rollups` is fed columns of events (a :class:`Batch`, made
from the writer's queue or from rows read back from a store) and hands back rows as plain
dicts, which a store merges into what it holds with :func:`merge_rollup` and
:func:`merge_pool_rollup` (every column is a count, sum, maximum or histogram, so rows made
from parts of a period merge into the row of the whole). The writer feeds each batch it
writes; ``poolscope compact`` feeds a store's events in chunks: the same code.

Attribution (as the ``rollups`` table documents): checkouts, waits and wait histograms by
checkout time; returns, holds and hold histograms by return time; every other count by the
event's own time. ``leaks`` counts ``leak_suspected`` events (a ``leak_cleared`` is the same
checkout returned after all, not another leak); ``gc_returned`` counts ``gc_checkin``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from itertools import repeat
from typing import Any

import numpy as np

from . import _histogram as hist
from ._record import (
    AT,
    CHECKOUT_ID,
    CONNECT_S,
    COUNT,
    HOLD_S,
    IN_USE,
    KIND,
    OVERFLOW,
    POOL,
    RECORD_WIDTH,
    STACK,
    WAIT_S,
    WAITERS,
)

MINUTE = 60
HOUR = 3600

ROLLUP_COLUMNS = (
    "period_s", "start_at", "process_id", "pool_id", "stack_id", "checkouts", "returns",
    "gc_returned", "timeouts", "leaks", "hold_sum_s", "hold_max_s", "hold_hist", "wait_sum_s",
    "wait_max_s", "wait_hist", "connect_sum_s", "connects",
)  # fmt: skip
"""The ``rollups`` table's columns, in order."""

ROLLUP_KEY = ROLLUP_COLUMNS[:5]

POOL_ROLLUP_COLUMNS = (
    "period_s", "start_at", "process_id", "pool_id", "events", "peak_in_use", "peak_overflow",
    "peak_waiters", "peak_demand", "in_use_s", "invalidations", "disconnects",
)  # fmt: skip
"""The ``pool_rollups`` table's columns, in order."""

POOL_ROLLUP_KEY = POOL_ROLLUP_COLUMNS[:4]

_SUMS = ("checkouts", "returns", "gc_returned", "timeouts", "leaks", "hold_sum_s",
         "wait_sum_s", "connect_sum_s", "connects")  # fmt: skip
_MAXES = ("hold_max_s", "wait_max_s")
_HISTS = ("hold_hist", "wait_hist")
_POOL_SUMS = ("events", "in_use_s", "invalidations", "disconnects")
_POOL_MAXES = ("peak_in_use", "peak_overflow", "peak_waiters", "peak_demand")

_C_SITE_FIELDS = ("checkouts", "returns", "gc_returned", "timeouts", "leaks", "hold_sum_s",
                  "hold_max_s", "wait_sum_s", "wait_max_s", "connect_sum_s", "connects",
                  "hold_hist", "wait_hist")  # fmt: skip
"""A site row's values as ``Events.rollup()`` gives them, after the key."""

_C_POOL_FIELDS = ("events", "in_use_s", "invalidations", "disconnects", *_POOL_MAXES)
"""A pool row's values as ``Events.rollup()`` gives them, after the key."""

_SITE_KINDS = ("checkout", "checkin", "gc_checkin", "timeout", "leak_suspected", "connect")
"""The kinds counted per call site (every kind counts per pool)."""

_C_KINDS = (*_SITE_KINDS, "invalidate")
"""The kinds ``Events.rollup()`` tells apart, in the order of its codes (any other is
neither a call site's nor an invalidation)."""

RETURN_KINDS = ("checkin", "gc_checkin")
"""The kinds the rollups count as returns (``detach`` and ``unwatched`` end a watch but are
not returns to the pool)."""


KINDS = (
    "checkout", "checkin", "gc_checkin", "detach", "unwatched", "timeout", "leak_suspected",
    "leak_cleared", "connect", "close", "close_detached", "invalidate", "dropped",
)  # fmt: skip
"""The event kinds a :class:`Batch` tells apart (by index; any other kind is ``-1``)."""

KIND_CODE = {kind: code for code, kind in enumerate(KINDS)}

_NULLS = {None: math.nan, "": math.nan}


def kind_codes(*names: str) -> list[int]:
    """The codes of the kinds ``names`` in :attr:`Batch.kind`."""
    return [KIND_CODE[name] for name in names]


class Batch:
    """Columns of events of one process as numpy arrays: numbers as float64 (NULL as NaN),
    ``kind`` as int16 codes (:data:`KINDS`), ``pool`` and ``stack`` as the store's ids
    (int64; a NULL stack is 0)."""

    COLUMNS = ("at", "pool", "kind", "checkout_id", "in_use", "overflow", "waiters", "stack",
               "wait_s", "connect_s", "hold_s", "count")  # fmt: skip
    """The columns, each an attribute."""

    __slots__ = (*COLUMNS, "_kinds")

    def __init__(self, **columns: np.ndarray) -> None:
        for name in self.COLUMNS:
            setattr(self, name, columns[name])
        self._kinds: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.at.size)

    def kind_counts(self) -> np.ndarray:
        """How many records are of each kind (by code; the last: any other kind)."""
        if self._kinds is None:
            counts = [np.count_nonzero(self.kind == code) for code in range(len(KINDS))]
            self._kinds = np.array([*counts, len(self) - sum(counts)], dtype=np.int64)
        return self._kinds

    def has(self, *kinds: str) -> bool:
        """Whether any record is of one of ``kinds``."""
        counts = self.kind_counts()
        return any(counts[code] for code in kind_codes(*kinds))

    def of(self, *kinds: str) -> np.ndarray:
        """Where the records are of one of ``kinds``."""
        counts = self.kind_counts()
        out = None
        for code in kind_codes(*kinds):  # a comparison per kind the batch has
            if counts[code]:
                out = self.kind == code if out is None else out | (self.kind == code)
        return np.zeros(len(self), dtype=bool) if out is None else out

    def take(self, mask: np.ndarray) -> Batch:
        """The records where ``mask`` is true."""
        return Batch(**{name: getattr(self, name)[mask] for name in self.COLUMNS})

    @classmethod
    def from_numbers(
        cls,
        values: np.ndarray,
        pool_ids: dict[int, int] | None,
        stack_ids: dict[int, int] | None,
    ) -> Batch:
        """Columns of the writer's queue as ``values``: float64, the fields
        :data:`NUMBER_FIELDS` one after the other, NULL as NaN, the kind as its index in
        :data:`KINDS` (what ``Events.numbers(KINDS, NUMBER_FIELDS)`` returns). Pool keys and
        stack ids are mapped to the store's by ``pool_ids`` and ``stack_ids`` (unknown ones:
        0; ``None``: they are the store's already)."""
        c = dict(zip(NUMBER_FIELDS, values.reshape(len(NUMBER_FIELDS), -1), strict=True))
        return cls(
            at=c[AT],
            pool=_mapped(c[POOL], pool_ids),
            kind=_ints(c[KIND]).astype(np.int16),
            checkout_id=c[CHECKOUT_ID],
            in_use=c[IN_USE],
            overflow=c[OVERFLOW],
            waiters=c[WAITERS],
            stack=_mapped(c[STACK], stack_ids),
            wait_s=c[WAIT_S],
            connect_s=c[CONNECT_S],
            hold_s=c[HOLD_S],
            count=c[COUNT],
        )

    @classmethod
    def from_flat(
        cls,
        flat: Any,
        pool_ids: dict[int, int] | None,
        stack_ids: dict[int, int] | None,
    ) -> Batch:
        """:meth:`from_numbers` of the writer's queue ``flat``: the C inserter's ``Events``
        (read in C), or a flat list (NULL as ``""`` or ``None``; read column by column)."""
        numbers = getattr(flat, "numbers", None)
        if numbers is not None:
            values = np.frombuffer(numbers(KINDS, NUMBER_FIELDS), dtype=np.float64)
            return cls.from_numbers(values, pool_ids, stack_ids)
        w = RECORD_WIDTH
        n = len(flat) // w
        m = np.zeros((len(NUMBER_FIELDS), n), dtype=np.float64)
        for row, field in enumerate(NUMBER_FIELDS):
            col = flat[field::w]
            if field == KIND:
                m[row] = np.fromiter(map(KIND_CODE.get, col, repeat(-1)), np.float64, n)
            elif field in (AT, POOL, IN_USE, OVERFLOW, WAITERS, STACK):  # NULL only rarely
                m[row] = _floats(col)
            else:  # NULL often
                m[row] = np.fromiter(map(_NULLS.get, col, col), np.float64, n)
        return cls.from_numbers(m, pool_ids, stack_ids)

    @classmethod
    def from_rows(cls, rows: Sequence[Sequence[Any]]) -> Batch:
        """Columns of events rows read back as ``SELECT`` :data:`BATCH_SELECT` (the store's
        ids already)."""
        cols = list(zip(*rows, strict=True)) if rows else [()] * 12
        n = len(rows)
        return cls(
            at=_floats(cols[0]),
            pool=np.nan_to_num(_floats(cols[1])).astype(np.int64),
            kind=np.fromiter(map(KIND_CODE.get, cols[2], repeat(-1)), np.int16, n),
            checkout_id=_floats(cols[3]),
            in_use=_floats(cols[4]),
            overflow=_floats(cols[5]),
            waiters=_floats(cols[6]),
            stack=np.nan_to_num(_floats(cols[7])).astype(np.int64),
            wait_s=_floats(cols[8]),
            connect_s=_floats(cols[9]),
            hold_s=_floats(cols[10]),
            count=_floats(cols[11]),
        )


NUMBER_FIELDS = (AT, POOL, KIND, CHECKOUT_ID, IN_USE, OVERFLOW, WAITERS, STACK, WAIT_S,
                 CONNECT_S, HOLD_S, COUNT)  # fmt: skip
"""The fields of the writer's records a :class:`Batch` reads, in its order."""

BATCH_SELECT = (
    "at, pool_id, kind, checkout_id, in_use, overflow, waiters, stack_id, wait_s, connect_s, "
    "hold_s, count"
)
"""The events columns :meth:`Batch.from_rows` reads, in order."""


def _floats(values: Sequence[Any]) -> np.ndarray:
    """``values`` as float64, NULL (``None`` or ``""``) as NaN."""
    try:
        return np.fromiter(values, np.float64, len(values))
    except (ValueError, TypeError):
        return np.fromiter(map(_NULLS.get, values, values), np.float64, len(values))


def _mapped(values: np.ndarray, ids: dict[int, int] | None) -> np.ndarray:
    """``values`` (local keys as float64, NULL as NaN) mapped through ``ids`` (else 0);
    ``ids`` ``None``: the values as they are."""
    local = _ints(values)
    if ids is None:
        return np.maximum(local, 0)
    if not local.size:
        return local
    top = max(ids, default=0)
    if 0 <= top < (1 << 22):  # local ids are small counters: a lookup table, no sort
        table = np.zeros(top + 2, dtype=np.int64)  # the last: any other key (-1, or past top)
        table[list(ids)] = [v or 0 for v in ids.values()]
        if local.min() >= 0 and local.max() <= top:
            return table.take(local)
        return table.take(np.clip(local, -1, top + 1))  # -1 reads the last: any other key
    uniq, inverse = np.unique(local, return_inverse=True)
    mapped = np.array([ids.get(u) or 0 for u in uniq.tolist()], dtype=np.int64)
    return mapped[inverse.reshape(-1)]


class Rollups:
    """Aggregates of one process's records, by period (minute), pool and stack.

    :meth:`feed` adds a batch; :meth:`flush_rows` hands back what was fed since the last
    flush as rows to merge into the store's (deltas: a store adds them to the rows it holds
    with :func:`merge_rollup`/:func:`merge_pool_rollup`). The integral of ``in_use`` carries
    each pool's last count from batch to batch.
    """

    def __init__(self, process_id: int, period_s: int = MINUTE) -> None:
        self.process_id = process_id
        self.period_s = period_s
        self._rows: dict[tuple[float, int, int], dict[str, Any]] = {}
        self._pool_rows: dict[tuple[float, int], dict[str, Any]] = {}
        # Per pool: the time and in_use count of its last event fed (the integral's carry).
        self._last: dict[int, tuple[float, float]] = {}
        self.fed = 0

    # -- feeding ---------------------------------------------------------------------

    def feed(self, batch: Batch) -> None:
        """Add ``batch``'s records (any order; ``dropped`` and other bookkeeping kinds count
        as events of their pool only)."""
        n = len(batch)
        if not n:
            return
        self.fed += n
        p = self.period_s
        start = np.floor(batch.at / p) * p
        counts = batch.kind_counts()
        sites = sum(int(counts[KIND_CODE[k]]) for k in _SITE_KINDS)
        if sites == n:  # the common batch: no copy
            self._feed_sites(batch, start)
        elif sites:
            per_site = batch.of(*_SITE_KINDS)
            self._feed_sites(batch.take(per_site), start[per_site])
        self._feed_pools(batch, start)

    def feed_events(
        self, events: Any, pool_ids: dict[int, int] | None, stack_ids: dict[int, int] | None
    ) -> bool:
        """:meth:`feed` the writer's queue ``events`` (the C helper's ``Events``) as it is,
        in C: one pass over its cells, no numpy, with the GIL held throughout. Numpy gives
        the GIL up around each operation on a batch's columns, a few hundred of them a
        batch, and each time the writer takes it back the application's thread pays (it
        wakes the writer at its own releases, then waits for it). False, having fed
        nothing, where the helper is not there or leaves the batch to numpy (records of a
        pool out of time order, an infinite value, thousands of groups): then :meth:`feed`
        it. ``pool_ids``/``stack_ids`` as :meth:`Batch.from_numbers` takes them."""
        rollup = getattr(events, "rollup", None)
        if rollup is None:
            return False
        out = rollup(
            NUMBER_FIELDS, pool_ids, stack_ids, float(self.period_s), self._last, hist.BASE,
            hist.LOG_G, _C_KINDS,
        )  # fmt: skip
        if out is None:
            return False
        sites, pools, carry, n = out
        self.fed += n
        rows = self._rows
        for start, pool, stack, *values in sites:
            key = (start, pool, stack)
            delta = dict(zip(_C_SITE_FIELDS, values, strict=True))
            have = rows.get(key)
            if have is None:
                rows[key] = self._new_row(key, delta)
            else:
                _merge_into(have, delta, _SUMS, _MAXES, _HISTS)
        for start, pool, *values in pools:
            self._add_pool(start, pool, dict(zip(_C_POOL_FIELDS, values, strict=True)))
        for pool, at, in_use in carry:
            self._last[pool] = (at, in_use)
        return True

    def _feed_sites(self, b: Batch, start: np.ndarray) -> None:
        group, starts, pools, stacks = self._site_groups(b, start)
        g = len(starts)
        kind = b.kind
        # Every kind's count per group in one pass (the records here are all of a site kind).
        nk = len(KINDS)
        tallies = np.bincount(group * nk + kind, minlength=g * nk).reshape(g, nk)
        checkin, gc = KIND_CODE["checkin"], KIND_CODE["gc_checkin"]
        zeros, none = np.zeros(g), np.full(g, np.nan)

        def total(where: np.ndarray, values: np.ndarray) -> np.ndarray:
            # bincount adds in record order, group by group: the sums are exact to the bit.
            return np.bincount(where, weights=_finite(values), minlength=g)

        def peak(where: np.ndarray, values: np.ndarray) -> np.ndarray:
            out = none.copy()
            np.fmax.at(out, where, values)  # fmax passes NaN over
            return out

        columns = {
            "checkouts": tallies[:, KIND_CODE["checkout"]],
            "returns": tallies[:, checkin] + tallies[:, gc],
            "gc_returned": tallies[:, gc],
            "timeouts": tallies[:, KIND_CODE["timeout"]],
            "leaks": tallies[:, KIND_CODE["leak_suspected"]],
            "hold_sum_s": zeros,
            "hold_max_s": none,
            "wait_sum_s": zeros,
            "wait_max_s": none,
            "connect_sum_s": zeros,
            "connects": tallies[:, KIND_CODE["connect"]],
        }
        holds = waits = {}
        if b.has("checkin", "gc_checkin"):
            ret = np.flatnonzero(b.of("checkin", "gc_checkin"))
            where, values = group.take(ret), b.hold_s.take(ret)
            columns["hold_sum_s"] = total(where, values)
            columns["hold_max_s"] = peak(where, values)
            holds = _group_hists(where, values, g)
        if b.has("checkout"):
            co = np.flatnonzero(kind == KIND_CODE["checkout"])
            where, values = group.take(co), b.wait_s.take(co)
            columns["wait_sum_s"] = total(where, values)
            columns["wait_max_s"] = peak(where, values)
            waits = _group_hists(where, values, g)
        if b.has("connect"):
            connect = kind == KIND_CODE["connect"]
            columns["connect_sum_s"] = total(group[connect], b.connect_s[connect])
        values = {name: col.tolist() for name, col in columns.items()}
        rows = self._rows
        for i in range(g):
            key = (starts[i], pools[i], stacks[i])
            delta = {name: col[i] for name, col in values.items()}
            for name in _MAXES:
                if delta[name] != delta[name]:  # NaN: no value in this batch
                    delta[name] = None
            delta["hold_hist"] = holds.get(i)
            delta["wait_hist"] = waits.get(i)
            have = rows.get(key)
            if have is None:
                rows[key] = self._new_row(key, delta)
            else:
                _merge_into(have, delta, _SUMS, _MAXES, _HISTS)

    def _site_groups(
        self, b: Batch, start: np.ndarray
    ) -> tuple[np.ndarray, list[float], list[int], list[int]]:
        """Each record's group, numbered as ``np.unique`` numbers the sorted ``(period,
        pool, stack)`` keys, and the groups' period starts, pool ids and stack ids."""
        # The period number within the batch, pool id and stack id; where their ranges are
        # small (the common batch: a few pools and call sites), the groups are found by
        # counting one key per record; else by sorting it (bit fields packed into an int64,
        # or, for ids past the fields, the triples).
        first = float(start.min())
        p = self.period_s
        period = ((start - first) / p).astype(np.int64)
        pool, stack = b.pool.astype(np.int64, copy=False), b.stack.astype(np.int64, copy=False)
        top = int(period.max())
        plo, phi = int(pool.min()), int(pool.max())
        slo, shi = int(stack.min()), int(stack.max())
        if top < (1 << 16) and plo >= 0 and phi < (1 << 20) and slo >= 0 and shi < (1 << 27):
            npool, nstack = phi - plo + 1, shi - slo + 1
            span = (top + 1) * npool * nstack
            if span <= _COUNTING_SPAN + 4 * period.size:
                key = (period * npool + (pool - plo)) * nstack + (stack - slo)
                present = np.bincount(key, minlength=span) > 0
                keys = np.flatnonzero(present)
                group = (np.cumsum(present) - 1)[key]
                starts = first + (keys // (npool * nstack)) * p
                pools = (keys // nstack) % npool + plo
                stacks = keys % nstack + slo
                return group, starts.tolist(), pools.tolist(), stacks.tolist()
            packed = (period << 47) | (pool << 27) | stack
            keys, group = np.unique(packed, return_inverse=True)
            starts = first + (keys >> 47) * p
            pools = (keys >> 27) & ((1 << 20) - 1)
            stacks = keys & ((1 << 27) - 1)
            return group.reshape(-1), starts.tolist(), pools.tolist(), stacks.tolist()
        triples = np.stack([start, pool.astype(np.float64), stack.astype(np.float64)], axis=1)
        uniq, group = np.unique(triples, axis=0, return_inverse=True)
        return (
            group.reshape(-1),
            uniq[:, 0].tolist(),
            [int(v) for v in uniq[:, 1].tolist()],
            [int(v) for v in uniq[:, 2].tolist()],
        )

    def _new_row(self, key: tuple[float, int, int], delta: dict[str, Any]) -> dict[str, Any]:
        row = {
            "period_s": self.period_s,
            "start_at": key[0],
            "process_id": self.process_id,
            "pool_id": key[1],
            "stack_id": key[2],
        }
        row.update(delta)
        return row

    def _feed_pools(self, b: Batch, start: np.ndarray) -> None:
        p = self.period_s
        invalidations_in_batch = b.has("invalidate")
        for pool, rows in _by_pool(b.pool):

            def pick(x: np.ndarray, rows: np.ndarray | None = rows) -> np.ndarray:
                return x if rows is None else x.take(rows)

            at, in_use, st = pick(b.at), pick(b.in_use), pick(start)
            overflow, waiters = pick(b.overflow), pick(b.waiters)
            kind, count = (pick(b.kind), pick(b.count)) if invalidations_in_batch else (None, None)
            if not _ascending(at):  # the queue's order is the clock's, but for a few
                order = np.argsort(at, kind="stable")
                at, in_use, st = at[order], in_use[order], st[order]
                overflow, waiters = overflow[order], waiters[order]
                if kind is not None and count is not None:
                    kind, count = kind[order], count[order]
            # The integral of in_use: each count holds from its event to the next one.
            last = self._last.get(pool)
            if last is not None:
                t0, v = np.empty(at.size + 1), np.empty(at.size + 1)
                t0[0], t0[1:] = last[0], at
                v[0], v[1:] = last[1], in_use
            else:
                t0, v = at, in_use
            integral: dict[float, float] = {}
            if t0.size > 1:
                starts, ends, vals = t0[:-1], np.maximum(t0[1:], t0[:-1]), _finite(v[:-1])
                s0 = np.floor(starts / p) * p
                same = ends < s0 + p
                if same.any():
                    if same.all():  # no interval across periods: no copies
                        us, inv, runs = _unique_inverse(s0)
                        weights = (ends - starts) * vals
                        if runs is not None and runs.size == 1:  # one period: a running sum
                            sums = np.cumsum(weights)[-1:] + 0.0  # bincount's sum, from +0.0
                        else:
                            sums = np.bincount(inv, weights=weights)
                    else:
                        us, inv, _ = _unique_inverse(s0[same])
                        sums = np.bincount(inv, weights=(ends - starts)[same] * vals[same])
                    for u, s in zip(us.tolist(), sums.tolist(), strict=True):
                        integral[u] = integral.get(u, 0.0) + s
                for i in np.nonzero(~same)[0].tolist():  # rare: an interval across periods
                    t, end, val = float(starts[i]), float(ends[i]), float(vals[i])
                    while t < end:
                        period = np.floor(t / p) * p
                        upto = min(end, period + p)
                        integral[period] = integral.get(period, 0.0) + (upto - t) * val
                        t = upto
            final = float(in_use[-1])
            if not math.isfinite(final):
                final = float(np.nan_to_num(final))
            self._last[pool] = (float(at[-1]), final)
            us, inv, bounds = _unique_inverse(st)
            k = len(us)
            if bounds is not None:  # runs: their lengths
                events = np.diff(bounds, append=st.size).tolist()
            else:
                events = np.bincount(inv, minlength=k).tolist()
            invalidations = disconnects = [0] * k
            if kind is not None and count is not None:
                is_inv = kind == KIND_CODE["invalidate"]
                invalidations = np.bincount(inv[is_inv], minlength=k).tolist()
                disconnects = np.bincount(inv[is_inv & (count == 1)], minlength=k).tolist()
            peaks = {}
            for name, values in (
                ("peak_in_use", in_use),
                ("peak_overflow", overflow),
                ("peak_waiters", waiters),
                ("peak_demand", in_use + _finite(waiters)),
            ):
                if bounds is not None:  # each period's records in one run: reduce the runs
                    out = np.fmax.reduceat(values, bounds)
                else:
                    out = np.full(k, np.nan)
                    ok = ~np.isnan(values)
                    np.fmax.at(out, inv[ok], values[ok])
                peaks[name] = [None if x != x else int(x) for x in out.tolist()]
            for i, s in enumerate(us.tolist()):
                delta: dict[str, Any] = {
                    "events": events[i],
                    "in_use_s": integral.pop(s, 0.0),
                    "invalidations": invalidations[i],
                    "disconnects": disconnects[i],
                }
                for name, col in peaks.items():
                    delta[name] = col[i]
                self._add_pool(s, pool, delta)
            for s, value in integral.items():  # periods crossed without events of their own
                self._add_pool(s, pool, {"events": 0, "in_use_s": value, "invalidations": 0,
                                         "disconnects": 0})  # fmt: skip

    def _add_pool(self, start: float, pool: int, delta: dict[str, Any]) -> None:
        key = (float(start), int(pool))
        have = self._pool_rows.get(key)
        if have is None:
            row = {"period_s": self.period_s, "start_at": key[0], "process_id": self.process_id,
                   "pool_id": key[1], **{n: None for n in _POOL_MAXES}}  # fmt: skip
            row.update(delta)
            self._pool_rows[key] = row
        else:
            _merge_into(have, delta, _POOL_SUMS, _POOL_MAXES, ())

    # -- handing rows over -------------------------------------------------------------

    def flush_rows(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every row fed since the last flush, as deltas: ``(rollups rows, pool_rollups rows)``
        (hists as ``(indices, counts)``). Forgets them."""
        rows, pool_rows = list(self._rows.values()), list(self._pool_rows.values())
        self._rows, self._pool_rows = {}, {}
        return rows, pool_rows

    def rows_due(self, now: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The rows of periods ended before ``now`` (deltas, forgotten here); rows of the
        period still going on stay to be fed more."""
        cut = np.floor(now / self.period_s) * self.period_s
        rows = [r for k, r in self._rows.items() if k[0] < cut]
        pool_rows = [r for k, r in self._pool_rows.items() if k[0] < cut]
        self._rows = {k: r for k, r in self._rows.items() if k[0] >= cut}
        self._pool_rows = {k: r for k, r in self._pool_rows.items() if k[0] >= cut}
        return rows, pool_rows

    def pending(self) -> bool:
        """Whether rows were fed since the last flush."""
        return bool(self._rows or self._pool_rows)


def _group_hists(group: np.ndarray, values: np.ndarray, g: int) -> dict[int, tuple[Any, Any]]:
    """Per group index, the histogram of its ``values`` (NaN left out)."""
    ok = ~np.isnan(values)
    if not ok.all():
        group, values = group[ok], values[ok]
    if not values.size:
        return {}
    buckets = hist.buckets_of(values)
    lo, hi = int(buckets.min()), int(buckets.max())
    width = hi - lo + 1
    if lo >= 0 and hi < 65536 and g * width <= _COUNTING_SPAN + 4 * values.size:
        # Few groups and buckets: count every (group, bucket) cell, no sort.
        cells = np.bincount(group * width + (buckets - lo), minlength=g * width)
        keys = np.flatnonzero(cells)
        counts = cells[keys]
        groups, buckets = keys // width, keys % width + lo
    else:
        pairs = group.astype(np.int64) * 65536 + buckets
        keys, counts = np.unique(pairs, return_counts=True)
        groups, buckets = keys // 65536, keys % 65536
    bounds = np.searchsorted(groups, np.arange(g + 1))
    out = {}
    for i in np.flatnonzero(bounds[1:] > bounds[:-1]).tolist():
        lo, hi = bounds[i], bounds[i + 1]
        out[i] = hist.Merged((buckets[lo:hi], counts[lo:hi].astype(np.int64)))
    return out


_COUNTING_SPAN = 1 << 16
"""Keys in a range up to this (plus 4 per record) are grouped by counting (``np.bincount``
over the range, linear); wider ranges by sorting."""


def _ints(x: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(x, nan=-1).astype(np.int64)``: ids and codes, NULL (NaN) as -1."""
    return x.astype(np.int64) if np.isfinite(x).all() else np.nan_to_num(x, nan=-1).astype(np.int64)


def _finite(x: np.ndarray) -> np.ndarray:
    """``np.nan_to_num(x)``: ``x`` itself where every value is finite already."""
    return x if np.isfinite(x).all() else np.nan_to_num(x)


def _ascending(x: np.ndarray) -> bool:
    """Whether ``x`` is in ascending order (``False`` where it holds a NaN)."""
    return x.size < 2 or bool((x[1:] >= x[:-1]).all())


def _unique_inverse(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """``np.unique(x, return_inverse=True)`` (the inverse flat), and, where ``x`` is in
    ascending order already (then no sort is needed), the index of each value's first
    occurrence (else ``None``). ``x`` is not empty."""
    if x[0] == x[-1] and (x == x[0]).all():  # the common batch: all in one period
        return x[:1], np.zeros(x.size, dtype=np.intp), np.zeros(1, dtype=np.intp)
    if _ascending(x):
        new = np.empty(x.size, dtype=bool)
        new[0] = True
        np.not_equal(x[1:], x[:-1], out=new[1:])
        first = np.flatnonzero(new)
        return x[first], np.cumsum(new) - 1, first
    uniq, inverse = np.unique(x, return_inverse=True)
    return uniq, inverse.reshape(-1), None


def _by_pool(pool: np.ndarray) -> Iterator[tuple[int, Any]]:
    """Each pool id of ``pool`` (int64, not empty), in ascending order, with the indices of
    its records in their order (``None`` where every record is of one pool)."""
    lo, hi = int(pool.min()), int(pool.max())
    if lo == hi:
        yield lo, None
        return
    if lo >= 0 and hi - lo <= _COUNTING_SPAN + 4 * pool.size:
        ids = np.flatnonzero(np.bincount(pool - lo)) + lo
    else:
        ids = np.unique(pool)
    if len(ids) <= 16:  # a comparison per pool: cheaper than a sort for a few
        for value in ids.tolist():
            yield value, np.flatnonzero(pool == value)
        return
    order = np.argsort(pool, kind="stable")
    edges = np.searchsorted(pool[order], ids).tolist() + [pool.size]
    for i, value in enumerate(ids.tolist()):
        yield value, order[edges[i] : edges[i + 1]]


def _merge_into(
    row: dict[str, Any],
    delta: dict[str, Any],
    sums: Iterable[str],
    maxes: Iterable[str],
    hists: Iterable[str],
) -> None:
    for name in sums:
        row[name] = (row.get(name) or 0) + (delta.get(name) or 0)
    for name in maxes:
        a, b = row.get(name), delta.get(name)
        row[name] = b if a is None else a if b is None else max(a, b)
    for name in hists:
        a, b = row.get(name), delta.get(name)
        row[name] = b if a is None else a if b is None else hist.merge(a, b)


def merge_rollup(stored: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """``stored`` (a ``rollups`` row, or ``None``) with ``delta`` added; a new dict."""
    if stored is None:
        return dict(delta)
    row = dict(stored)
    _merge_into(row, delta, _SUMS, _MAXES, _HISTS)
    return row


def merge_pool_rollup(stored: dict[str, Any] | None, delta: dict[str, Any]) -> dict[str, Any]:
    """``stored`` (a ``pool_rollups`` row, or ``None``) with ``delta`` added; a new dict."""
    if stored is None:
        return dict(delta)
    row = dict(stored)
    _merge_into(row, delta, _POOL_SUMS, _POOL_MAXES, ())
    return row


def coarsen(row: dict[str, Any], period_s: int = HOUR) -> dict[str, Any]:
    """``row`` (either table's) as a delta of the ``period_s`` row that holds its period."""
    out = dict(row)
    out["period_s"] = period_s
    out["start_at"] = float(np.floor(row["start_at"] / period_s) * period_s)
    return out


def rollup_params(row: dict[str, Any]) -> tuple[Any, ...]:
    """A ``rollups`` row as the values of its columns, in order (hists encoded)."""
    return tuple(hist.encode(row.get(c)) if c in _HISTS else row.get(c) for c in ROLLUP_COLUMNS)


def pool_rollup_params(row: dict[str, Any]) -> tuple[Any, ...]:
    """A ``pool_rollups`` row as the values of its columns, in order."""
    return tuple(row.get(c) for c in POOL_ROLLUP_COLUMNS)


def rollup_from_values(values: Sequence[Any]) -> dict[str, Any]:
    """A ``rollups`` row read back (``SELECT`` of :data:`ROLLUP_COLUMNS`) as a dict."""
    return dict(zip(ROLLUP_COLUMNS, values, strict=True))


def pool_rollup_from_values(values: Sequence[Any]) -> dict[str, Any]:
    """A ``pool_rollups`` row read back (``SELECT`` of :data:`POOL_ROLLUP_COLUMNS`) as a dict."""
    return dict(zip(POOL_ROLLUP_COLUMNS, values, strict=True))
