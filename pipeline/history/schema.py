"""The ledger's SQL: one row per event, deduplicated by event id.

``ReplacingMergeTree … ORDER BY (customer, id)`` keeps one row per id after
merges; until then every summing query reads ``FINAL``, so a retried batch
never doubles a total. A duplicate has the same time as its original, hence
the same monthly partition, which is what FINAL deduplicates within.

Rollups: ``usage_hourly`` and ``usage_daily`` are materialized views (into
SummingMergeTree tables ``*_store``) per customer, tier, model and hour / day;
read them with ``sum(…) … GROUP BY`` (rows merge in the background). A view
sums every inserted row, so it is exact only if no id is inserted twice: the
pipeline inserts only ids the ledger does not hold yet (``KNOWN_IDS``), and a
worker killed between the table's part and a view's part is repaired on its
next start (``rollup_rebuild``). ``model`` is the model served, else requested.

Partitions are calendar months in UTC: storage only. A billing period (see
``quotameter.periods``) can start at any local midnight, 18:30 UTC for
Asia/Kolkata, so period totals (``USAGE``, ``period_totals``, the export)
select the deduplicated ledger by the period's UTC bounds, never by
``toYYYYMM``; the dashboards stitch rollup days and hours to ledger rows
for what no whole UTC hour covers (``dashboards.sources.usage``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson

from quotameter.aggregate import PricedEvent, format_usd
from quotameter.periods import BillingCalendar

DATABASE = "quotameter"
EVENTS = f"{DATABASE}.events"
# The tables themselves are created by ``migrations``.

# name, time column, its type, the bucket expression over events.time
ROLLUPS = (
    ("usage_hourly", "hour", "DateTime('UTC')", "toStartOfHour(time)"),
    ("usage_daily", "day", "Date", "toDate(time, 'UTC')"),
)

_ROLLUP_SUMS = """
    countIf(decision = 'admitted') AS requests,
    countIf(decision != 'admitted') AS refused,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(cost_usd) AS cost_usd,
    count() AS events"""
# The same sums for readers: money as exact text.
_USAGE_SUMS = _ROLLUP_SUMS.replace("sum(cost_usd) AS cost_usd", "toString(sum(cost_usd)) AS cost_usd")


def rollup_select(bucket_column: str, bucket_expr: str, source: str, where: str = "") -> str:
    return f"""
    SELECT customer, tier, coalesce(model_served, model_requested, '') AS model,
        {bucket_expr} AS {bucket_column},{_ROLLUP_SUMS}
    FROM {source}
    {where}
    GROUP BY customer, tier, model, {bucket_column}"""


def rollup_rebuild(month: int) -> list[str]:
    """Statements that recompute both rollups of one ``YYYYMM`` month from the
    deduplicated ledger (run with no insert in flight)."""
    statements = []
    for name, column, _type, expr in ROLLUPS:
        statements.append(f"ALTER TABLE {DATABASE}.{name}_store DROP PARTITION {int(month)}")
        statements.append(
            f"INSERT INTO {DATABASE}.{name}_store"
            + rollup_select(column, expr, f"{EVENTS} FINAL", f"WHERE toYYYYMM(time) = {int(month)}")
        )
    return statements


# Months of the rows written in the last minutes before the newest one: what
# a worker killed mid-insert may have left out of a rollup.
RECENT_MONTHS = f"""
SELECT DISTINCT toYYYYMM(time) AS month FROM {EVENTS}
WHERE ingested_at >= (SELECT max(ingested_at) FROM {EVENTS}) - INTERVAL 10 MINUTE
"""

INSERT_EVENTS = f"INSERT INTO {EVENTS} FORMAT JSONEachRow\n"

USAGE = f"""
SELECT{_USAGE_SUMS}
FROM {EVENTS} FINAL
WHERE customer = {{customer:String}}
  AND time >= {{start:DateTime64(3, 'UTC')}} AND time < {{end:DateTime64(3, 'UTC')}}
