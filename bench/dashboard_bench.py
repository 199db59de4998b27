"""Every dashboard panel's query time over a seeded month of events in chDB.

    .venv/bin/python bench/dashboard_bench.py              # 10 million events
    .venv/bin/python bench/dashboard_bench.py --events 1000000

Seeds March 2025 in a temporary chDB directory with INSERT … SELECT from
numbers() (500 customers over three tiers, three models, ~5 % refusals and
a sprinkle of fallbacks, queueing and upstream errors; the rollups fill
from the materialized views as the pipeline's inserts do), then runs each
panel with its macros expanded for the whole month (Grafana's "this month",
ending 23:59:59, so the last hour is read from the ledger), template
variables on All, with one customer selected, with one API key selected (the
ledger alone, deduplicated), and over the month's last 6 hours (minute
points: timeseries read the ledger), and prints the
median of a few runs beside the 500 ms target. ``reads`` says where the
panel's rows come from (see dashboards/sources.py). The baseline, in the
same run: each usage panel with its rollup-stitched ``usage()`` replaced by
the same rows straight from the deduplicated ledger (``FINAL``), timed over
the whole month, and its answer compared with the panel's (they must be
equal: the bench fails otherwise). Timing starts once the
background merges of the seeded parts have settled. The directory is
removed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dashboards.catalog import DASHBOARDS, VARIABLES, config_constants  # noqa: E402
from dashboards.filters import MODEL  # noqa: E402
from dashboards.macros import TimeRange, Variables, expand  # noqa: E402
from dashboards.sources import LEDGER_FILTERS, PERIOD_START, usage  # noqa: E402
from pipeline.history import migrations, schema  # noqa: E402
from quotameter.config import load_config  # noqa: E402

TARGET_MS = 500.0
MONTH_START = datetime(2025, 3, 1, tzinfo=UTC)
MONTH_END = datetime(2025, 4, 1, tzinfo=UTC)
RANGE_END = datetime(2025, 3, 31, 23, 59, 59, tzinfo=UTC)  # Grafana's "this month": to the last second
BATCH = 1_000_000

COLUMNS = ("id, time, customer, api_key_id, tier, route, status, decision, reason, model_requested, model_served, "
           "upstream, input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, price_version, "
           "upstream_cost_usd, usage_source, streamed, latency_ms, ttft_ms, request_bytes, response_bytes, source, "
           "ingested_at")

SEED = """
INSERT INTO {events} ({columns})
SELECT
    concat('e', toString(number)) AS id,
    toDateTime64({start}, 3, 'UTC') + toIntervalMillisecond(intDiv(number * {span_ms}, {n})) AS time,
    concat('cust-', toString(number % 500)) AS customer,
    concat('key-', toString(number % 1000)) AS api_key_id,
    ['free', 'pro', 'enterprise'][(number % 500) % 3 + 1] AS tier,
    '/v1/chat/completions' AS route,
    multiIf(number % 20 = 0, 429, number % 97 = 2, 502, 200) AS status,
    if(number % 20 = 0, 'refused', 'admitted') AS decision,
    multiIf(number % 20 = 0, ['rate_limit_requests', 'rate_limit_tokens', 'quota_tokens', 'queued'][intDiv(number, 20) % 4 + 1],
            number % 50 = 1, 'fallback', number % 97 = 2, 'upstream_error', number % 40 = 3, 'queued', NULL) AS reason,
    ['gpt-4o', 'gpt-4o-mini', 'mock-small'][number % 7 % 3 + 1] AS model_requested,
    if(number % 20 = 0, NULL, model_requested) AS model_served,
    if(number % 20 = 0, NULL, 'mock') AS upstream,
    if(number % 20 = 0, 0, 200 + number % 1800) AS input_tokens,
    if(number % 20 = 0, 0, 50 + number % 700) AS output_tokens,
    if(number % 20 = 0, 0, number % 100) AS cached_tokens,
    0 AS reasoning_tokens,
    toDecimal128(input_tokens * 0.0000025 + output_tokens * 0.00001, 12) AS cost_usd,
    concat(model_requested, '@2024-08-06') AS price_version,
    NULL AS upstream_cost_usd,
    if(number % 20 = 0, 'none', 'upstream') AS usage_source,
    number % 3 = 0 AS streamed,
    5 + (number % 997) AS latency_ms,
    if(number % 3 = 0, toNullable(2.0 + number % 211), NULL) AS ttft_ms,
    300 AS request_bytes,
    1200 AS response_bytes,
    'shim-bench' AS source,
    time + toIntervalMillisecond(number % 5000) AS ingested_at
