"""A tier's per_user limits through the real shim, with the official client:
each end user of a customer held to its own caps, in the same admission as
the customer's, its day's tokens settled to exactly what it was served.
One shim serves the module; each test has customers of its own."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import aiohttp
import openai
import pytest

from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import decode_event
from quotameter.policy import end_user_digest
from tests.conftest import make_config
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim
from tests.integration.pipeline_helpers import read_topic
from tests.integration.test_ingest import TOKEN, event, post

TIERS = {
    "pro": {
        "requests_per_minute": 600,
        "upgrade_hint": "Upgrade to Enterprise.",
        "per_user": {"requests_per_minute": 3, "tokens_per_minute": 2000},
    },
    "strict": {"per_user": {"requests_per_minute": 100, "require_user": True}},
    # The mock answers 16 tokens without max_tokens: reserved 11 + 100, served 11 + 16.
    "daily": {"default_max_tokens": 100, "per_user": {"tokens_per_day": 300, "tokens_per_minute": 300}},
    "crowd": {"per_user": {"tokens_per_day": 1500}},
}


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Shim]:
    directory = tmp_path_factory.mktemp("per-user")
    mock_port = free_port()
    mock = ManagedProcess("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)],
                          directory / "mock.log").start()
    # No worker runs here: the shim forgets an event once Kafka has it.
    document = {"upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "tiers": TIERS,
                "shim": {"delivery": "broker", "ingest_token": TOKEN}}
    config, path = make_config(directory, redis_url, kafka_bootstrap, uuid.uuid4().hex[:10], document)
    process = ManagedProcess("shim", [sys.executable, "-m", "quotameter", "proxy"], directory / "shim.log",
                             env={"QUOTAMETER_CONFIG": str(path)}).start()
    try:
        mock.wait_port("127.0.0.1", mock_port)
        process.wait_port(config.shim.host, config.shim.port)
        yield Shim(config, process, path)
    finally:
        process.stop()
        mock.stop()


async def _events(shim: Shim, customers: set[str], count: int) -> list:
    """The first ``count`` events of ``customers`` on the shim's topic."""
    services = shim.config.services
    records = await read_topic(services.kafka_bootstrap, services.events_topic, count,
                               keys={customer.encode() for customer in customers})
    assert len(records) >= count, f"{len(records)} of {count} events reached the topic"
    return [decode_event(r.value) for r in records]


def _user_keys(shim: Shim, customer: str) -> dict[str, int]:
    """Every per-user key of ``customer``, with its time to live (ms)."""
    client = shim.redis()
    try:
        prefix = shim.config.services.redis_prefix
        return {k: client.pttl(k) for k in client.scan_iter(f"{prefix}:*{{{customer}}}*") if ":user" in k}
    finally:
        client.close()


def _day_tokens(shim: Shim, customer: str, end_user: str) -> int:
    client = shim.redis()
    try:
        day = datetime.now(UTC).date().isoformat()  # billing.timezone is UTC here
        return int(client.get(shim.names.user_day_tokens(customer, end_user_digest(end_user), day)) or 0)
    finally:
        client.close()


def _tpm_state(shim: Shim, customer: str, end_user: str) -> float:
    client = shim.redis()
    try:
        value = client.get(shim.names.rate(customer, "tokens", f"user:{end_user_digest(end_user)}"))
        assert value is not None, "the end user's tokens/min state expired before it was read"
        return float(value)
    finally:
        client.close()


