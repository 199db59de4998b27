"""A burst of 1,000 concurrent clients against one shim process: every answer
is a 200 or a 429 the limits explain, never a 5xx or a failed connection, and
where the limits fix the outcome the number of 200s is exact.

Every client has its own key, so the burst also reaches Redis through the
shim's connection pool (each key's first request reads its record) and the
upstream through the shim's HTTP connector."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp
import pytest
import redis

from gateway_shim.keystore import create_key
from quotameter.tokens import count_prompt
from tests.integration.enforcement_helpers import MESSAGES, Shim, ShimFactory, shim_factory  # noqa: F401

pytestmark = pytest.mark.whole_machine  # run alone by make test (pyproject.toml)

CLIENTS = 1000
BURST_TIMEOUT_S = 45  # the whole burst, answers read to the end
TIERS = {
    "bursty": {"concurrent_requests": 100},
    "metered": {"monthly_tokens": 1_000_000},  # each customer's own quota below
}


@dataclass(frozen=True, slots=True)
class Answer:
    customer: str
    status: int  # 0: the connection failed
    code: str  # the error body's code, or the exception's name when the connection failed
    answered_at: float  # when the status line arrived
    done_at: float  # when the body was read to the end


def _keys(shim: Shim, customer: str, tier: str, count: int) -> list[str]:
    client = redis.Redis.from_url(shim.config.services.redis_url)
    try:
        return [create_key(client, shim.names, customer, tier).plaintext for _ in range(count)]
    finally:
        client.close()


async def _burst(shim: Shim, keys: list[tuple[str, str]], body: dict) -> list[Answer]:
    """One request per (customer, key), all released at once."""
    start = asyncio.Event()
    url = f"{shim.base_url}/chat/completions"

    async def one(session: aiohttp.ClientSession, customer: str, key: str) -> Answer:
        await start.wait()
        try:
            async with session.post(url, json=body, headers={"Authorization": f"Bearer {key}"}) as response:
                answered = time.monotonic()
                raw = await response.read()
                code = "" if response.status == 200 else json.loads(raw)["error"]["code"]
                return Answer(customer, response.status, code, answered, time.monotonic())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return Answer(customer, 0, type(exc).__name__, time.monotonic(), time.monotonic())

    # No client-side connection limit: 1,000 connections open at once.
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=BURST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [asyncio.create_task(one(session, customer, key)) for customer, key in keys]
        await asyncio.sleep(0.2)  # every task waiting at the gate
        start.set()
        return await asyncio.gather(*tasks)


def _counts(answers: list[Answer]) -> Counter[tuple[int, str]]:
    counts = Counter((a.status, a.code) for a in answers)
    print("burst answers (status, code): count ->", dict(sorted(counts.items())))
    return counts


async def test_burst_of_one_customer_is_held_to_its_concurrency(shim_factory: ShimFactory) -> None:
    # Streams of 10 tokens, one a second: an admitted request holds its slot ~10 s,
    # longer than the burst takes to be decided, so exactly 100 are admitted.
    shim = await shim_factory(TIERS, token_delay_ms=1000)
    keys = [("crowd", key) for key in _keys(shim, "crowd", "bursty", CLIENTS)]
    body = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 10, "stream": True}
    started = time.monotonic()
    answers = await _burst(shim, keys, body)
    counts = _counts(answers)
    first_end = min(a.done_at for a in answers if a.status == 200)
    last_refusal = max(a.answered_at for a in answers if a.status == 429)
    print(f"one customer: {CLIENTS} clients decided in {last_refusal - started:.1f}s, "
          f"answered in {time.monotonic() - started:.1f}s")

    assert counts == {(200, ""): 100, (429, "rate_limit_exceeded"): CLIENTS - 100}
    assert last_refusal < first_end, "the burst took longer to decide than a request holds its slot"
    assert "Too many connections" not in shim.process.log_tail(400)


async def test_burst_spread_over_customers_gets_exactly_each_quota(shim_factory: ShimFactory) -> None:
    body = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 4}
    # The mock reports exactly what admission reserves (the counted prompt and
    # max_tokens), so settling frees nothing and a quota of k requests admits k.
    per_request = count_prompt(body, "mock-small") + 4
    allowed = {"spread-a": 10, "spread-b": 25, "spread-c": 50, "spread-d": 100, "spread-e": 150}
    customers = {name: {"monthly_tokens": k * per_request} for name, k in allowed.items()}
    shim = await shim_factory(TIERS, customers=customers)
    share = CLIENTS // len(allowed)
    keys = [(name, key) for name in allowed for key in _keys(shim, name, "metered", share)]
    started = time.monotonic()
    answers = await _burst(shim, keys, body)
    counts = _counts(answers)
    print(f"{len(allowed)} customers: {CLIENTS} clients answered in {time.monotonic() - started:.1f}s")

    assert set(counts) <= {(200, ""), (429, "insufficient_quota")}, counts
    for name, k in allowed.items():
        admitted = sum(1 for a in answers if a.customer == name and a.status == 200)
        print(f"  {name}: {admitted} admitted of {share} (quota allows {k})")
        assert admitted == k, name
    assert counts[(200, "")] == sum(allowed.values())


async def test_burst_past_the_upstream_connection_limit_waits_for_a_connection(shim_factory: ShimFactory) -> None:
    # 200 streams of 3 tokens, 100 ms apart, through 10 upstream connections:
    # 20 turns of ~0.3 s. The requests past the limit wait; none gets a 502 or 504.
    shim = await shim_factory({"open": {}}, token_delay_ms=100, upstream={"max_connections": 10})
    keys = [("patient", key) for key in _keys(shim, "patient", "open", 200)]
    body = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 3, "stream": True}
    started = time.monotonic()
    answers = await _burst(shim, keys, body)
    counts = _counts(answers)
    elapsed = time.monotonic() - started
    print(f"200 streams over 10 upstream connections: answered in {elapsed:.1f}s")
    assert counts == {(200, ""): 200}
    assert elapsed > 3, "the upstream connection limit did not hold"


async def test_a_pool_too_small_for_the_burst_is_busy_not_an_outage(shim_factory: ShimFactory) -> None:
    # One pooled connection, a 1 ms wait: most of 300 first lookups find it busy.
    # That is 503 quota_backend_busy with Retry-After, and no fail mode applies.
    tiers = {"strict": {"fail_modes": {"requests_per_minute": "closed"}, "requests_per_minute": 10_000}}
    shim = await shim_factory(tiers, services={"redis_max_connections": 1, "redis_pool_timeout_ms": 1})
    keys = [("squeezed", key) for key in _keys(shim, "squeezed", "strict", 300)]
    body = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 1}
    counts = _counts(await _burst(shim, keys, body))
    assert set(counts) <= {(200, ""), (503, "quota_backend_busy")}, counts
    assert counts[(503, "quota_backend_busy")] > 0
    admission = (await shim.health())["admission"]
    assert admission["redis"] == "up" and admission["fail_mode_decisions"] == {}
    assert admission["busy_refusals"] == counts[(503, "quota_backend_busy")]
