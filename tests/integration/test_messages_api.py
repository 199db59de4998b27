"""Anthropic's Messages API through the standalone shim, read by the official
``anthropic`` client, in front of the mock model's /v1/messages, with the
real worker writing the ledger.

Admitted answers (JSON and streams, keys as Bearer or ``x-api-key``) reach
the ledger to the token the client was served, with the cache's reads and
writes inside the input and apart as cached / cache-write tokens, priced
at their rates. Refusals are Anthropic's: RateLimitError with its error body
and ``anthropic-ratelimit-*`` / ``retry-after`` headers, AuthenticationError
for a wrong key, BadRequestError for a request without max_tokens. A stream
cut at the budget is one the SDK accumulates to a normal end (stop_reason
``max_tokens``), billed as delivered. Every answer's ``request-id`` is the
id of its row in the ledger.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import pytest
import redis
import yaml

from gateway_shim.keystore import create_key
from quotameter.config import DEFAULT_CONFIG, Config, load_config
from quotameter.embedded.mock_llm import FAULT_HEADER, SEEN_KEY_HEADER, completion_pieces
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.redis_keys import RedisKeys
from tests.conftest import merge
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for
from tests.integration.test_envoy import start_envoy

SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Say some words."}]
# Written down, not computed by the code under test (o200k_base, see tests/unit/test_tokens.py):
# "You are terse." 4, one message framed with 3 around "Say some words." 4, 3 priming the reply.
PROMPT_TOKENS = 4 + (3 + 4) + 3
SYSTEM_TOKENS = 4  # the cacheable prefix when the system prompt carries cache_control
CUT_OUTPUT = 5  # what the "cutting" tier's quota leaves for the answer
# mock-small's rates per 1M tokens: input, output, cache read, cache write.
UPSTREAM_KEY = "upstream-credential"  # the shim's own key for the model server
PRICES = [{"model": "mock-small", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00",
           "cached_input_per_million_usd": "0.10", "cache_write_per_million_usd": "1.25"}]
TIERS = {
    "open": {"requests_per_minute": 100, "tokens_per_minute": 1_000_000, "monthly_tokens": 10_000_000},
    "tight": {"requests_per_minute": 2, "tokens_per_minute": 100_000, "monthly_tokens": 10_000_000,
              "upgrade_hint": "Upgrade to Pro."},
    # The quota holds the prompt and CUT_OUTPUT tokens: a max_tokens past that is cut to fit.
    "cutting": {"requests_per_minute": 100, "monthly_tokens": PROMPT_TOKENS + CUT_OUTPUT, "cut_streams": True},
}


@dataclass
class Stack:
    config: Config
    shim: ManagedProcess
    root: Path
    mock_port: int

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.config.shim.port}"

    def new_key(self, customer: str, tier: str) -> str:
        client = redis.Redis.from_url(self.config.services.redis_url)
        try:
            return create_key(client, RedisKeys(self.config.services.redis_prefix), customer, tier).plaintext
        finally:
            client.close()

    def client(self, key: str, header: bool = False) -> anthropic.AsyncAnthropic:
        """The SDK with ``key`` as its api_key (this SDK sends it as a Bearer token), or,
        with ``header``, in an ``x-api-key`` header (as Anthropic's older SDKs and curl
        examples send it)."""
        if header:
            return anthropic.AsyncAnthropic(base_url=self.base_url, max_retries=0, timeout=20, api_key=None,
                                            default_headers={"x-api-key": key})
        return anthropic.AsyncAnthropic(base_url=self.base_url, max_retries=0, timeout=20, api_key=key)

    def ledger(self, customer: str, rows: int) -> dict[str, dict[str, Any]]:
        """The customer's ledger rows by event id, once ``rows`` of them are there."""

        def fetch() -> dict[str, dict[str, Any]] | None:
            status, body = http_json(
                f"{self.config.services.worker_url}/query",
                f"""SELECT id, count() AS copies, any(input_tokens) AS input_tokens,
                           any(output_tokens) AS output_tokens, any(cached_tokens) AS cached_tokens,
                           any(cache_write_tokens) AS cache_write_tokens, any(cost_usd) AS cost_usd,
                           any(route) AS route, any(status) AS status, any(decision) AS decision,
                           any(reason) AS reason, any(usage_source) AS usage_source, any(streamed) AS streamed
                    FROM quotameter.events WHERE customer = '{customer}' GROUP BY id""",
                self.config,
            )
            assert status == 200, body
            return {row["id"]: row for row in body["rows"]} if len(body["rows"]) >= rows else None

        found = wait_for(fetch, 30, f"{rows} ledger rows of {customer}")
        assert len(found) == rows, found
        return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Stack]:
    """One mock model, shim and worker for the module; each test has its own customers."""
    root = tmp_path_factory.mktemp("messages")
    unique = uuid.uuid4().hex[:10]
    mock_port = free_port()
    document = merge(yaml.safe_load(DEFAULT_CONFIG.read_text()), {
        "shim": {"port": free_port(), "instance": f"shim-{unique}", "spool_dir": str(root / "spool"),
                 "drain_timeout_s": 2, "delivery": "broker", "ext_proc_port": free_port()},
        "services": {"redis_url": redis_url, "redis_prefix": f"qm{unique}", "kafka_bootstrap": kafka_bootstrap,
                     "events_topic": f"events-{unique}", "history_dir": str(root / "history"),
                     "worker_url": f"http://127.0.0.1:{free_port()}",
                     "dashboard_url": f"http://127.0.0.1:{free_port()}", "worker_app_id": f"qm-{unique}"},
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1", "api_key": UPSTREAM_KEY},
        "tiers": TIERS,
        "prices": PRICES,
    })
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(path)
    started: list[ManagedProcess] = []

    def run(name: str, *args: str) -> ManagedProcess:
        process = ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], root / f"{name}.log",
                                 env={"QUOTAMETER_CONFIG": str(path)}).start()
        started.append(process)
        return process

    try:
        mock = run("mock", "mock-llm", "--port", str(mock_port))
        shim = run("shim", "proxy")
        mock.wait_port("127.0.0.1", mock_port)
        shim.wait_port("127.0.0.1", config.shim.port)
        start_worker(lambda name, *args, config_path: run(name, *args), config, path, "worker")
        yield Stack(config, shim, root, mock_port)
    finally:
        for process in reversed(started):
            process.stop()