async def test_an_end_user_at_its_cap_is_refused_while_the_customer_and_other_users_pass(shim: Shim) -> None:
    key = shim.new_key("app", "pro")
    async with shim.client(key) as client:
        for left in (2, 1, 0):
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=5, user="alice")
            # The tighter of the customer (600/min) and the end user (3/min).
            assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == (
                "3", str(left))
            assert '"user-requests";q=3;w=60' in raw.headers["RateLimit-Policy"]
            assert f'"user-requests";r={left};' in raw.headers["RateLimit"]
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5, user="alice")
        error = refused.value
        assert error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
        assert "Pro tier per-user limit exceeded: 3 requests per minute per end user (used 3)" in error.message
        assert "Upgrade to Enterprise." in error.message and "alice" not in error.message
        headers = error.response.headers
        assert 1 <= int(headers["Retry-After"]) <= 20  # one request frees every 20 s
        assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "0")
        # The same customer's other end user (named in the header), and its traffic without one.
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=5, extra_headers={"x-quotameter-user": "bob"})
        assert raw.headers["x-ratelimit-remaining-requests"] == "2"
        for _ in range(4):
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=5)
            assert raw.headers["x-ratelimit-limit-requests"] == "600"
            assert "user-" not in raw.headers["RateLimit-Policy"]
        # Larger than the end user's tokens/min could ever admit: no retry helps.
        with pytest.raises(openai.RateLimitError) as huge:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3000, user="carol")
        assert "per-user limit exceeded: 2000 tokens per minute per end user" in huge.value.message
        assert "can ever admit" in huge.value.message and "Retry-After" not in huge.value.response.headers
    # The end user is the customer's: another key of it finds alice spent, another customer does not.
    async with shim.client(shim.new_key("app", "pro")) as client:
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5, user="alice")
    async with shim.client(shim.new_key("elsewhere", "pro")) as client:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5, user="alice")
    # A tier that requires an end user: 400 without one, and for an id past 256 characters.
    async with shim.client(shim.new_key("strict-app", "strict")) as client:
        with pytest.raises(openai.BadRequestError) as anonymous:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
        assert anonymous.value.code == "missing_required_parameter" and anonymous.value.param == "user"
        with pytest.raises(openai.BadRequestError) as too_long:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5, user="u" * 257)
        assert too_long.value.code == "invalid_value"
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5, user="u" * 256)
        # A body that is not JSON names no end user: it is refused as what it is.
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{shim.base_url}/chat/completions", data=b"{not json",
                                    headers={"Authorization": f"Bearer {client.api_key}"}) as response:
                assert response.status == 400 and (await response.json())["error"]["code"] == "invalid_json"

    events = await _events(shim, {"app", "elsewhere", "strict-app"}, 16)
    assert len(events) == 16
    reasons = sorted((e.subject, e.data.reason or "") for e in events if e.data.decision == "refused")
    assert reasons == [
        ("app", "user_rate_limit_requests"), ("app", "user_rate_limit_requests"), ("app", "user_rate_limit_tokens"),
        ("strict-app", "user_required"),
    ]
    # The over-long id is refused by attribution, as the malformed request it is (400, counted, not billed).
    malformed = sorted(e.data.reason for e in events if e.subject == "strict-app" and e.data.status == 400
                       and e.data.decision != "refused")
    assert malformed == ["invalid_json", "invalid_value"], malformed
    # The end user's id never names a key: only its digest does.
    keys = _user_keys(shim, "app")
    assert keys and not any("alice" in k or "bob" in k for k in keys)
    assert any(end_user_digest("alice") in k for k in keys)


async def test_a_day_quota_per_end_user_settled_to_what_it_was_served(shim: Shim) -> None:
    key = shim.new_key("diary", "daily")
    served = 0
    async with shim.client(key) as client:
        # A stream without max_tokens: 11 + 100 reserved, corrected to what it carried.
        t0_ms = time.time() * 1000
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, user="erin")
        usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
        assert len(usage) == 1 and usage[0].prompt_tokens == PROMPT_TOKENS
        t1_ms = time.time() * 1000
        served += usage[0].total_tokens
        assert served < PROMPT_TOKENS + 100 and _day_tokens(shim, "diary", "erin") == served
        # The tokens/min charge was given back too: the GCRA state (theoretical arrival
        # time) is the admission's time plus the served tokens, 200 ms each at 300/min.
        tat = _tpm_state(shim, "diary", "erin")
        assert served * 200 <= tat - t0_ms <= served * 200 + (t1_ms - t0_ms), (tat - t0_ms, served)
        answer = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=50, user="erin")
        served += answer.usage.total_tokens
        assert _day_tokens(shim, "diary", "erin") == served == 2 * PROMPT_TOKENS + 16 + 50
        # 11 + 250 more would carry erin past 300 today.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=250, user="erin")
        error = refused.value
        assert error.code == "rate_limit_exceeded" and error.body["type"] == "tokens"
        assert (f"Daily tier per-user limit exceeded: 300 tokens per day per end user (used {served}, "
                f"this request needs up to {PROMPT_TOKENS + 250})") in error.message
        midnight = datetime.combine(datetime.now(UTC).date() + timedelta(days=1), datetime.min.time(), UTC)
        assert f"resets at {midnight:%Y-%m-%d %H:%M} UTC" in error.message
        to_midnight = (midnight - datetime.now(UTC)).total_seconds()
        assert abs(int(error.response.headers["Retry-After"]) - to_midnight) <= 5
        assert f'"user-day-tokens";r={300 - served};' in error.response.headers["RateLimit"]
        assert _day_tokens(shim, "diary", "erin") == served  # a refusal holds nothing
        # Another end user of the customer still has its whole day.
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=250, user="frank")
        assert _day_tokens(shim, "diary", "frank") == PROMPT_TOKENS + 250

    events = await _events(shim, {"diary"}, 4)
    refusal = [e.data for e in events if e.data.decision == "refused"]
    assert [d.reason for d in refusal] == ["user_quota_tokens"]
    erin = [e.data for e in events if e.data.decision == "admitted" and e.data.output_tokens != 250]
    assert sum(d.input_tokens + d.output_tokens for d in erin) == served
    # Every per-user key expires: rates within their window, the day's tokens at the day's end.
    keys = _user_keys(shim, "diary")
    assert len([k for k in keys if ":user_tokens:" in k]) == 2
    for name, ttl in keys.items():
        bound = to_midnight * 1000 + 5000 if ":user_tokens:" in name else 60_000
        assert 0 < ttl <= bound, (name, ttl)


