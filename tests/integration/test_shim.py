"""The shim as operators run it: real redis-server, real broker, the mock LLM
and the proxy as real processes, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord

from gateway_shim.keystore import create_key, revoke_key
from quotameter.config import Config
from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import UsageEvent, decode_event
from quotameter.redis_keys import RedisKeys
from tests.conftest import merge
from tests.integration.pipeline_helpers import unpacked

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name some words."}]
# Under o200k_base (mock-small's encoding), checked against tiktoken: 3 per
# message, "system" 1 + "You are terse." 4, "user" 1 + "Name some words." 4,
# and 3 priming the reply. A constant, so a miscounting tokenizer shows.
PROMPT_TOKENS = 19


@dataclass
class Shim:
    config: Config
    process: ManagedProcess
    mock: ManagedProcess | None

    @property
    def base_url(self) -> str:
        return f"http://{self.config.shim.host}:{self.config.shim.port}/v1"

    def new_key(self, customer: str, tier: str = "pro") -> str:
        client = redis.Redis.from_url(self.config.services.redis_url)
        try:
            return create_key(client, RedisKeys(self.config.services.redis_prefix), customer, tier).plaintext
        finally:
            client.close()

    def client(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=20)

    async def events(self, count: int, settle_s: float = 0.0, timeout_s: float = 20.0) -> list[ConsumerRecord]:
        """The topic's records from the beginning: at least ``count``, then
        whatever else arrives within ``settle_s`` (to catch extra events)."""
        consumer = AIOKafkaConsumer(
            self.config.services.events_topic,
            bootstrap_servers=self.config.services.kafka_bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        await consumer.start()
        try:
            records: list[ConsumerRecord] = []
            deadline = time.monotonic() + timeout_s
            while len(records) < count and time.monotonic() < deadline:
                for batch in (await consumer.getmany(timeout_ms=300)).values():
                    records.extend(unpacked(batch))
            settle_until = time.monotonic() + settle_s
            while time.monotonic() < settle_until:
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    records.extend(unpacked(batch))
            assert len(records) >= count, f"expected {count} events, got {len(records)}"
            return records
        finally:
            await consumer.stop()


ShimFactory = Callable[..., Awaitable[Shim]]


@pytest.fixture
def start_shim(config_factory, cli_process) -> ShimFactory:
    async def start(overrides: dict[str, Any] | None = None, with_mock: bool = True) -> Shim:
        mock_port = free_port()
        mock = None
        if with_mock:
            mock = cli_process("mock", "mock-llm", "--port", str(mock_port))
        # No worker runs here: the topic, read by the test, stands for the
        # ledger, so the shim forgets an event once Kafka has it.
        document = {"upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "shim": {"delivery": "broker"}}
        config, path = config_factory(merge(document, overrides or {}))
        process = cli_process("shim", "proxy", config_path=path)
        if mock is not None:
            await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
        await asyncio.to_thread(process.wait_port, config.shim.host, config.shim.port)
        return Shim(config, process, mock)

    return start


def _decoded(records: list[ConsumerRecord]) -> list[UsageEvent]:
    return [decode_event(record.value) for record in records]


async def test_chat_completion_is_metered_exactly(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    key = shim.new_key("acme")
    async with shim.client(key) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=5
        )
    completion = raw.parse()
    assert completion.choices[0].message.content == "".join(completion_pieces(5))
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == PROMPT_TOKENS
    assert completion.usage.completion_tokens == 5
    assert raw.headers["x-ratelimit-limit-requests"] == "600"
    assert raw.headers["x-ratelimit-remaining-requests"] == "599"

    [record] = await shim.events(1)
    event = decode_event(record.value)
    assert record.key == b"acme"
    assert record.timestamp == event.time_ms
    assert key.encode() not in record.value  # only the key id travels
    assert event.subject == "acme" and event.source == shim.config.shim.instance
    data = event.data
    assert (data.input_tokens, data.output_tokens) == (PROMPT_TOKENS, 5)
    assert data.usage_source == "upstream" and data.status == 200 and data.decision == "admitted"
    assert data.model_requested == "mock-small" and data.model_served == "mock-small"
    assert data.route == "/v1/chat/completions" and data.upstream == shim.config.upstream.url
    assert data.api_key_id == key.split("_")[1] and data.tier == "pro"
    assert not data.streamed and data.latency_ms > 0
    assert (data.request_bytes, data.response_bytes) == (len(raw.http_request.content), len(raw.http_response.content))


async def test_streams_pass_through_and_report_usage(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    key = shim.new_key("streamer")
    async with shim.client(key) as client:
        # Asked for usage: the client gets the usage-only chunk last.
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=6, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(completion_pieces(6))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6

    # Not asked: the shim still meters exactly, and the client sees no trace of usage.
    body = {"model": "mock-small", "messages": MESSAGES, "max_tokens": 4, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{shim.base_url}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response:
            assert response.status == 200
            assert response.content_type == "text/event-stream"
            assert response.headers["x-ratelimit-limit-requests"] == "600"
            text = (await response.read()).decode()
    assert "usage" not in text
    assert text.endswith("data: [DONE]\n\n")
    deltas = [json.loads(line[6:])["choices"][0]["delta"] for line in text.splitlines() if line.startswith("data: {")]
    assert "".join(d.get("content", "") for d in deltas) == "".join(completion_pieces(4))

    events = sorted(_decoded(await shim.events(2)), key=lambda e: e.data.output_tokens)
    assert [(e.data.input_tokens, e.data.output_tokens) for e in events] == [(PROMPT_TOKENS, 4), (PROMPT_TOKENS, 6)]
    assert all(e.data.streamed and e.data.usage_source == "upstream" and e.data.ttft_ms is not None for e in events)


async def test_free_tier_requests_per_minute_hold(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    key = shim.new_key("tiny", tier="free")
    remaining = []
    async with shim.client(key) as client:
        for _ in range(3):
            raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES)
            remaining.append(raw.headers["x-ratelimit-remaining-requests"])
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES)
    assert remaining == ["2", "1", "0"]
    headers = refused.value.response.headers
    # GCRA, 3/min: the next slot opens 20 s after the first request.
    assert 15 <= int(headers["Retry-After"]) <= 20
    assert headers["x-ratelimit-limit-requests"] == "3" and headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.value.code == "rate_limit_exceeded"
    assert "Free tier" in refused.value.message and "3 requests per minute" in refused.value.message

    events = _decoded(await shim.events(4))
    refusals = [e for e in events if e.data.status == 429]
    assert len(refusals) == 1 and refusals[0].data.decision == "refused"
    assert refusals[0].data.reason == "rate_limit_requests" and refusals[0].data.output_tokens == 0


async def test_unknown_and_revoked_keys_get_401(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    key = shim.new_key("leaver")
    names = RedisKeys(shim.config.services.redis_prefix)
    for bad in ("sk-not-ours", "qm_000000000000_wrongsecret", key[:-2] + "xx"):
        async with shim.client(bad) as client:
            with pytest.raises(openai.AuthenticationError) as denied:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES)
        assert denied.value.code == "invalid_api_key"
    async with shim.client(key) as client:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES)  # caches the key
        sync = redis.Redis.from_url(shim.config.services.redis_url)
        assert revoke_key(sync, names, key.split("_")[1])
        sync.close()
        with pytest.raises(openai.AuthenticationError):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES)

    # Only the one admitted request is billed: a 401 has no customer.
    events = _decoded(await shim.events(1, settle_s=1.5))
    assert [e.data.status for e in events] == [200]


async def test_bad_requests_get_openai_errors(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    key = shim.new_key("sloppy")
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    root = shim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{root}/healthz") as response:
            health = await response.json()
            assert response.status == 200 and health["status"] == "ok" and "connected" in health["events"]
        async with session.post(f"{shim.base_url}/chat/completions", data=b"{not json", headers=auth) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"
            assert response.headers["x-ratelimit-limit-requests"] == "600"
        for url in (f"{shim.base_url}/no/such/route", f"{root}/elsewhere"):
            async with session.post(url, data=b"{}", headers=auth) as response:
                assert response.status == 404
                assert (await response.json())["error"]["code"] == "unknown_url"
        async with session.get(f"{shim.base_url}/models", headers=auth) as response:
            assert response.status == 200 and (await response.json())["object"] == "list"

    events = _decoded(await shim.events(2))
    by_status = {e.data.status: e for e in events}
    assert by_status[400].data.reason == "invalid_json" and by_status[400].data.usage_source == "none"
    assert by_status[200].data.route == "/v1/models"


async def test_upstream_errors_pass_through_and_garbage_is_a_502(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    async with shim.client(shim.new_key("unlucky")) as client:
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(
                model="mock-small", messages=MESSAGES, extra_headers={"x-mock-fault": "status=500"}
            )
        assert failed.value.status_code == 500 and "mock fault" in failed.value.message
        # A 200 whose body is not JSON is no answer a client can read: a 502,
        # billed nothing (more cases in test_hostile_upstreams).
        with pytest.raises(openai.APIStatusError) as garbage:
            await client.chat.completions.create(
                model="mock-small", messages=MESSAGES, extra_headers={"x-mock-fault": "garbage"}
            )
        assert garbage.value.status_code == 502 and garbage.value.code == "upstream_invalid_response"

    events = {e.data.status: e.data for e in _decoded(await shim.events(2))}
    assert events[500].reason == "upstream_error" and events[500].usage_source == "none"
    assert events[502].reason == "upstream_invalid_response" and events[502].usage_source == "none"
    assert (events[502].input_tokens, events[502].output_tokens) == (0, 0)


async def test_upstream_down_is_502_and_recorded(start_shim: ShimFactory) -> None:
    shim = await start_shim(with_mock=False)
    async with shim.client(shim.new_key("stranded")) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES)
    assert failed.value.status_code == 502
    assert failed.value.body["type"] == "upstream_error" and failed.value.code == "upstream_unavailable"

    [event] = _decoded(await shim.events(1))
    assert event.data.status == 502 and event.data.reason == "upstream_unavailable"
    assert event.data.model_requested == "mock-small" and event.data.output_tokens == 0


async def test_stream_cut_midway_is_ended_and_counted(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    async with shim.client(shim.new_key("cutoff")) as client:
        stream = await client.chat.completions.create(
            model="mock-small",
            messages=MESSAGES,
            max_tokens=10,
            stream=True,
            extra_headers={"x-mock-fault": "cut-after=3"},
        )
        # The shim ends the response cleanly after the last whole chunk, so the
        # openai client's iteration simply stops (no [DONE], no exception).
        chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(completion_pieces(3))

    [event] = _decoded(await shim.events(1))
    assert event.data.usage_source == "counted" and event.data.reason == "upstream_stream_cut"
    assert event.data.output_tokens == 3
    assert event.data.input_tokens == PROMPT_TOKENS


async def test_upstream_without_usage_is_counted_by_the_shim(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    silent = {"x-mock-fault": "no-usage"}
    async with shim.client(shim.new_key("mute")) as client:
        completion = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=7, extra_headers=silent
        )
        assert completion.usage is None
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=12, stream=True,
            stream_options={"include_usage": True}, extra_headers=silent,
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    # The mock's words are one token each (see test_tokens): the whitespace
    # split is a count that owes nothing to the tokenizer.
    assert len(text.split()) == 12

    events = sorted(_decoded(await shim.events(2)), key=lambda e: e.data.streamed)
    assert [(e.data.streamed, e.data.usage_source, e.data.input_tokens, e.data.output_tokens) for e in events] == [
        (False, "counted", PROMPT_TOKENS, 7),
        (True, "counted", PROMPT_TOKENS, 12),
    ]


async def test_serves_without_broker_and_stops_cleanly(start_shim: ShimFactory) -> None:
    shim = await start_shim({"services": {"kafka_bootstrap": f"127.0.0.1:{free_port()}"}})
    async with shim.client(shim.new_key("offline")) as client:
        completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert await asyncio.to_thread(shim.process.stop) == 0
    log = shim.process.log_tail(200)
    assert "unreachable" in log and "could not be delivered" in log


async def test_events_in_flight_are_flushed_on_sigterm(start_shim: ShimFactory) -> None:
    shim = await start_shim()
    async with shim.client(shim.new_key("lastcall")) as client:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3)
    assert await asyncio.to_thread(shim.process.stop) == 0
    [event] = _decoded(await shim.events(1))
    assert event.data.output_tokens == 3

