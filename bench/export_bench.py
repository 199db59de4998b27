"""The billing export of every customer over a seeded month of events in chDB.

    .venv/bin/python bench/export_bench.py                    # 10 million events
    .venv/bin/python bench/export_bench.py --events 1000000

Seeds March 2025 in a temporary chDB directory with INSERT … SELECT from
numbers() (1000 customers, three priced models, ~2 % refusals, cached and
reasoning tokens, 1 % of the events inserted twice as a retried sink batch
would), costs priced exactly as the pipeline prices them. Each customer's
period totals go to a real redis-server (started here, stopped by PID),
computed from the generator itself, not read back from the ledger: Redis is
an independent side, so reconciliation has something to find.

Then, with no worker running (the store opened read-only, as the CLI does):

- baseline: the same invoice lines read from the ledger, priced and rendered,
  with no reconciliation (no ledger totals, no Redis);
- ``quotameter.export.run_export`` for csv, json and stripe (daily windows),
  reconciliation included; each time beside the baseline and the 10 s target;
- a drift: three customers' Redis totals changed (one request more, seven
  input tokens more, one hash gone): the export must refuse, naming exactly
  those three. The bench fails if it does not.

Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402
import yaml  # noqa: E402

from pipeline.history.chdb_store import ChdbHistory  # noqa: E402
from pipeline.redis_writer import usage_hash  # noqa: E402
from quotameter import billing, export_sql, reconcile  # noqa: E402
from quotameter.aggregate import Totals  # noqa: E402
from quotameter.config import DEFAULT_CONFIG, parse_config  # noqa: E402
from quotameter.embedded.procs import free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.export import ReconciliationFailed, ledger, run_export  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402

TARGET_S = 10.0
MONTH = "2025-03"
START = datetime(2025, 3, 1, tzinfo=UTC)
NOW = datetime(2025, 4, 3, 1, tzinfo=UTC)  # final, and every daily window within Stripe's 35 days
BATCH = 2_000_000
CUSTOMERS = 1000

# model, price version, input, cached, output rates per million (the example config's prices)
MODELS = (
    ("gpt-4o", "gpt-4o@2024-08-06", "2.50", "1.25", "10.00"),
    ("gpt-4o-mini", "gpt-4o-mini@2024-07-18", "0.15", "0.075", "0.60"),
    ("mock-small", "mock-small@1970-01-01", "0.10", "0.10", "0.40"),
)


def _pick(values: list[str]) -> str:
    return "[" + ", ".join(values) + "][number % 3 + 1]"


def generated(first: int, count: int, total: int) -> str:
    """The seeded events: the generator both the ledger and Redis are filled from."""
    def rate(index: int) -> str:
        return _pick([f"toDecimal128('{m[index]}', 12)" for m in MODELS])

    span_ms = 31 * 24 * 3600 * 1000
    return f"""
    SELECT number,
        concat('e', toString(number)) AS id,
        toDateTime64('2025-03-01 00:00:00', 3, 'UTC') + toIntervalMillisecond(intDiv(number * {span_ms}, {total})) AS time,
        concat('cust-', leftPad(toString(number % {CUSTOMERS}), 4, '0')) AS customer,
        concat('key-', toString(number % {CUSTOMERS})) AS api_key_id,
        number % 53 != 7 AS ok,
        {_pick([f"'{m[0]}'" for m in MODELS])} AS model,
        {_pick([f"'{m[1]}'" for m in MODELS])} AS version,
        if(ok, toUInt64(100 + number % 900), 0) AS it,
        if(ok, toUInt64(10 + number % 300), 0) AS ot,
        if(ok AND number % 5 = 0, intDiv(it, 2), 0) AS ca,
        if(ok AND number % 7 = 0, intDiv(ot, 4), 0) AS rt,
        {rate(2)} AS r_in, {rate(3)} AS r_ca, {rate(4)} AS r_out,
        if(ok, ((it - ca) * r_in + ca * r_ca + ot * r_out) / 1000000, toDecimal128(0, 12)) AS cost
    FROM numbers({first}, {count})"""


def seed_sql(first: int, count: int, total: int) -> str:
    return f"""