"""

USAGE_INT_FIELDS = ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "events")


_SECOND = "%Y-%m-%d %H:%M:%S."  # then the milliseconds: DateTime64(3) text


def _clickhouse_time(moment: datetime) -> str:
    return moment.strftime(_SECOND) + f"{moment.microsecond // 1000:03d}"


LEDGER_COLUMNS = (
    "id",
    "time",
    "customer",
    "api_key_id",
    "tier",
    "route",
    "status",
    "decision",
    "reason",
    "model_requested",
    "model_served",
    "upstream",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "price_version",
    "upstream_cost_usd",
    "usage_source",
    "streamed",
    "latency_ms",
    "ttft_ms",
    "request_bytes",
    "response_bytes",
    "source",
    "cache_write_tokens",
    "late",
    "kafka_partition",
    "kafka_offset",
    "kafka_index",
    "end_user",
    "project",
    "tags",
)
# Rows as JSON arrays in LEDGER_COLUMNS order: a third cheaper to encode than
# objects, and the sink encodes every event.
INSERT_ROWS = f"INSERT INTO {EVENTS} ({', '.join(LEDGER_COLUMNS)}) FORMAT JSONCompactEachRow\n"


_SECONDS: dict[int, str] = {}  # Unix second -> its text: a batch's events share a few seconds


def _row_time(moment: datetime) -> str:
    """``_clickhouse_time`` of an event's time, the text of its second kept."""
    second = int(moment.timestamp())  # whole seconds: exact here, whatever the float's last bits
    text = _SECONDS.get(second)
    if text is None:
        if len(_SECONDS) > 10_000:
            _SECONDS.clear()
        text = _SECONDS[second] = moment.strftime(_SECOND)
    return f"{text}{moment.microsecond // 1000:03d}"


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def _row_ms(moment: datetime) -> int:
    """An event's time in whole Unix milliseconds, in integers (as ``_row_time`` cuts it)."""
    return (moment - _EPOCH) // _MILLISECOND


def ledger_values(priced: PricedEvent, time: Callable[[datetime], Any] = _row_time) -> list[Any]:
    """One ledger row, in LEDGER_COLUMNS order; ``time`` gives the time's form
    (DateTime64 text; ``_row_ms`` for ``ledger_columns``)."""
    event, data = priced.event, priced.event.data
    upstream_cost = data.upstream_cost_usd
    return [
        event.id,
        time(event.time),
        event.customer_id,
        data.api_key_id,
        data.tier,
        data.route,
        data.status,
        data.decision.value,
        data.reason,
        data.model_requested,
        data.model_served,
        data.upstream,
        data.input_tokens,
        data.output_tokens,
        data.cached_tokens,
        data.reasoning_tokens,
        format_usd(priced.cost.usd),
        priced.cost.price_version,
        None if upstream_cost is None else format_usd(upstream_cost),
        data.usage_source.value,
        data.streamed,
        data.latency_ms,
        data.ttft_ms,
        data.request_bytes,
        data.response_bytes,
        event.source,
        data.cache_write_tokens,
        priced.late,
        priced.partition,
        priced.offset,
        priced.index,
        data.end_user or "",
        data.project or "",
        data.tags or {},
    ]


def ledger_row(priced: PricedEvent) -> dict[str, Any]:
    return dict(zip(LEDGER_COLUMNS, ledger_values(priced), strict=True))


def ledger_lines(batch: Sequence[PricedEvent]) -> str:
    """The body of an INSERT_ROWS: one JSON array per line."""
    lines = []
    for priced in batch:
        values = ledger_values(priced)
        try:
            lines.append(orjson.dumps(values))
        except TypeError:  # a lone surrogate in some text: json escapes it
            lines.append(json.dumps(values, separators=(",", ":")).encode())
    return b"\n".join(lines).decode()


# Columns read from a table of ``ledger_columns`` (chDB's Python() table
# function, ``chdb_store``) and the expression that gives the ledger's type:
# time in Unix milliseconds, money as the same exact text as above.
_FROM_COLUMNS = {
    "time": "fromUnixTimestamp64Milli(time, 'UTC')",
    "cost_usd": "toDecimal128(cost_usd, 12)",
    "upstream_cost_usd": "CAST(upstream_cost_usd AS Nullable(Decimal(38, 12)))",
}


# How ``ledger_columns`` carries each column that is not an integer (chdb_store
# makes the Arrow types from these): the time goes as integer milliseconds and
# money as text, read back by _FROM_COLUMNS above.
_COLUMN_KINDS = {
    **dict.fromkeys(("id", "customer", "api_key_id", "tier", "route", "decision", "reason", "model_requested",
                     "model_served", "upstream", "cost_usd", "price_version", "upstream_cost_usd", "usage_source",
                     "source", "end_user", "project"), "text"),
    "latency_ms": "float",
    "ttft_ms": "float",
    "streamed": "bool",
    "late": "bool",
    "tags": "map",
}


def column_kind(name: str) -> str:
    """``text``, ``float``, ``bool``, ``map`` or ``int``: the form of column ``name`` in ``ledger_columns``."""
    return _COLUMN_KINDS.get(name, "int")


def insert_from(source: str) -> str:
    """INSERT of the ledger rows that ``source`` (a table function) reads, one
    column per LEDGER_COLUMNS name as ``ledger_columns`` makes them."""
    return (
        f"INSERT INTO {EVENTS} ({', '.join(LEDGER_COLUMNS)})"
        f" SELECT {', '.join(_FROM_COLUMNS.get(name, name) for name in LEDGER_COLUMNS)} FROM {source}"
    )


