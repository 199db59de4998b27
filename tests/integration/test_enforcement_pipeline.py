"""Enforcement with the real worker behind it: the shim's reservations are
released by the pipeline's totals, those totals equal the ledger, and a
customer whose period quota is used up through them is refused."""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest

from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for

OUTPUT_TOKENS = 10
PER_REQUEST = PROMPT_TOKENS + OUTPUT_TOKENS
QUOTA = 3 * PER_REQUEST  # three requests fit exactly; a fourth cannot
TIERS = {"capped": {"monthly_tokens": QUOTA, "upgrade_hint": "Upgrade to Pro."}}
# mock-small: $0.10 in, $0.40 out per 1M tokens
COST_USD = f"{(3 * PROMPT_TOKENS * 10 + 3 * OUTPUT_TOKENS * 40) / 100 / 1_000_000:.12f}"
TOTALS = ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "cost_usd", "events")


def redis_totals(shim: Shim, customer: str) -> dict[str, str]:
    client = shim.redis()
    try:
        return client.hgetall(shim.names.usage(customer, shim.period()))
    finally:
        client.close()


def pending_state(shim: Shim, customer: str) -> dict[str, Any]:
    client = shim.redis()
    try:
        n, p = shim.names, shim.period()
        return {
            "reserved": client.hgetall(n.reserved(customer, p)),
            "pending": client.hgetall(n.pending(customer, p)),
            "expiry": client.zrange(n.pending_expiry(customer, p), 0, -1),
        }
    finally:
        client.close()


def ledger_totals(shim: Shim, customer: str) -> dict[str, str]:
    status, body = http_json(f"{shim.config.services.worker_url}/usage?customer={customer}&period={shim.period()}")
    assert status == 200, body
    return {name: str(body[name]) for name in TOTALS}


async def test_the_worker_releases_reservations_and_its_totals_enforce_the_quota(
    shim_factory: ShimFactory, cli_process
) -> None:
    shim = await shim_factory(TIERS)
    key = shim.new_key("metered", "capped")
    async with shim.client(key) as client:
        for streamed in (False, True, False):
            if streamed:
                stream = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=OUTPUT_TOKENS, stream=True,
                    stream_options={"include_usage": True},
                )
                usage = [chunk async for chunk in stream][-1].usage
            else:
                usage = (await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=OUTPUT_TOKENS)).usage
            assert (usage.prompt_tokens, usage.completion_tokens) == (PROMPT_TOKENS, OUTPUT_TOKENS)

    # No worker yet: the settled reservations alone hold the customer's usage.
    held = pending_state(shim, "metered")
    # Each settled at its true usage: 21 tokens, 1.1 µ$ in (rounded up to 2) + 4 µ$ out.
    assert held["reserved"] == {"tokens": str(QUOTA), "micro_usd": "18"}
    assert list(held["pending"].values()) == [f"{PER_REQUEST}:6"] * 3
    assert sorted(held["expiry"]) == sorted(held["pending"])
    assert redis_totals(shim, "metered") == {}

    worker = await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
    stored = await asyncio.to_thread(
        wait_for, lambda: (h := redis_totals(shim, "metered")) and h.get("events") == "3" and h, 45, "the worker's totals"
    )
    expected = {"requests": "3", "refused": "0", "input_tokens": str(3 * PROMPT_TOKENS),
                "output_tokens": str(3 * OUTPUT_TOKENS), "cached_tokens": "0", "reasoning_tokens": "0",
                "cost_usd": COST_USD, "events": "3"}
    assert {name: stored[name] for name in TOTALS} == expected
    # Released in the same step that wrote the totals that include them.
    assert pending_state(shim, "metered") == {"reserved": {"tokens": "0", "micro_usd": "0"}, "pending": {}, "expiry": []}
    # Redis is written before the ledger (the ledger's insert acks the batch): wait for it.
    await asyncio.to_thread(wait_for, lambda: ledger_totals(shim, "metered") == expected, 15, "the ledger")

    # Nothing is reserved any more: only the worker's totals can hold this back.
    async with shim.client(key) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
    error = refused.value
    assert error.code == "insufficient_quota" and error.status_code == 429
    assert f"Capped tier limit exceeded: {QUOTA} tokens per billing period" in error.message
    assert error.message.endswith("Upgrade to Pro.")

    # The refusal is metered too, and Redis still equals the ledger.
    expected |= {"refused": "1", "events": "4"}
    stored = await asyncio.to_thread(
        wait_for, lambda: (h := redis_totals(shim, "metered")) and h.get("events") == "4" and h, 30, "the refusal's event"
    )
    assert {name: stored[name] for name in TOTALS} == expected
    await asyncio.to_thread(wait_for, lambda: ledger_totals(shim, "metered") == expected, 15, "the ledger")
    assert pending_state(shim, "metered")["pending"] == {}
    assert worker.alive()
