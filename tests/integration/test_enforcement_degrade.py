"""Degrading instead of refusing: the mid-stream budget cut, the fallback
model, and the batch queue."""

from __future__ import annotations

import asyncio
import time

import openai
import pytest

from quotameter.embedded.mock_llm import completion_pieces
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_enforcement_race import _events

PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    "hard": {"monthly_budget_usd": "0.0001", "cut_streams": True, "upgrade_hint": "Upgrade to Pro."},
    "thrifty": {"monthly_budget_usd": "0.001", "fallback": {"model": "mock-small", "extra_budget_usd": "0.01"}},
    "batchy": {
        "concurrent_requests": 2,
        "queue": {"max_wait_s": 5, "max_depth": 3, "interactive_reserved_concurrency": 1},
    },
    "impatient": {"concurrent_requests": 1, "queue": {"max_wait_s": 0.3}},
}


async def test_stream_is_cut_cleanly_at_the_hard_budget(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, prices=PRICES)
    shim.set_totals("edge", micro_usd=50)  # 50 micro-USD left: the prompt, then 4 per output token
    async with shim.client(shim.new_key("edge", "hard")) as client:
        stream = await client.chat.completions.create(model="mock-large", messages=MESSAGES, stream=True)
        chunks = []
        with pytest.raises(openai.APIError) as cut:
            async for chunk in stream:
                chunks.append(chunk)
    assert "budget reached" in cut.value.message and "Upgrade to Pro." in cut.value.message
    assert cut.value.body["code"] == "budget_exceeded"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    delivered = len(text.split())
    assert 0 < delivered < 16 and text == "".join(completion_pieces(delivered))
    assert chunks[-1].choices[0].finish_reason == "length"

    [event] = await _events(shim, 1)
    assert event.data.reason == "budget_cut" and event.data.output_tokens == delivered
    assert event.data.input_tokens == PROMPT_TOKENS
    input_micro = PROMPT_TOKENS * 1
    assert input_micro + 4 * delivered <= 50 < input_micro + 4 * (delivered + 1)  # cut exactly at the budget


async def test_budget_spent_falls_back_to_the_cheaper_model(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, prices=PRICES)
    shim.set_totals("frugal", micro_usd=1000)  # the budget is spent
    async with shim.client(shim.new_key("frugal", "thrifty")) as client:
        completion = await client.chat.completions.create(model="mock-large", messages=MESSAGES, max_tokens=3)
    assert completion.model == "mock-small"
    [event] = await _events(shim, 1)
    assert event.data.model_requested == "mock-large" and event.data.model_served == "mock-small"
    assert event.data.reason == "fallback" and event.data.decision == "admitted"


async def test_batch_waits_in_a_fair_bounded_queue_and_interactive_never_waits(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, token_delay_ms=50)
    batch_key = shim.new_key("factory", "batchy", priority="batch")
    started: dict[str, float] = {}
    finished: dict[str, float] = {}
    streaming: dict[str, asyncio.Event] = {}

    async def request(name: str, key: str, tokens: int = 6) -> None:
        started[name] = time.monotonic()
        streaming[name] = asyncio.Event()
        async with shim.client(key) as client:  # streamed: the mock paces streams only
            stream = await client.chat.completions.create(
                model="mock-small", messages=MESSAGES, max_tokens=tokens, stream=True
            )
            streaming[name].set()
            _ = [chunk async for chunk in stream]
        finished[name] = time.monotonic()

    async def queue_depth_is(depth: int) -> None:
        deadline = time.monotonic() + 10
        while (await shim.health())["admission"]["queue"]["depth"] != depth:
            assert time.monotonic() < deadline, f"the batch queue never held {depth}"
            await asyncio.sleep(0.02)

    # One runs (one slot is kept for interactive traffic), long enough for
    # three more to line up behind it in order.
    batch = [asyncio.create_task(request("b0", batch_key, tokens=40))]
    while "b0" not in streaming:
        await asyncio.sleep(0)
    await asyncio.wait_for(streaming["b0"].wait(), 10)
    for i in range(1, 4):
        batch.append(asyncio.create_task(request(f"b{i}", batch_key)))
        await queue_depth_is(i)
    async with shim.client(batch_key) as client:
        with pytest.raises(openai.RateLimitError) as full:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
    assert "queue is full" in full.value.message
    interactive_key = shim.new_key("factory", "batchy")
    await request("interactive", interactive_key, tokens=1)
    await asyncio.gather(*batch)
    order = sorted(finished, key=finished.get)
    # Measured from its own start: the batch requests' staggered starts are not its wait.
    assert order[0] == "interactive" and finished["interactive"] - started["interactive"] < 0.5
    assert [n for n in order if n.startswith("b")] == ["b0", "b1", "b2", "b3"]

    events = await _events(shim, 6)
    queued = [e.data for e in events if e.data.reason == "queued"]
    assert len(queued) == 3 and all(d.queued_ms and d.queued_ms > 100 for d in queued)
    [interactive] = [e.data for e in events if e.data.api_key_id == interactive_key.split("_")[1]]
    assert (interactive.decision, interactive.reason, interactive.queued_ms) == ("admitted", None, None)
    assert [e.data.reason for e in events].count("queue_full") == 1


async def test_batch_queue_refuses_after_max_wait(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, token_delay_ms=100)
    key = shim.new_key("hurried", "impatient", priority="batch")
    async with shim.client(key) as client:
        stream = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=10, stream=True)
        started = time.monotonic()
        with pytest.raises(openai.RateLimitError) as timed_out:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        waited = time.monotonic() - started
        await stream.close()
    assert 0.3 <= waited < 1.0 and "Waited 0.3s in the batch queue" in timed_out.value.message