INSERT INTO quotameter.events (id, time, customer, api_key_id, tier, route, status, decision, reason,
    model_requested, model_served, upstream, input_tokens, output_tokens, cached_tokens, reasoning_tokens,
    cost_usd, price_version, usage_source, streamed, latency_ms, request_bytes, response_bytes, source)
SELECT id, time, customer, api_key_id, 'pro', '/v1/chat/completions', if(ok, 200, 429),
    if(ok, 'admitted', 'refused'), if(ok, NULL, 'rate_limit_requests'), model, if(ok, model, NULL), 'mock',
    it, ot, ca, rt, cost, if(ok, version, 'unpriced'), if(ok, 'upstream', 'none'), number % 2 = 0, 12.5, 800,
    1200, 'bench'
FROM ({generated(first, count, total)})"""


def generated_totals(events: int) -> str:
    """Each customer's totals straight from the generator (each event once, as
    the pipeline counts it), never from the ledger's rows."""
    return f"""SELECT customer, countIf(ok) AS requests, count() AS events, sum(it) AS input_tokens,
    sum(ot) AS output_tokens, sum(ca) AS cached_tokens, sum(rt) AS reasoning_tokens, toString(sum(cost)) AS cost_usd
FROM ({generated(0, events, events)})
GROUP BY customer ORDER BY customer"""