def served_input(usage: anthropic.types.Usage) -> int:
    """quotameter's input: Anthropic's input_tokens leaves out the cache's reads and writes."""
    return usage.input_tokens + (usage.cache_read_input_tokens or 0) + (usage.cache_creation_input_tokens or 0)


def cost(input_tokens: int, output_tokens: int, cached: int = 0, written: int = 0) -> Decimal:
    plain = input_tokens - cached - written
    micro = plain * Decimal("1.00") + cached * Decimal("0.10") + written * Decimal("1.25") + output_tokens * Decimal("4.00")
    return micro / 1_000_000


async def test_answers_and_streams_reach_the_ledger_as_served(stack: Stack) -> None:
    key = stack.new_key("served", "open")
    served: dict[str, tuple[int, int, int, int, bool]] = {}  # request id -> input, output, cached, written, streamed
    async with stack.client(key) as client:
        raw = await client.messages.with_raw_response.create(model="mock-small", max_tokens=7, system=SYSTEM,
                                                             messages=MESSAGES)
        message = await raw.parse()
        assert message.content[0].text == "".join(completion_pieces(7)) and message.stop_reason == "max_tokens"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT_TOKENS, 7)
        assert raw.headers["anthropic-ratelimit-requests-limit"] == "100"
        # The model server got the shim's credential as x-api-key, never the client's key.
        assert raw.headers[SEEN_KEY_HEADER] == UPSTREAM_KEY
        assert raw.headers["anthropic-ratelimit-tokens-limit"] == "1000000"
        served[message._request_id] = (PROMPT_TOKENS, 7, 0, 0, False)

        # A stream, accumulated by the SDK: 16 words, ended by the model.
        async with client.messages.stream(model="mock-small", max_tokens=100, system=SYSTEM,
                                          messages=MESSAGES) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        assert text == "".join(completion_pieces(16)) and final.stop_reason == "end_turn"
        assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 16)
        served[stream.response.headers["request-id"]] = (PROMPT_TOKENS, 16, 0, 0, True)
        assert stream.response.headers[SEEN_KEY_HEADER] == UPSTREAM_KEY

        # The prompt cache: written by the first request, read by the second, in both JSON and stream.
        cached_system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
        first = await client.messages.create(model="mock-small", max_tokens=3, system=cached_system, messages=MESSAGES)
        assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (SYSTEM_TOKENS, 0)
        assert served_input(first.usage) == PROMPT_TOKENS
        served[first._request_id] = (PROMPT_TOKENS, 3, 0, SYSTEM_TOKENS, False)
        events = await client.messages.create(model="mock-small", max_tokens=4, system=cached_system,
                                              messages=MESSAGES, stream=True)
        kinds, usage_start = [], None
        async for event in events:
            kinds.append(event.type)
            if event.type == "message_start":
                usage_start = event.message.usage
        assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and usage_start is not None
        assert (usage_start.cache_creation_input_tokens, usage_start.cache_read_input_tokens) == (0, SYSTEM_TOKENS)
        served[events.response.headers["request-id"]] = (PROMPT_TOKENS, 4, SYSTEM_TOKENS, 0, True)

    # The key in an x-api-key header works as well.
    async with stack.client(key, header=True) as client:
        message = await client.messages.create(model="mock-small", max_tokens=2, messages=MESSAGES)
        served[message._request_id] = (PROMPT_TOKENS - SYSTEM_TOKENS, 2, 0, 0, False)

    rows = stack.ledger("served", len(served))
    assert set(rows) == set(served)
    for request_id, (input_tokens, output_tokens, cached, written, streamed) in served.items():
        row = rows[request_id]
        assert (row["copies"], row["route"], row["status"], row["decision"], row["usage_source"]) == (
            1, "/v1/messages", 200, "admitted", "upstream"), row
        assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["cache_write_tokens"],
                bool(row["streamed"])) == (input_tokens, output_tokens, cached, written, streamed), row
        assert Decimal(str(row["cost_usd"])) == cost(input_tokens, output_tokens, cached, written), row