FROM numbers({offset}, {count})
"""


def seed(session, events: int) -> float:  # noqa: ANN001 - chdb Session
    started = time.perf_counter()
    for statement in migrations.DDL:
        session.query(statement)
    span_ms = int((MONTH_END - MONTH_START).total_seconds() * 1000) - 1
    for offset in range(0, events, BATCH):
        sql = SEED.format(events=schema.EVENTS, columns=COLUMNS, start=int(MONTH_START.timestamp()), span_ms=span_ms, n=events,
                          offset=offset, count=min(BATCH, events - offset))
        session.query(sql)
    return time.perf_counter() - started


def settle(session, timeout_s: float = 300.0) -> tuple[float, str]:  # noqa: ANN001
    """Wait for the background merges of the seeded parts (a month-old ledger is merged)."""
    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        merging = session.query("SELECT count() FROM system.merges WHERE database = 'quotameter'", "CSV")
        if merging.bytes().decode().strip() == "0":
            break
        time.sleep(0.5)
    parts = session.query(
        "SELECT count(), sum(rows) FROM system.parts WHERE database = 'quotameter' AND table = 'events' AND active",
        "CSV",
    ).bytes().decode().strip()
    return time.perf_counter() - started, parts


def reads(sql: str) -> str:
    """Where a panel's rows come from: the rollups (stitched to the ledger's partial hours), the ledger."""
    sources = []
    if "usage_hourly_store" in sql:
        sources.append("rollups")
    if f"FROM {schema.EVENTS} FINAL\n    PREWHERE $__timeFilter" in sql:  # not usage()'s filtered-by-key branch
        sources.append("ledger FINAL")
    elif f"FROM {schema.EVENTS}\n    PREWHERE $__timeFilter" in sql:
        sources.append("ledger")
    return "+".join(sources)


def straight_usage(start: str = "$__fromTime", end: str = "$__toTime", filters: bool = True) -> str:
    """usage()'s rows straight from the deduplicated ledger: no rollups."""
    where = f" AND {LEDGER_FILTERS}" if filters else ""
    return f"""(
    SELECT time, customer, tier, {MODEL} AS model,
           toUInt64(decision = 'admitted') AS requests, toUInt64(decision != 'admitted') AS refused,
           input_tokens, output_tokens, cached_tokens, reasoning_tokens, cost_usd, toUInt64(1) AS events
    FROM {schema.EVENTS} FINAL
    PREWHERE time >= {start} AND time <= {end}{where}
)"""


# Each usage() a panel can hold, beside its ledger-straight twin.
STRAIGHT = (
    (usage(step="$__interval_s"), straight_usage()),
    (usage(PERIOD_START, "$__toTime"), straight_usage(PERIOD_START, "$__toTime")),
    (usage(filters=False), straight_usage(filters=False)),
    (usage(), straight_usage()),
)


def baseline_sql(sql: str) -> str | None:
    """The panel read straight from the ledger, or None when it reads the ledger already."""
    replaced = sql
    for stitched, straight in STRAIGHT:
        replaced = replaced.replace(stitched, straight)
    return None if replaced == sql else replaced


def time_query(session, sql: str, runs: int) -> tuple[float, int]:  # noqa: ANN001
    elapsed, answer = timed_answer(session, sql, runs)
    return elapsed, len(answer)


