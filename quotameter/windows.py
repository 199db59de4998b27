"""Per-customer usage windows (minute, hour, day, billing period), kept exact
under at-least-once delivery. Pure: no I/O, no clock.

One ``WindowRecord`` per customer and granularity is what a pipeline table
holds. Beside the buckets it carries what makes replays harmless:

    wm    {partition: highest position applied}: the Kafka offset and the
          event's index in its record (quotameter.event_batch.position). A
          customer lives in one partition (events are partitioned by
          customer id), so an event at or below it was applied already: a redelivery after a crash or a
          rebalance is skipped. It is stored in the same table value as the
          totals, so the two are always written together.
    t     the newest event time seen (ms): stream time. Buckets are chosen
          by event time, pruned relative to ``t`` (never the wall clock),
          and an event older than ``t - late_grace`` is late.
    seed  the customer's newest event time in the ledger when this record
          was created (-1: none). A bucket that starts at or before it may
          hold ledger rows this record never saw (the broker, and with it
          the table's changelog, was lost): it is seeded from the ledger.
    pb    buckets ending at or before this were pruned; one that comes back
          (a late event) is seeded from the ledger too.

Each bucket holds totals for all models ("*") and per model: the
(customer, model) windows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Any

from quotameter.aggregate import PricedEvent, Totals
from quotameter.event_batch import position
from quotameter.periods import BillingCalendar

ALL_MODELS = "*"


class Granularity(StrEnum):
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"
    PERIOD = "period"


# How long (event time) a bucket stays in a table after the newest event.
RETENTION_MS = {
    Granularity.MINUTE: 15 * 60_000,
    Granularity.HOUR: 26 * 3_600_000,
    Granularity.DAY: 33 * 86_400_000,
    Granularity.PERIOD: 100 * 86_400_000,
}


@dataclass(frozen=True, slots=True)
class Bucket:
    name: str  # minute "2025-03-10T12:30", hour "2025-03-10T12", day "2025-03-10", period "2025-03"
    start_ms: int
    end_ms: int


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def bucket_of(moment: datetime, granularity: Granularity, calendar: BillingCalendar) -> Bucket:
    """The bucket an event time falls in. Minutes, hours and days are UTC;
    periods follow the billing calendar."""
    utc = moment.astimezone(UTC)
    if granularity is Granularity.PERIOD:
        name = calendar.period_of(utc)
        start_ms, end_ms = calendar.bounds_ms(name)
        return Bucket(name, start_ms, end_ms)
    if granularity is Granularity.MINUTE:
        start, step, fmt = utc.replace(second=0, microsecond=0), timedelta(minutes=1), "%Y-%m-%dT%H:%M"
    elif granularity is Granularity.HOUR:
        start, step, fmt = utc.replace(minute=0, second=0, microsecond=0), timedelta(hours=1), "%Y-%m-%dT%H"
    else:
        start, step, fmt = utc.replace(hour=0, minute=0, second=0, microsecond=0), timedelta(days=1), "%Y-%m-%d"
    return Bucket(start.strftime(fmt), _ms(start), _ms(start + step))


GRANULARITIES = tuple(Granularity)  # index i: bit 1 << i in an event's mask below


@functools.lru_cache(maxsize=1 << 16)
def buckets_of_minute(minute: int, calendar: BillingCalendar) -> tuple[Bucket, ...]:
    """The buckets (in ``GRANULARITIES`` order) of a UTC minute since the epoch.
    Every bucket boundary, billing periods in any zone included, falls on a
    whole minute, so events in the same minute share them: computed once."""
    moment = datetime.fromtimestamp(minute * 60, UTC)
    return tuple(bucket_of(moment, g, calendar) for g in GRANULARITIES)


def model_of(priced: PricedEvent) -> str:
    """The model a usage line is billed under: served, else requested."""
    data = priced.event.data
    return data.model_served or data.model_requested or ""


class Delivered:
    """One decoded, priced event with where Kafka delivered it, and what the
    windows need of it computed once: its time, minute, model and totals."""

    __slots__ = ("priced", "partition", "offset", "index", "position", "time_ms", "minute", "model", "delta")

    def __init__(self, priced: PricedEvent, partition: int, offset: int, index: int = 0) -> None:
        self.priced = priced
        self.partition = partition
        self.offset = offset
        self.index = index  # within a record carrying a batch of events
        self.position = position(offset, index)
        self.time_ms = priced.event.time_ms
        self.minute = self.time_ms // 60_000
        self.model = model_of(priced)
        self.delta = priced.vector()


@dataclass(slots=True)
class WindowRecord:
    wm: dict[str, int] = field(default_factory=dict)
    t: int = -1
    seed: int = -1
    pb: int = -1
    buckets: dict[str, dict[str, Totals]] = field(default_factory=dict)
    starts: dict[str, int] = field(default_factory=dict)  # bucket name -> start ms
    # Each bucket's JSON form, kept until the bucket changes: a batch touches a
    # few buckets of a record, and re-encoding the others was most of its cost.
    encoded: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        encoded = self.encoded
        for name, models in self.buckets.items():
            if name not in encoded:
                encoded[name] = {"s": self.starts[name], **{m: totals.to_list() for m, totals in models.items()}}
        return {"wm": dict(self.wm), "t": self.t, "seed": self.seed, "pb": self.pb, "b": dict(encoded)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> WindowRecord:
        record = cls(wm=dict(raw.get("wm") or {}), t=raw.get("t", -1), seed=raw.get("seed", -1), pb=raw.get("pb", -1))
        for name, models in (raw.get("b") or {}).items():
            record.starts[name] = models["s"]
            record.buckets[name] = {m: Totals.from_list(v) for m, v in models.items() if m != "s"}
        return record

    def needs_seed(self, bucket: Bucket) -> bool:
        """True when ``bucket`` is absent here yet the ledger may hold rows of it."""
        return bucket.name not in self.buckets and (bucket.start_ms <= self.seed or bucket.start_ms < self.pb)

    def totals(self, bucket: str, model: str = ALL_MODELS) -> Totals:
        return self.buckets.get(bucket, {}).get(model, Totals())


Seed = Mapping[str, Totals]  # model -> ledger totals of one bucket (the "*" line is derived)


def seeds_needed(
    record: WindowRecord, granularity: Granularity, events: Iterable[Delivered], calendar: BillingCalendar
) -> dict[str, Bucket]:
    """Buckets the events would create in ``record`` that must first be seeded from the ledger."""
    index = GRANULARITIES.index(granularity)
    wm = record.wm
    minutes = {d.minute for d in events if d.position > wm.get(str(d.partition), -1)}
    out: dict[str, Bucket] = {}
    for minute in minutes:
        bucket = buckets_of_minute(minute, calendar)[index]
        if bucket.name not in out and record.needs_seed(bucket):
            out[bucket.name] = bucket
    return out


def apply(
    record: WindowRecord,
    granularity: Granularity,
    events: Sequence[Delivered],
    seeds: Mapping[str, Seed],
    calendar: BillingCalendar,
) -> set[str]:
    """Add the events not yet applied (by position) to ``record``; return the
    buckets they touched. ``events`` are new to the ledger (duplicates by id
    are dropped before) and in position order. A bucket listed in ``seeds``
    starts from the ledger's totals instead of zero."""
    return apply_all({granularity: record}, events, {granularity: seeds}, calendar)[granularity]