def seed(directory: Path, events: int) -> float:
    began = time.perf_counter()
    store = ChdbHistory(directory)
    try:
        for first in range(0, events, BATCH):
            store._run(store._rw, seed_sql(first, min(BATCH, events - first), events))
            print(f"  seeded {min(first + BATCH, events):,} events", flush=True)
        # A retried sink batch: 1 % of the events again, same ids and times.
        store._run(store._rw, seed_sql(0, max(events // 100, 1), events))
    finally:
        store.close()
    return time.perf_counter() - began


def seed_redis(config, directory: Path, events: int) -> None:  # noqa: ANN001
    """Each customer's period totals, as the pipeline writes them, from the generator."""
    store = ChdbHistory(directory, read_only=True)
    try:
        rows = store.query(generated_totals(events))  # reads numbers(), not the ledger
    finally:
        store.close()
    names = RedisKeys(config.services.redis_prefix)
    client = redis.Redis.from_url(config.services.redis_url)
    with client.pipeline(transaction=False) as pipe:
        for row in rows:
            totals = Totals(
                requests=int(row["requests"]), refused=int(row["events"]) - int(row["requests"]),
                input_tokens=int(row["input_tokens"]), output_tokens=int(row["output_tokens"]),
                cached_tokens=int(row["cached_tokens"]), reasoning_tokens=int(row["reasoning_tokens"]),
                cost_usd=Decimal(row["cost_usd"]), events=int(row["events"]),
            )
            pipe.hset(names.usage(row["customer"], MONTH), mapping=usage_hash(totals, 0))
        pipe.execute()
    client.close()


DRIFTED = {"cust-0001": "requests", "cust-0002": "input_tokens", "cust-0003": None}  # None: the hash is gone


def drift_redis(config) -> None:  # noqa: ANN001
    """What a lost or doubled update would leave: three customers off in Redis."""
    names = RedisKeys(config.services.redis_prefix)
    client = redis.Redis.from_url(config.services.redis_url)
    for customer, field in DRIFTED.items():
        if field is None:
            client.delete(names.usage(customer, MONTH))
        else:
            client.hincrby(names.usage(customer, MONTH), field, 1 if field == "requests" else 7)
    client.close()


def unreconciled(config, fmt: str) -> str:  # noqa: ANN001
    """The baseline: the same lines from the ledger, priced and rendered, nothing reconciled."""
    fin = reconcile.finality(config, MONTH, NOW)
    rows: list = []
    with ledger(config) as reader:
        while True:
            page = reader.rows(export_sql.lines(fin.start, fin.end, export_sql.PAGE_ROWS, len(rows), ()))
            rows.extend(page)
            if len(page) < export_sql.PAGE_ROWS:
                break
    invoice = billing.build_invoice(rows, billing.rate_table(config), month=MONTH, currency=config.billing.currency,
                                    period_start=fin.start.isoformat(), period_end=fin.end.isoformat(), final=True, by=())
    return billing.render_json(invoice) if fmt == "json" else billing.render_csv(invoice)


def _best(runs: int, work) -> tuple[float, list[float], object]:  # noqa: ANN001
    times, result = [], None
    for _ in range(runs):
        began = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - began)
    return min(times), times, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000_000)
    parser.add_argument("--runs", type=int, default=2, help="timed runs per format (the best is shown)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qm-export-bench-"))
    port = free_port()
    redis_proc = redis_process(port, work / "redis", work / "redis.log", persist=False).start()
    try:
        redis_proc.wait_port("127.0.0.1", port, timeout_s=20)
        document = yaml.safe_load(DEFAULT_CONFIG.read_text())
        document["services"].update(
            history_dir=str(work / "history"), redis_url=f"redis://127.0.0.1:{port}/0", redis_prefix="bench",
            worker_url=f"http://127.0.0.1:{free_port()}",  # nothing listens: the export opens the ledger itself
        )
        document["billing"]["stripe"] = {
            "customers": {f"cust-{i:04d}": f"cus_bench{i:04d}" for i in range(CUSTOMERS)}, "window": "day",
        }
        config = parse_config(document)
        print(f"seeding {args.events:,} events (+1 % duplicates) into {work / 'history'}", flush=True)
        seeded_s = seed(work / "history", args.events)
        seed_redis(config, work / "history", args.events)
        print(f"seeded in {seeded_s:.1f} s; Redis totals from the generator, not the ledger\n")
        print(f"{'format':<8} {'baseline s':>10} {'export s':>9} {'runs s':>14} {'added s':>8} {'output':>12} "
              f"{'lines':>8}  target <= {TARGET_S:.0f} s")
        print("(baseline: the same lines read, priced and rendered, no reconciliation; stripe has none)")
        for fmt in ("csv", "json", "stripe"):
            base = _best(args.runs, lambda: unreconciled(config, fmt))[0] if fmt != "stripe" else None  # noqa: B023
            best, times, result = _best(args.runs, lambda: run_export(config, MONTH, fmt, NOW))  # noqa: B023
            verdict = "ok" if best <= TARGET_S else "OVER"
            runs = " ".join(f"{t:.2f}" for t in times)
            shown = ("-", "-") if base is None else (f"{base:.2f}", f"{best - base:+.2f}")
            print(f"{fmt:<8} {shown[0]:>10} {best:>9.2f} {runs:>14} {shown[1]:>8} {len(result.text):>11,}B "
                  f"{result.lines:>8,}  {verdict}")
        print(f"\nreconciled: {result.customers} customers, ledger and Redis agree\n{result.summary}")
        drift_redis(config)
        try:
            run_export(config, MONTH, "csv", NOW)
        except ReconciliationFailed as refused:
            named = {problem.split(":")[0] for problem in refused.problems}
            print(f"\nafter drifting {len(DRIFTED)} customers in Redis: export refused, {len(refused.problems)} "
                  f"differences in {', '.join(sorted(named))}")
            for problem in refused.problems:
                print(f"  - {problem}")
            if named != set(DRIFTED):
                raise SystemExit(f"reconciliation named {sorted(named)}, expected {sorted(DRIFTED)}") from None
        else:
            raise SystemExit("reconciliation found no difference after Redis drifted")
    finally:
        redis_proc.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
