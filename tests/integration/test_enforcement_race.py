"""Reserve-then-settle: zero overshoot under a race, and reservations that expire."""

from __future__ import annotations

import asyncio
import json
from decimal import Decimal

import openai
import pytest
from aiokafka import AIOKafkaConsumer

from quotameter.events import decode_event
from quotameter.pricing import PriceTable
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import unpacked

QUOTA_TOKENS = 1500
BUDGET_USD = "0.0002"  # 200 micro-USD; mock-large is priced at 1 + 4 USD per 1M below
TIERS = {
    "tight": {"monthly_tokens": QUOTA_TOKENS},
    "broke": {"monthly_budget_usd": BUDGET_USD},
    "slow": {"monthly_tokens": 200, "reservation_ttl_s": 1},
}
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]


async def _race(shim: Shim, customer: str, tier: str, model: str) -> list[bool]:
    async def one(i: int) -> bool:
        async with shim.client(shim.new_key(f"{customer}", tier)) as client:
            try:
                await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=20 + i % 7)
                return True
            except openai.RateLimitError as refused:
                assert refused.code == "insufficient_quota"
                return False

    return list(await asyncio.gather(*(one(i) for i in range(100))))


async def _events(shim: Shim, count: int) -> list:
    consumer = AIOKafkaConsumer(
        shim.config.services.events_topic, bootstrap_servers=shim.config.services.kafka_bootstrap,
        auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
    )
    await consumer.start()
    try:
        records: list = []
        for _ in range(100):
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(unpacked(batch))
            if len(records) >= count:
                break
        return [decode_event(r.value) for r in records]
    finally:
        await consumer.stop()


async def test_hundred_clients_never_pass_quota_or_budget(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, prices=PRICES)
    tokens_admitted = await _race(shim, "racer", "tight", "mock-small")
    budget_admitted = await _race(shim, "pauper", "broke", "mock-large")
    assert 0 < sum(tokens_admitted) < 100 and 0 < sum(budget_admitted) < 100

    events = await _events(shim, 200)
    assert len(events) == 200
    admitted = [e for e in events if e.data.decision == "admitted"]
    racer = [e.data for e in admitted if e.subject == "racer"]
    pauper = [e.data for e in admitted if e.subject == "pauper"]
    assert len(racer) == sum(tokens_admitted) and len(pauper) == sum(budget_admitted)
    used_tokens = sum(d.input_tokens + d.output_tokens for d in racer)
    prices = PriceTable(shim.config.prices)
    spent = sum(
        prices.cost("mock-large", e.time.date(), input_tokens=e.data.input_tokens, output_tokens=e.data.output_tokens).usd
        for e in admitted if e.subject == "pauper"
    )
    print(f"quota {QUOTA_TOKENS}: used {used_tokens} by {len(racer)}; budget {BUDGET_USD}: spent {spent}")
    assert used_tokens <= QUOTA_TOKENS
    assert spent <= Decimal(BUDGET_USD)
    # Nor refuse early: each refused request no longer fitted in what the
    # admitted ones used (their true usage is their worst case here), so what
    # is left is less than the largest request: 11 + 26 tokens, 11 + 4 × 26 µ$.
    largest_tokens = PROMPT_TOKENS + 26
    assert QUOTA_TOKENS - largest_tokens < used_tokens
    assert Decimal(BUDGET_USD) - spent < Decimal(PROMPT_TOKENS * 1 + 4 * 26) / 1_000_000
    assert all(d.input_tokens == PROMPT_TOKENS and d.output_tokens >= 20 for d in racer + pauper)
    # Settled before each event: the reservations now hold the true usage exactly.
    tokens, _, pending = shim.reserved("racer")
    assert tokens == used_tokens and len(pending) == len(racer)
    # The pipeline's step takes them over: totals written, reservations gone.
    shim.set_totals("racer", tokens=used_tokens, included=[e.id for e in admitted if e.subject == "racer"])
    assert shim.reserved("racer") == (0, 0, {})


async def test_reservation_of_a_request_that_never_finishes_expires(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, token_delay_ms=300)
    key = shim.new_key("stuck", "slow")
    async with shim.client(key, timeout=30) as client:
        # Worst case ~12 + 150 tokens of 200: a second such request cannot fit while it runs.
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=150, stream=True
        )
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=150)
        tokens, _, pending = shim.reserved("stuck")
        assert tokens > 150 and len(pending) == 1
        await asyncio.sleep(1.3)  # past reservation_ttl_s: the stuck request no longer holds it
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=150
        )
        assert raw.http_response.status_code == 200
        await stream.close()
    _, _, pending = shim.reserved("stuck")
    assert all(not json.loads("[" + v.replace(":", ",") + "]")[0] > 200 for v in pending.values())
