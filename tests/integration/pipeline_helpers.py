"""Shared by the pipeline tests: events, producing them as the shim does
(key = customer id, Kafka timestamp = event time), starting workers as real
``quotameter worker`` processes, and reading what they wrote."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from gateway_shim.kafka_records import kafka_records
from gateway_shim.spool import SpoolRecord
from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.reader import ledger_usage
from pipeline.history.store import QueryRejected
from pipeline.usage_agent import partition_of
from quotameter.aggregate import format_usd, price_batch
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess
from quotameter.errors import QuotameterError
from quotameter.delivery import delivery_headers, read_seqs
from quotameter.event_batch import is_batch
from quotameter.events import RequestData, UsageEvent, encode_event, traceparent_of
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import sync_redis
from quotameter.service_auth import TokenGate

AT = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
PERIOD = "2025-03"
READY_LINE = "quotameter worker ready"
WORKER_READY_TIMEOUT_S = 60.0


def make_event(id: str, customer: str, model: str = "mock-small", decision: str = "admitted", **tokens: int) -> UsageEvent:
    return UsageEvent(
        id=id,
        source="test-shim",
        subject=customer,
        time=AT,
        data=RequestData(
            api_key_id=f"key-{customer}",
            tier="pro",
            route="/v1/chat/completions",
            status=200 if decision == "admitted" else 429,
            decision=decision,
            reason=None if decision == "admitted" else "requests_per_minute",
            model_requested=model,
            model_served=model if decision == "admitted" else None,
            usage_source="upstream" if decision == "admitted" else "none",
            latency_ms=12.5,
            **tokens,
        ),
    )


async def produce(config: Config, items: list[UsageEvent | tuple[str, bytes]]) -> None:
    """Send events (or raw ``(customer, bytes)`` pairs) in order, as the shim does."""
    producer = AIOKafkaProducer(bootstrap_servers=config.services.kafka_bootstrap)
    await producer.start()
    try:
        for item in items:
            if isinstance(item, UsageEvent):
                key, value, ts = item.customer_id.encode(), encode_event(item), item.time_ms
            else:
                key, value, ts = item[0].encode(), item[1], int(AT.timestamp() * 1000)
            await producer.send_and_wait(config.services.events_topic, value, key=key, timestamp_ms=ts)
    finally:
        await producer.stop()


def http_json(url: str, body: str | None = None, config: Config | None = None) -> tuple[int, Any]:
    """``config``: send its services.admin_token, as the CLI does."""
    headers = TokenGate.from_services(config.services).headers() if config is not None else {}
    request = urllib.request.Request(url, data=body.encode() if body is not None else None, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


def health_status(config: Config) -> int | None:
    try:
        return http_json(f"{config.services.worker_url}/healthz")[0]
    except (urllib.error.URLError, OSError):
        return None


def start_worker(cli_process: Callable[..., ManagedProcess], config: Config, path: Path, name: str) -> ManagedProcess:
    began = time.monotonic()
    proc = cli_process(name, "worker", config_path=path)
    proc.wait_until(lambda: health_status(config) == 200, WORKER_READY_TIMEOUT_S, "/healthz 200")
    # The line is printed before /healthz turns 200, exactly once.
    assert proc.log_path.read_text().count(READY_LINE) == 1
    print(f"{name} ready in {time.monotonic() - began:.1f}s")
    return proc


def wait_for(check: Callable[[], Any], timeout_s: float = 45.0, what: str = "condition") -> Any:
    """``check()``'s first truthy value, asked every 0.1 s. The default is
    generous: a check that passes returns at once, and beside the suite's other
    workers on two cores an event can take well over 15 s to reach the ledger."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def worker_usage(config: Config, customer: str) -> dict[str, Any]:
    status, body = http_json(f"{config.services.worker_url}/usage?customer={customer}&period={PERIOD}", config=config)
    assert status == 200, body
    return body


def ledger_has(config: Config, customer: str, events: int) -> Callable[[], dict[str, Any] | None]:
    def check() -> dict[str, Any] | None:
        usage = worker_usage(config, customer)
        return usage if usage["events"] >= events else None

    return check


ACME_EVENTS = [
    make_event("acme-1", "acme", input_tokens=1000, output_tokens=200),
    make_event("acme-2", "acme", model="gpt-4o-mini", input_tokens=2000, output_tokens=300, cached_tokens=500, reasoning_tokens=40),
    make_event("acme-3", "acme", decision="refused"),
]
# mock-small: 1000 × 0.10 + 200 × 0.40 = 180 µ$; gpt-4o-mini: 1500 × 0.15 + 500 × 0.075 + 300 × 0.60 = 442.5 µ$
ACME_TOTALS = {
    "requests": 2,
    "refused": 1,
    "input_tokens": 3000,
    "output_tokens": 500,
    "cached_tokens": 500,
    "reasoning_tokens": 40,
    "cost_usd": "0.000622500000",
    "events": 3,
}