def ledger_columns(batch: Sequence[PricedEvent]) -> list[tuple[Any, ...]]:
    """The rows of ``batch`` as columns, in LEDGER_COLUMNS order (for ``insert_from``)."""
    return list(zip(*(ledger_values(priced, _row_ms) for priced in batch), strict=True))


def usage_params(customer: str, period: str, calendar: BillingCalendar) -> dict[str, str]:
    """The bound parameters of USAGE: the period's UTC bounds, never a calendar month."""
    start, end = calendar.bounds(period)
    return {"customer": customer, "start": _clickhouse_time(start), "end": _clickhouse_time(end)}


def usage_row(customer: str, period: str, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """The usage dict every reader returns (the worker's /usage, ledger_usage)."""
    raw = raw or {}
    row: dict[str, Any] = {"customer": customer, "period": period}
    for name in USAGE_INT_FIELDS:
        row[name] = int(raw.get(name) or 0)
    row["cost_usd"] = format_usd(Decimal(str(raw.get("cost_usd") or 0)))
    return row


_READ_ONLY_START = re.compile(r"^\s*(SELECT|WITH)\b", re.IGNORECASE)
_FORMAT_CLAUSE = re.compile(r"\bFORMAT\s+\w+\s*$", re.IGNORECASE)


def read_only_select(sql: str) -> str | None:
    """``sql`` cleaned of one trailing ``;``, or None when it is not one SELECT.

    This is the first fence; the store also runs the query on a read-only
    session, so a write that slipped past it still fails.
    """
    text = sql.strip().removesuffix(";").rstrip()
    if not text or ";" in text or not _READ_ONLY_START.match(text) or _FORMAT_CLAUSE.search(text):
        return None
    return text


def sql_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def known_ids(customers: Sequence[str], ids: Sequence[str]) -> str:
    """The ids among ``ids`` the ledger holds, with the Kafka position of the
    delivery that wrote each (a primary-key lookup)."""
    return known_ids_in(customers, ", ".join(map(sql_string, ids)))


def known_ids_in(customers: Sequence[str], ids_source: str) -> str:
    """``known_ids`` with the ids read from ``ids_source``: a list of literals,
    or a subquery (chDB's ``Python()`` table function, see ``chdb_store``)."""
    return (
        f"SELECT id, any(kafka_partition) AS p, any(kafka_offset) AS o FROM {EVENTS} WHERE customer IN ({', '.join(map(sql_string, customers))})"
        f" AND id IN ({ids_source}) GROUP BY id"
    )


def applied_offsets(partitions: Sequence[int]) -> str:
    """The highest Kafka offset each partition's rows were written from."""
    return (
        f"SELECT kafka_partition AS p, max(kafka_offset) AS o FROM {EVENTS}"
        f" WHERE kafka_partition IN ({', '.join(str(int(p)) for p in partitions)}) GROUP BY p"
    )


def newest_event_ms(customers: Sequence[str]) -> str:
    return (
        f"SELECT customer, toUnixTimestamp64Milli(max(time)) AS newest_ms FROM {EVENTS}"
        f" WHERE customer IN ({', '.join(map(sql_string, customers))}) GROUP BY customer"
    )


def bucket_totals(customer: str, start_ms: int, end_ms: int) -> str:
    """One customer's exact totals per model in [start, end): a window seed."""
    return (
        f"SELECT coalesce(model_served, model_requested, '') AS model,{_USAGE_SUMS}"
        f" FROM {EVENTS} FINAL WHERE customer = {sql_string(customer)}"
        f" AND time >= fromUnixTimestamp64Milli({int(start_ms)}, 'UTC')"
        f" AND time < fromUnixTimestamp64Milli({int(end_ms)}, 'UTC') GROUP BY model"
    )


def period_totals(start: datetime, end: datetime, customer: str | None, limit: int, offset: int) -> str:
    """Exact totals per customer in [start, end), a page at a time (rebuild-state)."""
    only = f" AND customer = {sql_string(customer)}" if customer else ""
    return (
        f"SELECT customer,{_USAGE_SUMS} FROM {EVENTS} FINAL"
        f" WHERE time >= toDateTime64({sql_string(_clickhouse_time(start))}, 3, 'UTC')"
        f" AND time < toDateTime64({sql_string(_clickhouse_time(end))}, 3, 'UTC'){only}"
        f" GROUP BY customer ORDER BY customer LIMIT {int(limit)} OFFSET {int(offset)}"
    )