async def test_a_hundred_concurrent_requests_of_one_end_user_never_pass_its_day(shim: Shim) -> None:
    async with shim.client(shim.new_key("crowded", "crowd")) as client:
        async def one(i: int) -> int:
            try:
                answer = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=20 + i % 7, user="racer")
            except openai.RateLimitError as refused:
                assert refused.code == "rate_limit_exceeded" and "per end user" in refused.message
                return 0
            return answer.usage.total_tokens

        served = await asyncio.gather(*(one(i) for i in range(100)))
        # The customer's other end user is untouched by the race.
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=20, user="bystander")
    admitted = [tokens for tokens in served if tokens]
    print(f"day quota 1500 per end user: {len(admitted)} of 100 admitted, {sum(admitted)} tokens served")
    assert 0 < len(admitted) < 100
    assert sum(admitted) <= 1500  # zero overshoot
    assert 1500 - sum(admitted) < PROMPT_TOKENS + 26  # nor refused early: the largest request no longer fitted
    assert _day_tokens(shim, "crowded", "racer") == sum(admitted)
    # The events agree to the token: what the race was served, and the bystander's 11 + 20.
    events = await _events(shim, {"crowded"}, 101)
    admitted_events = [e.data for e in events if e.data.decision == "admitted"]
    assert len(admitted_events) == len(admitted) + 1
    assert sum(d.input_tokens + d.output_tokens for d in admitted_events) == sum(admitted) + PROMPT_TOKENS + 20
    assert sum(1 for e in events if e.data.reason == "user_quota_tokens") == 100 - len(admitted)


async def test_a_checked_admission_holds_the_end_user_until_its_report_settles(shim: Shim) -> None:
    """The check endpoint (nginx auth_request…): the end user named in the header the
    proxy passes on, its day reserved, then settled by the gateway's usage report."""
    key = shim.new_key("gate", "daily")

    async def check() -> tuple[int, aiohttp.typedefs.LooseHeaders, dict]:
        headers = {"Authorization": f"Bearer {key}", "X-Original-URI": "/v1/chat/completions",
                   "x-quotameter-model": "mock-small", "x-quotameter-user": "gina"}
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{shim.base_url}/check", headers=headers) as response:
                return response.status, response.headers, await response.json(content_type=None)

    status, headers, body = await check()
    assert status == 200, body
    # The prompt unseen: the tier's default_max_tokens of output (+3 priming tokens) held.
    assert _day_tokens(shim, "gate", "gina") == 103
    assert '"user-day-tokens";r=197;' in headers["RateLimit"]
    report = event(body["event_id"], "gate", 7, 5)
    report["data"].update(tier="daily", api_key_id="nginx")
    assert await post(shim.config, report) == (202, {"accepted": 1})
    assert _day_tokens(shim, "gate", "gina") == 12
    # Two more fit in gina's 300 of the day (12 + 2 × 103), a third does not (12 + 3 × 103).
    assert [(await check())[0] for _ in range(3)] == [200, 200, 429]
    status, _, body = await check()
    assert body["error"]["code"] == "rate_limit_exceeded" and "300 tokens per day per end user" in body["error"]["message"]