def subset(usage: dict[str, Any]) -> dict[str, Any]:
    return {name: usage[name] for name in ACME_TOTALS}




def redis_usage(config: Config, customer: str, period: str = PERIOD) -> dict[str, str]:
    client = sync_redis(config.services, decode_responses=True)
    try:
        return client.hgetall(RedisKeys(config.services.redis_prefix).usage(customer, period))
    finally:
        client.close()


def expected_totals(events: list[UsageEvent], config: Config) -> dict[str, dict[str, Any]]:
    """customer -> the exact totals of the unique events (what billing must show)."""
    prices = PriceTable(list(config.prices), config.default_price)
    out: dict[str, dict[str, Any]] = {}
    for priced in price_batch(events, prices):
        row = out.setdefault(priced.event.customer_id, {k: 0 for k in ACME_TOTALS} | {"cost_usd": Decimal(0)})
        totals = priced.totals
        for name in ACME_TOTALS:
            row[name] += getattr(totals, name)
    for row in out.values():
        row["cost_usd"] = format_usd(row["cost_usd"])
    return out


def as_strings(totals: dict[str, Any]) -> dict[str, str]:
    return {name: str(totals[name]) for name in ACME_TOTALS}


def unpacked(records: Iterable[Any]) -> list[Any]:
    """One record per event: a record carrying a batch (as the shim sends a
    burst) becomes a copy per event, valued with that event's exact bytes,
    keyed by its customer and with the headers (spool seq, trace context) a
    record of its own would carry."""
    out: list[Any] = []
    for record in records:
        if not isinstance(record.value, bytes) or not is_batch(record.value):
            out.append(record)
            continue
        spool = read_seqs(record.headers)
        text, decoder = record.value.decode(), json.JSONDecoder()
        at, index = text.index("[") + 1, 0
        while True:
            at += len(text[at:]) - len(text[at:].lstrip(" ,\n\t"))
            if text[at] == "]":
                break
            event, end = decoder.raw_decode(text, at)
            value = text[at:end].encode()
            headers = [] if spool is None else delivery_headers(spool[0].encode(), spool[1][index])
            index += 1
            if (traceparent := traceparent_of(value)) is not None:
                headers.append(("traceparent", traceparent))
            out.append(dataclasses.replace(record, value=value, key=event["subject"].encode(), headers=tuple(headers)))
            at = end
    return out


