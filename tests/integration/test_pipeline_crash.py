"""Exactness through crashes: SIGKILL the worker five times while events flow.

At the end the per-customer totals in the ledger, in Redis and in what was
produced match exactly, and the rollups match the ledger.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time
from datetime import timedelta
from typing import Any

from aiokafka import AIOKafkaProducer

from quotameter.config import Config
from quotameter.events import UsageEvent, encode_event
from tests.integration.pipeline_helpers import (
    AT,
    as_strings,
    expected_totals,
    http_json,
    make_event,
    redis_usage,
    start_worker,
    wait_for,
)

CUSTOMERS = [f"c{i:02d}" for i in range(12)]
MODELS = ["mock-small", "gpt-4o-mini", "gpt-4o", "unknown-model"]
FAST = {"pipeline": {"session_timeout_s": 4}}


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
    """Produces events until stopped, re-sending some (as a shim retrying after a lost ack)."""

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
            n = 0
            while not self.stop.is_set():
                for _ in range(int(self.rate_per_s / 10)):
                    event = random_event(rng, n) if n % 40 or not self.sent else rng.choice(self.sent[-500:])
                    n += 1
                    self.sent.append(event)
                    await producer.send(
                        self.config.services.events_topic, encode_event(event), key=event.customer_id.encode(), timestamp_ms=event.time_ms
                    )
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


async def test_five_sigkills_while_events_flow_leave_every_total_exact(config_factory, cli_process) -> None:
    config, path = config_factory(FAST)
    began = time.monotonic()
    worker = start_worker(cli_process, config, path, "worker-0")
    traffic = Traffic(config)
    flowing = asyncio.ensure_future(traffic.run())
    rng = random.Random(3)
    for kill in range(1, 6):
        await asyncio.sleep(rng.uniform(1.0, 2.5))
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
        print(f"kill {kill}: {len(traffic.sent)} events produced so far")
        worker = await asyncio.to_thread(start_worker, cli_process, config, path, f"worker-{kill}")
    await asyncio.sleep(1.0)
    traffic.stop.set()
    await flowing

    expected = {c: as_strings(t) for c, t in expected_totals(traffic.sent, config).items()}
    unique = sum(int(t["events"]) for t in expected.values())
    assert unique < len(traffic.sent)  # some were re-sent
    wait_for(lambda: sum(int(t["events"]) for t in ledger_totals(config).values()) >= unique, 60, "the ledger to catch up")
    try:
        wait_for(lambda: redis_totals(config, list(expected)) == expected, 30, "Redis to match what was produced")
    finally:
        ledger, in_redis = ledger_totals(config), redis_totals(config, list(expected))
        for customer in expected:
            if not (expected[customer] == ledger.get(customer) == in_redis.get(customer)):
                windows = http_json(f"{config.services.worker_url}/windows?customer={customer}")[1]
                print(f"{customer}\n  produced {expected[customer]}\n  ledger   {ledger.get(customer)}\n  redis    {in_redis.get(customer)}")
                print(f"  table    {windows.get('period', {}).get('b', {}).get('2025-03', {}).get('*')} wm {windows.get('period', {}).get('wm')} seed {windows.get('period', {}).get('seed')}")
    assert ledger_totals(config) == expected
    assert rollup_totals(config, "usage_hourly") == expected
    assert rollup_totals(config, "usage_daily") == expected
    print(f"{len(traffic.sent)} events ({unique} unique), 5 kills, exact; {time.monotonic() - began:.0f}s")