async def test_refusals_are_anthropics_errors(stack: Stack) -> None:
    key = stack.new_key("refused", "tight")
    async with stack.client("sk-not-a-key") as wrong:
        with pytest.raises(anthropic.AuthenticationError) as unauthenticated:
            await wrong.messages.create(model="mock-small", max_tokens=3, messages=MESSAGES)
    assert unauthenticated.value.status_code == 401
    assert unauthenticated.value.body["type"] == "error"
    assert unauthenticated.value.body["error"]["type"] == "authentication_error"

    async with aiohttp.ClientSession() as session:  # the SDK will not send a request without max_tokens
        async with session.post(f"{stack.base_url}/v1/messages", headers={"x-api-key": key},
                                json={"model": "mock-small", "messages": MESSAGES}) as response:
            bad_request = response.status, await response.json(), response.headers["request-id"]
    assert bad_request[0] == 400
    assert bad_request[1] == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required"}}

    ids = []
    async with stack.client(key) as client:
        for _ in range(1):  # the 400 above counted as the minute's first request
            ids.append((await client.messages.create(model="mock-small", max_tokens=3, messages=MESSAGES))._request_id)
        with pytest.raises(anthropic.RateLimitError) as limited:
            await client.messages.create(model="mock-small", max_tokens=3, messages=MESSAGES)
    refusal = limited.value
    headers = refusal.response.headers
    assert refusal.status_code == 429 and refusal.request_id == headers["request-id"]
    assert refusal.body["type"] == "error"
    assert refusal.body["error"]["type"] == "rate_limit_error"
    assert "Upgrade to Pro." in refusal.body["error"]["message"]
    assert headers["anthropic-ratelimit-requests-limit"] == "2"
    assert headers["anthropic-ratelimit-requests-remaining"] == "0"
    reset = datetime.strptime(headers["anthropic-ratelimit-requests-reset"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    wait_s = int(headers["retry-after"])
    assert 1 <= wait_s <= 60 and 0 < reset.timestamp() - time.time() <= 61
    assert headers["anthropic-ratelimit-tokens-limit"] == "100000"
    assert not any(name.lower().startswith("x-ratelimit-") for name in headers)

    rows = stack.ledger("refused", 3)
    # Refused by the shim itself (its reason), never forwarded; nothing billed.
    assert (rows[bad_request[2]]["status"], rows[bad_request[2]]["reason"], rows[bad_request[2]]["input_tokens"]) == (
        400, "missing_required_parameter", 0)
    assert (rows[refusal.request_id]["status"], rows[refusal.request_id]["decision"],
            rows[refusal.request_id]["reason"], rows[refusal.request_id]["output_tokens"]) == (
        429, "refused", "rate_limit_requests", 0)
    assert rows[ids[0]]["output_tokens"] == 3


async def test_a_stream_cut_at_the_budget_ends_normally_and_is_billed_as_delivered(stack: Stack) -> None:
    key = stack.new_key("cut-stream", "cutting")
    # Its system prompt is written to the model's cache (a model no other test asks for: a first time).
    cached_system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    async with stack.client(key) as client:
        async with client.messages.stream(model="mock-large", max_tokens=100, system=cached_system,
                                          messages=MESSAGES) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
        request_id = stream.response.headers["request-id"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.stop_reason == "max_tokens"
    assert final.content[0].text == "".join(completion_pieces(CUT_OUTPUT))
    assert (served_input(final.usage), final.usage.cache_creation_input_tokens, final.usage.output_tokens) == (
        PROMPT_TOKENS, SYSTEM_TOKENS, CUT_OUTPUT)
    row = stack.ledger("cut-stream", 1)[request_id]
    assert (row["input_tokens"], row["cache_write_tokens"], row["output_tokens"], row["reason"],
            row["usage_source"], bool(row["streamed"])) == (
        PROMPT_TOKENS, SYSTEM_TOKENS, CUT_OUTPUT, "budget_cut", "counted", True), row

    # A JSON answer is cut before it runs: the upstream is asked for what the budget holds.
    key = stack.new_key("cut-json", "cutting")
    async with stack.client(key) as client:
        message = await client.messages.create(model="mock-small", max_tokens=100, system=SYSTEM, messages=MESSAGES)
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == CUT_OUTPUT
    row = stack.ledger("cut-json", 1)[message._request_id]
    assert (row["input_tokens"], row["output_tokens"], row["reason"]) == (PROMPT_TOKENS, CUT_OUTPUT, "budget_cut")


async def test_answers_without_usage_or_broken_off_are_billed_as_received(stack: Stack) -> None:
    key = stack.new_key("counted", "open")
    body = {"model": "mock-small", "max_tokens": 5, "system": SYSTEM, "messages": MESSAGES}
    received: dict[str, tuple[int, int, str | None]] = {}  # request id -> input, output, reason
    async with aiohttp.ClientSession(headers={"x-api-key": key}) as session:
        # A model that reports no usage: the shim counts the prompt and the text.
        async with session.post(f"{stack.base_url}/v1/messages", json=body,
                                headers={FAULT_HEADER: "no-usage"}) as response:
            message = await response.json()
            assert response.status == 200 and "usage" not in message, message
            assert message["content"][0]["text"] == "".join(completion_pieces(5))
            received[response.headers["request-id"]] = (PROMPT_TOKENS, 5, None)
        # A stream the model breaks off after 3 words: message_start reported the input,
        # no message_delta ever reported the output, so the words the client got are counted.
        async with session.post(f"{stack.base_url}/v1/messages", json={**body, "max_tokens": 10, "stream": True},
                                headers={FAULT_HEADER: "cut-after=3"}) as response:
            raw = (await response.read()).decode()
            assert response.status == 200
            words = [json.loads(part.split("data: ", 1)[1])["delta"]["text"] for part in raw.split("\n\n")
                     if part.startswith("event: content_block_delta")]
            assert words == completion_pieces(3) and "message_stop" not in raw
            received[response.headers["request-id"]] = (PROMPT_TOKENS, 3, "upstream_stream_cut")
    rows = stack.ledger("counted", 2)
    for request_id, (input_tokens, output_tokens, reason) in received.items():
        row = rows[request_id]
        assert (row["input_tokens"], row["output_tokens"], row["usage_source"], row["reason"]) == (
            input_tokens, output_tokens, "counted", reason), row


async def test_through_envoy_ext_proc_the_key_stays_at_the_edge(stack: Stack) -> None:
    """The same lifecycle behind Envoy: the client's x-api-key is read, then replaced by the
    shim's own credential for the model; the stream is metered to the token."""
    key = stack.new_key("edge", "open")
    envoy, port = start_envoy(stack.root, "ext_proc.yaml", ext_proc=stack.config.shim.ext_proc_port,
                              model=stack.mock_port)
    try:
        async with anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key=None, max_retries=0,
                                            timeout=20, default_headers={"x-api-key": key}) as client:
            async with client.messages.stream(model="mock-small", max_tokens=6, system=SYSTEM,
                                              messages=MESSAGES) as stream:
                final = await stream.get_final_message()
            headers = stream.response.headers
            with pytest.raises(anthropic.AuthenticationError):
                await client.messages.create(model="mock-small", max_tokens=3, messages=MESSAGES,
                                             extra_headers={"x-api-key": "sk-not-a-key"})
    finally:
        envoy.stop()
    assert headers[SEEN_KEY_HEADER] == UPSTREAM_KEY
    assert final.content[0].text == "".join(completion_pieces(6)) and final.stop_reason == "max_tokens"
    assert headers["anthropic-ratelimit-requests-limit"] == "100"
    row = stack.ledger("edge", 1)[headers["request-id"]]
    assert (row["input_tokens"], row["output_tokens"], row["usage_source"], bool(row["streamed"])) == (
        PROMPT_TOKENS, 6, "upstream", True), row
