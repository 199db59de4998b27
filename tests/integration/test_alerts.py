"""Threshold alerts against a real redis-server, the real broker and a real
HTTP receiver (an aiohttp server on 127.0.0.1): once per threshold across
engines and restarts, signed, retried, on the alerts topic, listed by the CLI.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from redis.asyncio import Redis

from pipeline.alerts import AlertEngine, alert_topic
from pipeline.webhook import IDEMPOTENCY_HEADER, SIGNATURE_HEADER, verify_signature
from quotameter.alert_rules import alert_id
from quotameter.config import Config
from quotameter.redis_keys import RedisKeys

PERIOD = "2025-03"
SECRET = "whsec_integration"
SMALL_TIER = {"pro": {"monthly_tokens": 1000, "monthly_budget_usd": "2.00"}}
EXPECTED = {("tokens", 50), ("tokens", 80), ("tokens", 90), ("tokens", 100), ("budget", 50)}


@dataclass
class Receiver:
    """Records every POST; answers ``fail_first`` 500s per idempotency key, then 200."""

    url: str = ""
    fail_first: int = 0
    delay_s: float = 0.0
    requests: list[dict[str, Any]] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        seen = sum(1 for r in self.requests if r["key"] == key)
        self.requests.append({"key": key, "signature": request.headers.get(SIGNATURE_HEADER, ""), "body": body,
                              "at": time.time(), "content_type": request.headers.get("Content-Type")})
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if seen < self.fail_first:
            return web.Response(status=500, text="try again")
        return web.Response(status=200, text="ok")


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    app = web.Application()
    app.router.add_post("/hook", state.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    state.url = f"http://127.0.0.1:{port}/hook"
    yield state
    await runner.cleanup()


def alert_config(config_factory, receiver: Receiver, **alerts: Any) -> tuple[Config, Any]:
    settings = {"webhook_url": receiver.url, "webhook_secret": SECRET, "webhook_backoff_initial_s": 0.05,
                "webhook_backoff_max_s": 0.2, "webhook_max_attempts": 4, "webhook_timeout_s": 2} | alerts
    return config_factory({"tiers": SMALL_TIER, "alerts": settings})


class Worker:
    """What one pipeline worker holds: its own Redis client, producer and engine."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.redis = Redis.from_url(config.services.redis_url)
        self.producer = AIOKafkaProducer(bootstrap_servers=config.services.kafka_bootstrap)
        self.engine = AlertEngine.from_config(config, self.redis, self.producer)

    async def __aenter__(self) -> AlertEngine:
        await self.producer.start()
        return self.engine

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.close()
        await self.producer.stop()
        await self.redis.aclose()


async def consume_alerts(config: Config, count: int, timeout_s: float = 20.0) -> list[dict[str, Any]]:
    consumer = AIOKafkaConsumer(alert_topic(config), bootstrap_servers=config.services.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        records = []
        deadline = time.monotonic() + timeout_s
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300)).values():
                records.extend(batch)
        await asyncio.sleep(0.5)  # anything extra would show up now
        for batch in (await consumer.getmany(timeout_ms=300)).values():
            records.extend(batch)
        return [{"key": r.key.decode(), **json.loads(r.value)} for r in records]
    finally:
        await consumer.stop()


def cli_alerts(path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotameter", "alerts", *args, "--config", str(path)],
                          capture_output=True, text=True, timeout=60)


# Totals as batches would report them: growing, repeated, and past several
# thresholds at once.
STEPS = [(100, "0.10"), (499, "0.50"), (500, "0.60"), (500, "0.60"), (850, "0.99"), (850, "1.00"),
         (905, "1.20"), (905, "1.20"), (1200, "1.50"), (1200, "1.50")]