async def read_topic(
    bootstrap: str, topic: str, count: int, timeout_s: float = 20.0, keys: set[bytes] | None = None
) -> list[Any]:
    """The first ``count`` records of ``topic`` (fewer if it times out); with ``keys``,
    of those records only (e.g. the events of some customers)."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list[Any] = []
    try:
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for partition_records in batch.values():
                records.extend(r for r in unpacked(partition_records) if keys is None or r.key in keys)
    finally:
        await consumer.stop()
    return records


# ---------------------------------------------------------------- traffic while workers crash

CUSTOMERS = [f"c{i:02d}" for i in range(12)]
MODELS = ["mock-small", "gpt-4o-mini", "gpt-4o", "unknown-model"]
FAST_REJOIN = {"pipeline": {"session_timeout_s": 4}}  # a killed worker's partitions move on sooner


def random_event(rng: random.Random, n: int) -> UsageEvent:
    refused = rng.random() < 0.1
    return make_event(
        f"ev-{n:06d}",
        rng.choice(CUSTOMERS),
        model=rng.choice(MODELS),
        decision="refused" if refused else "admitted",
        **({} if refused else {"input_tokens": rng.randint(1, 5000), "output_tokens": rng.randint(0, 900), "cached_tokens": rng.randint(0, 1)}),
    ).model_copy(update={"time": AT + timedelta(seconds=n)})


class Traffic:
    """Produces events until stopped, re-sending some (as a shim retrying after a
    lost ack); every other tick's events go as the shim sends a burst (one batch
    record per partition, gateway_shim.kafka_records), the others one per record."""

    def __init__(self, config: Config, rate_per_s: float = 150) -> None:
        self.config = config
        self.rate_per_s = rate_per_s
        self.sent: list[UsageEvent] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        rng = random.Random(7)
        producer = AIOKafkaProducer(bootstrap_servers=self.config.services.kafka_bootstrap, linger_ms=5)
        await producer.start()
        try:
            n = ticks = 0
            topic = self.config.services.events_topic
            while not self.stop.is_set():
                ticks += 1
                tick: list[UsageEvent] = []
                for _ in range(int(self.rate_per_s / 10)):
                    event = random_event(rng, n) if n % 40 or not self.sent else rng.choice(self.sent[-500:])
                    n += 1
                    self.sent.append(event)
                    tick.append(event)
                if ticks % 2:
                    count = len(await producer.partitions_for(topic))
                    by_partition: dict[int, list[SpoolRecord]] = {}
                    for seq, event in enumerate(tick, start=n - len(tick)):
                        key = event.customer_id.encode()
                        by_partition.setdefault(partition_of(key, count), []).append(
                            SpoolRecord(seq, key, event.time_ms, encode_event(event)))
                    for partition, spooled in by_partition.items():
                        for r in kafka_records(b"traffic", spooled):
                            await producer.send(topic, r.value, key=r.key, partition=partition,
                                                timestamp_ms=r.timestamp_ms, headers=r.headers)
                else:
                    for event in tick:
                        await producer.send(topic, encode_event(event), key=event.customer_id.encode(), timestamp_ms=event.time_ms)
                await asyncio.sleep(0.1)
            await producer.flush()
        finally:
            await producer.stop()


def ledger_totals(config: Config) -> dict[str, dict[str, str]]:
    status, body = http_json(
        f"{config.services.worker_url}/query",
        """SELECT customer, countIf(decision = 'admitted') AS requests, countIf(decision != 'admitted') AS refused,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens,
           sum(reasoning_tokens) AS reasoning_tokens, toString(sum(cost_usd)) AS cost_usd, count() AS events
           FROM quotameter.events FINAL GROUP BY customer""",
    )
    assert status == 200, body
    return {row.pop("customer"): normalize(row) for row in body["rows"]}


def raw_rows(config: Config) -> dict[str, int]:
    """Rows and distinct ids in the ledger, without FINAL."""
    status, body = http_json(
        f"{config.services.worker_url}/query", "SELECT count() AS rows, uniqExact(id) AS ids FROM quotameter.events"
    )
    assert status == 200, body
    return {name: int(value) for name, value in body["rows"][0].items()}


def rollup_totals(config: Config, view: str) -> dict[str, dict[str, str]]:
    status, body = http_json(
        f"{config.services.worker_url}/query",
        f"""SELECT customer, sum(requests) AS requests, sum(refused) AS refused, sum(input_tokens) AS input_tokens,
            sum(output_tokens) AS output_tokens, sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
            toString(sum(cost_usd)) AS cost_usd, sum(events) AS events FROM quotameter.{view} GROUP BY customer""",
    )
    assert status == 200, body
    return {row.pop("customer"): normalize(row) for row in body["rows"]}


def normalize(row: dict[str, Any]) -> dict[str, str]:
    from decimal import Decimal

    from quotameter.aggregate import format_usd

    return {k: format_usd(Decimal(str(v))) if k == "cost_usd" else str(int(v)) for k, v in row.items()}


def redis_totals(config: Config, customers: list[str]) -> dict[str, dict[str, str]]:
    return {c: {k: v for k, v in redis_usage(config, c).items() if k in ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "events")} for c in customers}


def assert_exact(config: Config, sent: list[UsageEvent], timeout_s: float = 60.0) -> int:
    """Wait for the ledger to hold every unique event of ``sent``, then check
    the ledger, Redis and both rollups against what was produced, exactly.
    Returns the number of unique events."""
    expected = {c: as_strings(t) for c, t in expected_totals(sent, config).items()}
    unique = sum(int(t["events"]) for t in expected.values())
    assert unique < len(sent)  # some were re-sent
    wait_for(lambda: sum(int(t["events"]) for t in ledger_totals(config).values()) >= unique, timeout_s, "the ledger to catch up")
    try:
        wait_for(lambda: redis_totals(config, list(expected)) == expected, 30, "Redis to match what was produced")
    finally:
        ledger, in_redis = ledger_totals(config), redis_totals(config, list(expected))
        for customer in expected:
            if not (expected[customer] == ledger.get(customer) == in_redis.get(customer)):
                print(f"{customer}\n  produced {expected[customer]}\n  ledger   {ledger.get(customer)}\n  redis    {in_redis.get(customer)}")
    assert ledger_totals(config) == expected
    # FINAL above collapses duplicate rows at read time; the sink must not
    # have written any (the rollups would count them), so check the raw rows.
    assert raw_rows(config) == {"rows": unique, "ids": unique}
    assert rollup_totals(config, "usage_hourly") == expected
    assert rollup_totals(config, "usage_daily") == expected
    return unique
