"""A batch key over its period quota: queued while the customer's requests in
flight on this shim still hold reservations that may settle lower, served
once they do; refused at once when nothing running can free the quota."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from quotameter.tokens import count_prompt
from tests.integration.enforcement_helpers import MESSAGES, ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_enforcement_race import _events

# Without max_tokens a request reserves the tier's default cap (50 output
# tokens), and the mock answers 16: each settles 34 tokens below its reservation.
RESERVED_OUT, ANSWERED_OUT = 50, 16
PROMPT = count_prompt({"messages": MESSAGES}, "mock-small")
QUOTA = 2 * PROMPT + RESERVED_OUT + ANSWERED_OUT + 10  # two fit only once the first settled
TIERS = {"batchquota": {"monthly_tokens": QUOTA, "default_max_tokens": RESERVED_OUT, "queue": {"max_wait_s": 10}}}


async def test_batch_over_quota_waits_for_a_running_request_to_settle(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, token_delay_ms=100)  # the first request streams for ~1.6 s
    interactive, batch = shim.new_key("nightly", "batchquota"), shim.new_key("nightly", "batchquota", priority="batch")
    async with shim.client(interactive) as first_client, shim.client(batch) as batch_client:
        stream = await first_client.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)
        first = asyncio.create_task(_drain(stream))
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:  # an interactive key is refused at once
            await first_client.chat.completions.create(model="mock-small", messages=MESSAGES)
        assert refused.value.code == "insufficient_quota" and time.monotonic() - started < 1
        completion = await batch_client.chat.completions.create(model="mock-small", messages=MESSAGES)
        batch_done = time.monotonic()
        first_ended = await first
    assert completion.usage is not None and completion.usage.completion_tokens == ANSWERED_OUT
    assert batch_done > first_ended  # admitted only once the first request settled

    events = {e.data.reason: e.data for e in await _events(shim, 3)}
    assert events["queued"].status == 200 and events["queued"].queued_ms > 500
    assert events["quota_tokens"].status == 429


async def test_batch_over_a_spent_quota_is_refused_without_waiting(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS)
    shim.set_totals("spent", tokens=QUOTA)  # nothing in flight: nothing can free it before the reset
    async with shim.client(shim.new_key("spent", "batchquota", priority="batch")) as client:
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES)
    assert refused.value.code == "insufficient_quota" and time.monotonic() - started < 1
    assert "Batchquota tier limit exceeded" in refused.value.message


async def _drain(stream: openai.AsyncStream) -> float:
    _ = [chunk async for chunk in stream]
    return time.monotonic()
