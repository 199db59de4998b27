"""The pipeline worker against a real broker, redis-server and chDB ledger.

The worker runs as a real ``quotameter worker`` process; events are produced
with aiokafka exactly as the shim produces them (key = customer id, Kafka
timestamp = event time).
"""

from __future__ import annotations

import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis
from aiokafka import AIOKafkaProducer

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.reader import ledger_usage
from pipeline.history.store import QueryRejected
from quotameter.aggregate import price_batch
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess
from quotameter.errors import QuotameterError
from quotameter.events import RequestData, UsageEvent, encode_event
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys

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


def http_json(url: str, body: str | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(url, data=body.encode() if body is not None else None)
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


def wait_for(check: Callable[[], Any], timeout_s: float = 15.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last value: {last!r}")


def worker_usage(config: Config, customer: str) -> dict[str, Any]:
    status, body = http_json(f"{config.services.worker_url}/usage?customer={customer}&period={PERIOD}")
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


async def test_worker_meters_events_into_redis_and_the_ledger(config_factory, cli_process) -> None:
    config, path = config_factory()
    worker = start_worker(cli_process, config, path, "worker")
    dup = make_event("dup-1", "dupco", input_tokens=10, output_tokens=10)
    await produce(
        config,
        [
            ("acme", b"{not json"),
            ("acme", json.dumps({"specversion": "1.0", "id": "broken"}).encode()),
            *ACME_EVENTS,
            dup,
        ],
    )
    await produce(config, [dup])  # a retried send: same id, a later offset

    usage = wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")
    assert subset(usage) == ACME_TOTALS
    assert subset(ledger_usage(config, "acme", PERIOD)) == ACME_TOTALS

    # Redis holds the same totals, as absolute values.
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    key = RedisKeys(config.services.redis_prefix).usage("acme", PERIOD)
    stored = wait_for(lambda: client.hgetall(key), what="the Redis usage hash")
    assert {name: stored[name] for name in ACME_TOTALS} == {k: str(v) for k, v in ACME_TOTALS.items()}
    assert int(stored["updated_ms"]) > 0

    # The malformed events were skipped with their reason, and processing went on.
    log = worker.log_path.read_text()
    assert log.count("skipping malformed event") == 2
    assert "Invalid JSON" in log and "data: Field required" in log

    # The duplicate counts once in the ledger, however the two copies were batched.
    wait_for(ledger_has(config, "dupco", 1), what="dupco in the ledger")
    time.sleep(1.0)  # give a second copy every chance to land
    dup_usage = ledger_usage(config, "dupco", PERIOD)
    assert (dup_usage["requests"], dup_usage["events"], dup_usage["cost_usd"]) == (1, 1, "0.000005000000")
    status, body = http_json(
        f"{config.services.worker_url}/query", "SELECT count() AS n FROM quotameter.events WHERE customer = 'dupco'"
    )
    assert status == 200 and body["rows"][0]["n"] >= 1  # raw rows: merges may not have run yet

    # /query is read-only.
    status, body = http_json(f"{config.services.worker_url}/query", "DROP TABLE quotameter.events")
    assert status == 400 and "SELECT" in body["error"]
    status, body = http_json(f"{config.services.worker_url}/usage?customer=acme&period=March")
    assert status == 400


async def test_stopped_worker_leaves_the_ledger_readable_and_a_restart_finds_it(config_factory, cli_process) -> None:
    config, path = config_factory()
    worker = start_worker(cli_process, config, path, "worker-1")
    await produce(config, ACME_EVENTS)
    wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")

    assert worker.stop(timeout_s=20, sig=signal.SIGTERM) == 0
    assert health_status(config) is None
    # No worker: ledger_usage opens the chDB directory itself (and releases it).
    assert subset(ledger_usage(config, "acme", PERIOD)) == ACME_TOTALS

    # Tansu numbers a fresh group's first generation 0, and aiokafka sends no
    # LeaveGroup for generation 0: this restart waits for worker-1's session
    # (10 s) to expire, so it takes ~20 s instead of ~7 s.
    worker = start_worker(cli_process, config, path, "worker-2")
    assert subset(worker_usage(config, "acme")) == ACME_TOTALS
    await produce(config, [make_event("acme-4", "acme", input_tokens=10, output_tokens=5)])
    usage = wait_for(ledger_has(config, "acme", 4), what="the new event in the ledger")
    assert (usage["requests"], usage["input_tokens"], usage["cost_usd"]) == (3, 3010, "0.000625500000")
    # Redis is rebuilt from the recovered month table: at least the ledger's
    # totals (at-least-once delivery may replay a few events into the table).
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    key = RedisKeys(config.services.redis_prefix).usage("acme", PERIOD)
    stored = wait_for(lambda: (h := client.hgetall(key)) and int(h["input_tokens"]) >= 3010 and h, what="Redis")
    assert int(stored["requests"]) >= 3 and Decimal(stored["cost_usd"]) >= Decimal("0.000625500000")
    assert worker.stop(timeout_s=20) == 0


def test_ledger_usage_names_both_causes_when_nothing_answers(config_factory) -> None:
    config, _ = config_factory()
    with pytest.raises(QuotameterError) as caught:
        ledger_usage(config, "acme", PERIOD)
    message = str(caught.value)
    assert config.services.worker_url in message and "no chDB ledger" in message


def test_chdb_ledger_counts_a_retried_batch_once(tmp_path: Path) -> None:
    prices = PriceTable([])
    batch = price_batch(ACME_EVENTS, prices)
    store = ChdbHistory(tmp_path / "history")
    try:
        store.insert_events(batch)
        store.insert_events(batch)  # the sink retried after a crash
        usage = store.usage("acme", PERIOD, "UTC")
        assert (usage["requests"], usage["refused"], usage["events"], usage["input_tokens"]) == (2, 1, 3, 3000)
        assert store.usage("acme", "2025-04", "UTC")["events"] == 0
        with pytest.raises(QueryRejected):
            store.query("DELETE FROM quotameter.events WHERE 1")
        assert store.query("SELECT uniqExact(id) AS n FROM quotameter.events")[0]["n"] == 3
    finally:
        store.close()
