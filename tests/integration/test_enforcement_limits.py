"""Each limit kind through the real shim: its refusal, its answer and its headers."""

from __future__ import annotations

import openai
import pytest

from tests.integration.enforcement_helpers import (  # noqa: F401
    MESSAGES,
    PROMPT_TOKENS,
    ShimFactory,
    shim_factory,
    until_a_slot_is_free,
)

TIERS = {
    "metered": {
        "requests_per_minute": 100,
        "tokens_per_minute": 250,
        "upgrade_hint": "Upgrade to Pro.",
        "models": {"mock-large": {"requests_per_minute": 1}},
        "allowed_models": ["mock-small", "mock-large"],
    },
    "sliding": {"requests_per_minute": 2, "rate_algorithm": "sliding_window"},
    "single": {"concurrent_requests": 1},
    "quota": {"monthly_tokens": 1000, "upgrade_hint": "Upgrade to Enterprise."},
    "prepaid": {"monthly_budget_usd": "0.001", "quota_status": 402, "upgrade_hint": "Top up your balance."},
}


async def test_tokens_per_minute_and_every_header(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS)
    key = shim.new_key("tok", "metered")
    async with shim.client(key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=100
        )
        h = raw.headers
        assert (h["x-ratelimit-limit-requests"], h["x-ratelimit-remaining-requests"]) == ("100", "99")
        assert h["x-ratelimit-limit-tokens"] == "250"
        # Worst case charged at admission: the prompt + 100.
        assert h["x-ratelimit-remaining-tokens"] == str(250 - PROMPT_TOKENS - 100)
        assert h["RateLimit-Policy"].startswith('"requests";q=100;w=60, "tokens";q=250;w=60;qu="tokens"')
        assert '"mock-large-requests"' not in h["RateLimit-Policy"]  # per-model rules only for that model
        assert h["RateLimit"].startswith('"requests";r=99;t=')
        # max_tokens 200 + the prompt no longer fits in what is left of 250/min.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=200)
        error = refused.value
        assert error.code == "rate_limit_exceeded" and error.body["type"] == "tokens"
        assert "250 tokens per minute" in error.message and "needs up to" in error.message
        assert "Metered tier" in error.message and "Upgrade to Pro." in error.message
        retry = int(error.response.headers["Retry-After"])
        assert 1 <= retry <= 60 and error.response.headers["x-ratelimit-limit-tokens"] == "250"
        # Larger than the limit could ever admit: no Retry-After to wait for.
        with pytest.raises(openai.RateLimitError) as huge:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5000)
        assert "can ever admit" in huge.value.message and "Retry-After" not in huge.value.response.headers
        # Per-model limit: mock-large allows 1 request/min on this tier.
        await client.chat.completions.create(model="mock-large", messages=MESSAGES, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as per_model:
            await client.chat.completions.create(model="mock-large", messages=MESSAGES, max_tokens=1)
        assert "for model mock-large" in per_model.value.message
        # A model outside the tier's list.
        with pytest.raises(openai.PermissionDeniedError) as denied:
            await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1)
        assert denied.value.code == "model_not_allowed" and "Upgrade to Pro." in denied.value.message


async def test_sliding_window_key_override_and_remembered_refusals(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, customers={"vip": {"requests_per_minute": 4}})
    async with shim.client(shim.new_key("slider", "sliding")) as client:
        for _ in range(2):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        for attempt in range(3):
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            assert "2 requests per minute (used 2)" in refused.value.message
            assert 1 <= int(refused.value.response.headers["Retry-After"]) <= 120
    # The retries after the first refusal were answered from memory, without Redis.
    assert (await shim.health())["admission"]["remembered_refusals_served"] == 2
    # A customer override raises the tier's 2/min to 4/min; a key override holds one key at 1/min.
    async with shim.client(shim.new_key("vip", "sliding")) as client:
        for _ in range(4):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
    async with shim.client(shim.new_key("keyed", "metered", requests_per_minute=1)) as client:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert "1 requests per minute for key" in refused.value.message
        assert '"key-requests";q=1;w=60' in refused.value.response.headers["RateLimit-Policy"]


async def test_concurrency_limit(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, token_delay_ms=40)
    key = shim.new_key("busy", "single")
    async with shim.client(key) as client:
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=15, stream=True
        )
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert "1 concurrent requests (in flight: 1)" in refused.value.message
        assert refused.value.response.headers["RateLimit"] == '"concurrency";r=0;t=1'
        assert 'qu="concurrent-requests"' in refused.value.response.headers["RateLimit-Policy"]
        _ = [chunk async for chunk in stream]
        # The slot is given back when the stream's end is settled, just after
        # the client saw it: wait for that, not for a slot's expiry.
        await until_a_slot_is_free(client)


async def test_period_quota_and_budget(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS)
    shim.set_totals("heavy", tokens=990)
    async with shim.client(shim.new_key("heavy", "quota")) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=50)
        error = refused.value
        assert error.code == "insufficient_quota" and error.body["type"] == "insufficient_quota"
        assert "Quota tier limit exceeded: 1000 tokens per billing period" in error.message
        assert error.message.endswith("Upgrade to Enterprise.")
        assert int(error.response.headers["Retry-After"]) > 60  # the period's end, not a minute
        assert '"period-tokens";r=10;' in error.response.headers["RateLimit"]
    shim.set_totals("spender", micro_usd=1000)
    async with shim.client(shim.new_key("spender", "prepaid")) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
        assert refused.value.status_code == 402 and refused.value.code == "insufficient_quota"
        assert "budget of $0.001 per billing period (spent $0.001)" in refused.value.message
        assert "Top up your balance." in refused.value.message