async def test_each_threshold_fires_once_across_two_workers_signed_retried_and_listed(config_factory, receiver):
    receiver.fail_first = 1  # every alert's first POST gets a 500
    config, path = alert_config(config_factory, receiver)

    async with Worker(config) as first, Worker(config) as second:
        async def feed(engine: AlertEngine) -> None:
            for tokens, usd in STEPS:
                await engine.observe("acme", PERIOD, "pro", tokens, Decimal(usd))
                await engine.observe("acme", PERIOD, "pro", tokens, Decimal(usd))  # a redelivered batch

        await asyncio.gather(feed(first), feed(second))
        assert first.claimed + second.claimed == len(EXPECTED)
    # close() waited for the deliveries in flight.

    ids = {alert_id("acme", PERIOD, kind, pct): (kind, pct) for kind, pct in EXPECTED}

    # Webhook: two attempts per alert (500, then 200), one key per alert, all signed.
    by_key = Counter(r["key"] for r in receiver.requests)
    assert by_key == {key: 2 for key in ids}
    for request in receiver.requests:
        assert request["content_type"] == "application/json"
        assert verify_signature(SECRET.encode(), request["body"], request["signature"], now_s=time.time())
        assert not verify_signature(b"wrong", request["body"], request["signature"], now_s=time.time())
        envelope = json.loads(request["body"])
        assert envelope["id"] == request["key"]
        assert (envelope["data"]["kind"], envelope["data"]["threshold_pct"]) == ids[request["key"]]
    for key in ids:
        bodies = {r["body"] for r in receiver.requests if r["key"] == key}
        assert len(bodies) == 1  # a retry resends the same bytes

    # Kafka: one event per alert, keyed by customer.
    events = await consume_alerts(config, len(EXPECTED))
    assert sorted(e["id"] for e in events) == sorted(ids)
    assert {e["key"] for e in events} == {"acme"}
    assert all(e["type"] == "quotameter.alert.v1" for e in events)
    budget = next(e for e in events if e["data"]["kind"] == "budget")
    assert budget["data"]["monthly_budget_usd"] == "2.000000000000"
    # Both workers feed the same growing totals: each alert carries the first total past its threshold.
    crossed = {(e["data"]["kind"], e["data"]["threshold_pct"]): e["data"].get("used_tokens", e["data"].get("spent_usd"))
               for e in events}
    assert crossed == {("tokens", 50): 500, ("tokens", 80): 850, ("tokens", 90): 905, ("tokens", 100): 1200,
                       ("budget", 50): "1.000000000000"}

    # The CLI lists them from Redis with their delivery state.
    out = cli_alerts(path, "--month", PERIOD, "--json")
    assert out.returncode == 0, out.stderr
    records = json.loads(out.stdout)
    assert {(r["alert"]["data"]["kind"], r["alert"]["data"]["threshold_pct"]) for r in records} == EXPECTED
    assert all(r["kafka"] == "sent" and r["webhook"] == "delivered" and r["webhook_attempts"] == 2 for r in records)
    text = cli_alerts(path, "--month", PERIOD, "--customer", "acme")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.strip().splitlines()
    assert len(lines) == len(EXPECTED) and all("acme" in line and "webhook=delivered" in line for line in lines)
    assert "tokens 80%" in text.stdout and "$" in text.stdout
    other = cli_alerts(path, "--month", PERIOD, "--customer", "nobody")
    assert other.returncode == 0 and "no alerts" in other.stdout
    bad = cli_alerts(path, "--month", "March")
    assert bad.returncode == 2

    # A restarted worker (nothing in memory) fires nothing again.
    before = len(receiver.requests)
    async with Worker(config) as restarted:
        for tokens, usd in STEPS:
            await restarted.observe("acme", PERIOD, "pro", tokens, Decimal(usd))
        assert restarted.claimed == 0
    assert len(receiver.requests) == before
    # ... while a new period starts over.
    async with Worker(config) as worker:
        await worker.observe("acme", "2025-04", "pro", 500, Decimal(0))
        assert worker.claimed == 1
    april = cli_alerts(path, "--month", "2025-04", "--json")
    assert [r["alert"]["data"]["threshold_pct"] for r in json.loads(april.stdout)] == [50]


async def test_a_webhook_that_keeps_failing_is_given_up_after_max_attempts(config_factory, receiver):
    receiver.fail_first = 100
    config, path = alert_config(config_factory, receiver, webhook_max_attempts=3)
    async with Worker(config) as engine:
        await engine.observe("bob", PERIOD, "pro", 500, Decimal(0))
    assert [r["key"] for r in receiver.requests] == [alert_id("bob", PERIOD, "tokens", 50)] * 3
    gaps = [b["at"] - a["at"] for a, b in zip(receiver.requests, receiver.requests[1:])]
    assert all(gap >= 0.02 for gap in gaps)  # backoff, not a tight loop
    [record] = json.loads(cli_alerts(path, "--month", PERIOD, "--json").stdout)
    assert record["webhook"] == "failed" and record["webhook_attempts"] == 3 and record["webhook_status"] == 500
    assert record["kafka"] == "sent"


async def test_observe_never_waits_for_the_webhook(config_factory, receiver):
    receiver.delay_s = 1.5
    config, _ = alert_config(config_factory, receiver)
    async with Worker(config) as engine:
        started = time.monotonic()
        await engine.observe("carol", PERIOD, "pro", 1000, Decimal("2.00"))
        assert time.monotonic() - started < 0.5
        assert engine.claimed == 8
    # close() waited for the slow receiver: every alert arrived.
    assert len({r["key"] for r in receiver.requests}) == 8


async def test_alerts_without_a_webhook_or_producer(config_factory, receiver):
    config, path = config_factory({"tiers": SMALL_TIER})  # no webhook configured
    client = Redis.from_url(config.services.redis_url)
    engine = AlertEngine.from_config(config, client, None)
    await engine.observe("dave", PERIOD, "pro", 0, Decimal("1.80"))
    await engine.close()
    await client.aclose()
    records = json.loads(cli_alerts(path, "--month", PERIOD, "--json").stdout)
    assert [r["alert"]["data"]["threshold_pct"] for r in records] == [50, 80, 90]  # 1.80 of 2.00
    assert all((r["kafka"], r["webhook"]) == ("off", "off") for r in records)
    keys = RedisKeys(config.services.redis_prefix)
    client = Redis.from_url(config.services.redis_url)
    assert await client.ttl(keys.alert("dave", PERIOD, "budget", 50)) > 86_400 * 300  # outlives the period
    await client.aclose()