def timed_answer(session, sql: str, runs: int) -> tuple[float, list[str]]:  # noqa: ANN001
    """The median time of ``runs`` runs (after one warming run) and the answer's rows."""
    answer: list[str] = []
    timings = []
    for attempt in range(runs + 1):
        started = time.perf_counter()
        result = session.query(sql, "JSONEachRow")
        elapsed_ms = (time.perf_counter() - started) * 1000
        answer = [line for line in result.bytes().decode().splitlines() if line.strip()]
        if attempt:  # the first run warms the caches
            timings.append(elapsed_ms)
    return statistics.median(timings), answer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=10_000_000, help="events to seed (default 10 million)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs per query (median shown)")
    parser.add_argument("--optimize", action="store_true", help="OPTIMIZE … FINAL first (a closed, merged month)")
    args = parser.parse_args()

    from chdb.session import Session

    constants = config_constants(load_config())
    time_range = TimeRange(MONTH_START, RANGE_END)
    last_6h = TimeRange(RANGE_END - timedelta(hours=6), RANGE_END)
    all_vars = Variables(constants=constants)
    one_customer = Variables(selected={"customer": ["cust-7"]}, constants=constants)
    one_key = Variables(selected={"api_key": ["key-7"]}, constants=constants)  # the ledger alone (no rollup has it)
    with tempfile.TemporaryDirectory(prefix="qm-dashboard-bench-") as tmp:
        session = Session(str(Path(tmp) / "history"))
        try:
            seconds = seed(session, args.events)
            print(f"seeded {args.events:,} events in {seconds:.1f} s ({args.events / seconds:,.0f} events/s)")
            if args.optimize:
                session.query(f"OPTIMIZE TABLE {schema.EVENTS} FINAL")
            waited, parts = settle(session)
            print(f"merges settled after {waited:.1f} s; active parts, rows: {parts}; "
                  f"interval {time_range.effective_interval_s} s")
            worst = 0.0
            for variable in VARIABLES:  # each page load lists every filter's options
                options_ms, rows = time_query(session, expand(variable.sql, time_range, all_vars), args.runs)
                worst = max(worst, options_ms)
                print(f"options of {variable.name:<10} {options_ms:>7.1f} ms, {rows} values")
            print(f"{'dashboard':<11} {'panel':<25} {'reads':<21} {'all ms':>7} {'rows':>5} {'ledger ms':>9} "
                  f"{'same':>4} {'1 cust ms':>9} {'1 key ms':>8} {'6h ms':>7}  target {TARGET_MS:.0f} ms")
            differ = []
            for dashboard in DASHBOARDS:
                for panel in dashboard.panels:
                    all_ms, answer = timed_answer(session, expand(panel.sql, time_range, all_vars), args.runs)
                    straight = baseline_sql(panel.sql)
                    base_ms, same = float("nan"), "-"
                    if straight is not None:
                        base_ms, expected = timed_answer(session, expand(straight, time_range, all_vars), args.runs)
                        same = "yes" if sorted(answer) == sorted(expected) else "NO"
                        if same == "NO":
                            differ.append(panel.key)
                    one_ms, _ = time_query(session, expand(panel.sql, time_range, one_customer), args.runs)
                    key_ms, _ = time_query(session, expand(panel.sql, time_range, one_key), args.runs)
                    short_ms, _ = time_query(session, expand(panel.sql, last_6h, all_vars), args.runs)
                    worst = max(worst, all_ms, one_ms, key_ms, short_ms)
                    verdict = "ok" if max(all_ms, one_ms, key_ms, short_ms) <= TARGET_MS else "SLOW"
                    name = dashboard.uid.removeprefix("quotameter-")
                    print(f"{name:<11} {panel.key:<25} {reads(panel.sql):<21} {all_ms:>7.1f} {len(answer):>5} "
                          f"{base_ms:>9.1f} {same:>4} {one_ms:>9.1f} {key_ms:>8.1f} {short_ms:>7.1f}  {verdict}")
            print("('ledger ms': the same panel over the month with usage() read straight from the ledger, FINAL; "
                  "'same': both answers equal; '-': the panel reads the ledger already)")
            print(f"slowest panel: {worst:.1f} ms (target {TARGET_MS:.0f} ms)")
            if differ:
                print(f"DIFFERENT ANSWERS from the ledger: {', '.join(differ)}")
                return 1
        finally:
            session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