def apply_all(
    records: Mapping[Granularity, WindowRecord],
    events: Sequence[Delivered],
    seeds: Mapping[Granularity, Mapping[str, Seed]],
    calendar: BillingCalendar,
) -> dict[Granularity, set[str]]:
    """``apply`` for one customer's records of several granularities at once:
    the events are summed once per (minute, model, records they are new to),
    and each sum is added to the bucket of each record."""
    grans = [(GRANULARITIES.index(g), g, r) for g, r in records.items()]
    sums: dict[tuple[int, int, str], list[Any]] = {}  # (mask, minute, model) -> summed delta
    newest: dict[int, int] = {}  # mask -> newest event time
    for d in events:
        key = str(d.partition)
        mask = 0
        for index, _, record in grans:
            wm = record.wm
            if d.position > wm.get(key, -1):
                wm[key] = d.position  # applied before a crash or a rebalance: never twice
                mask |= 1 << index
        if not mask:
            continue
        acc = sums.get((mask, d.minute, d.model))
        if acc is None:
            sums[(mask, d.minute, d.model)] = list(d.delta)
        else:
            delta = d.delta
            for i in range(len(acc)):
                acc[i] += delta[i]
        if d.time_ms > newest.get(mask, -1):
            newest[mask] = d.time_ms

    touched: dict[Granularity, set[str]] = {g: set() for g in records}
    for (mask, minute, model), acc in sums.items():
        delta = Totals.from_vector(acc)
        buckets = buckets_of_minute(minute, calendar)
        for index, granularity, record in grans:
            if not mask & (1 << index):
                continue
            bucket = buckets[index]
            models = record.buckets.get(bucket.name)
            if models is None:
                models = {}
                for seeded_model, seeded in seeds.get(granularity, {}).get(bucket.name, {}).items():
                    models[seeded_model] = seeded
                    models[ALL_MODELS] = models.get(ALL_MODELS, Totals()) + seeded
                record.buckets[bucket.name] = models
                record.starts[bucket.name] = bucket.start_ms
            models[ALL_MODELS] = models[ALL_MODELS] + delta if ALL_MODELS in models else delta
            models[model] = models[model] + delta if model in models else delta
            record.encoded.pop(bucket.name, None)
            touched[granularity].add(bucket.name)
    for mask, time_ms in newest.items():
        for index, _, record in grans:
            if mask & (1 << index) and time_ms > record.t:
                record.t = time_ms
    for granularity, record in records.items():
        _prune(record, granularity)
    return touched


def _prune(record: WindowRecord, granularity: Granularity) -> None:
    cutoff = record.t - RETENTION_MS[granularity]
    for name in [n for n, start in record.starts.items() if start < cutoff]:
        # A bucket is dropped once it starts before the cutoff; one that comes
        # back is seeded from the ledger (start < pb), so it stays exact.
        del record.buckets[name], record.starts[name]
        record.encoded.pop(name, None)
        record.pb = max(record.pb, cutoff)


def is_late(event_ms: int, stream_ms: int, grace_ms: int) -> bool:
    """Late: older than the customer's newest event by more than the grace."""
    return stream_ms >= 0 and event_ms < stream_ms - grace_ms
