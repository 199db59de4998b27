"""The shim in front of an upstream that misbehaves (hostile_upstream.py):
every client gets a clear answer or a stream that ends after its last whole
event; what was delivered is metered (the shim's own count, flagged
"counted", when the upstream reports nothing usable); the reservation is
settled to exactly that; one event per request. The leak check, 10,000 such
requests against one shim process, is test_hostile_upstreams_leak.py.

The shim runs as its real process (shim_factory), the hostile upstream in
this test's event loop, both on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiokafka import AIOKafkaConsumer

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import free_port
from quotameter.events import RequestData, UsageEvent, decode_event
from tests.integration import hostile_upstream as h
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import unpacked

TIERS = {
    "roomy": {"monthly_tokens": 10**12},
    "cutting": {"monthly_tokens": 10**12, "cut_streams": True},
}
SILENCE_S = 2.0  # upstream.timeout_s: how long the shim waits for the upstream's next data
MAX_STREAM_S = 3.0  # upstream.max_stream_s: the longest a stream may run
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # upstream.max_response_bytes: the largest answer / event taken
CUT_AT = 20  # max_tokens of the never-ending stream on the cutting tier
SIX = "".join(completion_pieces(h.PIECES))
BIG = h.BIG_WORD * h.BIG_WORDS


@dataclass(frozen=True)
class Expect:
    """What the client gets and what is metered, for one behaviour."""

    stream: bool
    status: int
    code: str | None  # the error's code, for an error answer
    text: str | None  # the text the client receives (None: the error / not checked)
    source: str  # usage_source of the event
    input_tokens: int
    output_tokens: int | None  # None: whatever the client received, counted
    reason: str | None
    tier: str = "roomy"
    max_tokens: int | None = None


EXPECT: dict[str, Expect] = {
    "invalid-json": Expect(False, 502, "upstream_invalid_response", None, "none", 0, 0, "upstream_invalid_response"),
    "error-200": Expect(False, 502, "upstream_error", None, "none", 0, 0, "upstream_error"),
    "json-as-text": Expect(False, 200, None, SIX, "upstream", PROMPT_TOKENS, h.PIECES, None),
    "big-json": Expect(False, 200, None, BIG, "upstream", PROMPT_TOKENS, h.BIG_WORDS, None),
    "reset-json": Expect(False, 502, "upstream_unavailable", None, "none", 0, 0, "upstream_unavailable"),
    "oversize-json": Expect(False, 502, "upstream_invalid_response", None, "none", 0, 0, "upstream_invalid_response"),
    "sse-garbage": Expect(True, 200, None, SIX, "upstream", PROMPT_TOKENS, h.PIECES, None),
    "sse-no-usage": Expect(True, 200, None, SIX, "counted", PROMPT_TOKENS, h.PIECES, None),
    "sse-dup-usage": Expect(True, 200, None, SIX, "upstream", PROMPT_TOKENS, h.PIECES, None),  # the last one counts
    "sse-big-event": Expect(True, 200, None, BIG, "upstream", PROMPT_TOKENS, h.BIG_WORDS, None),
    "sse-reset": Expect(True, 200, None, "".join(completion_pieces(h.PIECES)[: h.RESET_AFTER]), "counted",
                        PROMPT_TOKENS, h.RESET_AFTER, "upstream_stream_cut"),
    "sse-as-json": Expect(True, 200, None, SIX, "upstream", PROMPT_TOKENS, h.PIECES, None),
    "stream-json": Expect(True, 502, "upstream_invalid_response", None, "none", 0, 0, "upstream_invalid_response"),
    "sse-keepalive-forever": Expect(True, 200, None, completion_pieces(1)[0], "counted", PROMPT_TOKENS, 1,
                                    "upstream_timeout"),
    "sse-silent-forever": Expect(True, 200, None, completion_pieces(1)[0], "counted", PROMPT_TOKENS, 1,
                                 "upstream_timeout"),
    "sse-data-forever": Expect(True, 200, None, None, "counted", PROMPT_TOKENS, None, "stream_too_long"),
    "sse-oversize-event": Expect(True, 200, None, completion_pieces(1)[0], "counted", PROMPT_TOKENS, 1,
                                 "upstream_invalid_response"),
}
CUT = Expect(True, 200, None, h.BIG_WORD * CUT_AT, "counted", PROMPT_TOKENS, CUT_AT, "budget_cut", "cutting", CUT_AT)


@dataclass
class Seen:
    status: int
    content_type: str
    body: bytes
    text: str | None = None  # the generated text the client could read
    error_code: str | None = None


@pytest.fixture
async def hostile() -> AsyncIterator[h.Hostile]:
    server = await h.start_hostile(free_port())
    yield server
    await server.stop()


async def _shim(shim_factory: ShimFactory, hostile: h.Hostile) -> Shim:
    upstream = {"url": hostile.url, "timeout_s": SILENCE_S, "max_stream_s": MAX_STREAM_S,
                "max_response_bytes": MAX_RESPONSE_BYTES}
    return await shim_factory(TIERS, upstream=upstream)


def parse_stream(body: bytes) -> str:
    """The text of an SSE answer, checking it is made of whole events a client
    can read: every data is [DONE] or a JSON object, and it ends on an event's end."""
    assert body.endswith(b"\n\n") or body.endswith(b"\r\r") or body.endswith(b"\r\n\r\n"), body[-200:]
    text = []
    normalized = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for event in normalized.split(b"\n\n"):
        data = [line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")]
        if not data:
            continue
        payload = b"\n".join(data)
        if payload == b"[DONE]":
            continue
        document = json.loads(payload)
        assert isinstance(document, dict), payload[:200]
        for choice in document.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


async def _raw(session: aiohttp.ClientSession, shim: Shim, key: str, model: str, expect: Expect) -> Seen:
    body: dict[str, Any] = {"model": model, "messages": MESSAGES, "stream": expect.stream}
    if expect.max_tokens:
        body["max_tokens"] = expect.max_tokens
    try:
        async with session.post(f"{shim.base_url}/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {key}"}) as response:
            seen = Seen(response.status, response.headers.get("Content-Type", ""), b"")
            seen.body = await response.read()
    except (TimeoutError, aiohttp.ClientError) as exc:
        return Seen(0, "", b"", error_code=f"client saw {type(exc).__name__}")
    try:
        if seen.status != 200:
            seen.error_code = json.loads(seen.body)["error"]["code"]
        elif expect.stream:
            seen.text = parse_stream(seen.body)
        else:
            seen.text = json.loads(seen.body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, TypeError, AssertionError) as exc:
        seen.error_code = f"unreadable {seen.content_type}: {type(exc).__name__}"
    return seen


async def events_of(shim: Shim, count: int, settle_s: float = 1.0) -> list[UsageEvent]:
    """The topic's events: ``count`` of them, then whatever else comes within ``settle_s``."""
    consumer = AIOKafkaConsumer(
        shim.config.services.events_topic, bootstrap_servers=shim.config.services.kafka_bootstrap,
        auto_offset_reset="earliest", enable_auto_commit=False, group_id=None, max_partition_fetch_bytes=8 << 20,
    )
    await consumer.start()
    try:
        records: list = []
        deadline = time.monotonic() + 30
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=300, max_records=5000)).values():
                records.extend(unpacked(batch))
        until = time.monotonic() + settle_s
        while time.monotonic() < until:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(unpacked(batch))
        return [decode_event(r.value) for r in records]
    finally:
        await consumer.stop()


def inflight(shim: Shim, customer: str) -> int:
    client: redis.Redis = shim.redis()
    try:
        return sum(client.zcard(k) for k in client.scan_iter(f"{shim.names.prefix}:inflight:{{{customer}}}*"))
    finally:
        client.close()


def _row(name: str, seen: Seen, data: RequestData | None, reserved: tuple[int, int, dict[str, str]]) -> str:
    what = f"{seen.status} {seen.error_code or ''}".strip()
    if seen.text is not None:
        what += f" {len(seen.text or '')} chars"
    usage = "-" if data is None else f"{data.usage_source} {data.input_tokens}/{data.output_tokens} ({data.reason})"
    return f"| {name} | {what} | {usage} | held {reserved[0]}, entries {len(reserved[2])} |"


def _check(name: str, expect: Expect, got: Seen, mine: list[UsageEvent], shim: Shim, raw: bool) -> None:
    """``got`` and the request's events are what ``expect`` says, and its reservation is settled to its usage."""
    assert len(mine) == 1, f"{len(mine)} events"
    data = mine[0].data
    assert got.status == expect.status, (got.status, got.body[:300])
    assert got.error_code == expect.code
    if expect.text is not None:
        assert got.text == expect.text, (got.text or "")[:200]
    if raw and expect.stream and got.status == 200:  # labelled as what it is, whatever the upstream said
        assert got.content_type == "text/event-stream", got.content_type
    assert (data.usage_source, data.reason) == (expect.source, expect.reason)
    delivered = len((got.text or "").split())  # the words are one token each
    output = delivered if expect.output_tokens is None else expect.output_tokens
    assert (data.input_tokens, data.output_tokens) == (expect.input_tokens, output)
    if expect.source == "counted":
        assert data.output_tokens == delivered
    # Settled to the true usage (or released when there is none), nothing in flight.
    used = data.input_tokens + data.output_tokens
    reserved = shim.reserved(name)
    assert reserved[0] == used, reserved
    assert reserved[2] == ({mine[0].id: f"{used}:0"} if used else {}), reserved
    assert inflight(shim, name) == 0


CASES = {**{name: (name, e) for name, e in EXPECT.items()}, "sse-data-forever/cut": ("sse-data-forever", CUT)}


async def _run_all(shim: Shim, ask: Any, prefix: str) -> None:
    """Every case at once through ``ask(key, model, expect) -> Seen``, then the checks, with a table."""
    keys = {name: shim.new_key(prefix + name, e.tier) for name, (_, e) in CASES.items()}
    started = time.monotonic()
    seen = dict(zip(CASES, await asyncio.gather(*(ask(keys[n], model, e) for n, (model, e) in CASES.items())),
                    strict=True))
    elapsed = time.monotonic() - started
    by_customer: dict[str, list[UsageEvent]] = {}
    for event in await events_of(shim, len(CASES)):
        by_customer.setdefault(event.subject, []).append(event)
    rows, failures = [], []
    for name, (_, expect) in CASES.items():
        mine = by_customer.get(prefix + name, [])
        rows.append(_row(name, seen[name], mine[0].data if mine else None, shim.reserved(prefix + name)))
        try:
            _check(prefix + name, expect, seen[name], mine, shim, raw=not prefix)
        except AssertionError as failed:
            failures.append(f"{name}: {failed}")
    print(f"\n{prefix or 'raw'}: all answered in {elapsed:.1f} s")
    print("| behaviour | client gets | usage (reason) | reservation |\n|---|---|---|---|\n" + "\n".join(rows))
    assert not failures, "\n".join(failures)
    # The longest are the never-ending ones, ended by the shim well before the clients' 20 s timeout.
    assert elapsed < MAX_STREAM_S + 10


async def test_raw_clients_get_clear_answers_counted_and_settled(shim_factory: ShimFactory, hostile: h.Hostile) -> None:
    shim = await _shim(shim_factory, hostile)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        await _run_all(shim, lambda key, model, e: _raw(session, shim, key, model, e), "")


async def _sdk(shim: Shim, key: str, model: str, expect: Expect) -> Seen:
    """The official client's view: an answer, a stream it iterates to its end, or an error with a code."""
    seen = Seen(200, "", b"")
    extra = {"max_tokens": expect.max_tokens} if expect.max_tokens else {}
    async with shim.client(key, timeout=20) as client:
        try:
            if not expect.stream:
                completion = await client.chat.completions.create(model=model, messages=MESSAGES, **extra)
                seen.text = completion.choices[0].message.content
                return seen
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, stream=True, **extra)
            texts = []
            try:
                async for part in stream:
                    texts.extend(choice.delta.content or "" for choice in part.choices)
            except openai.APIError as ended:  # the budget cut's closing error event, after the last chunk
                assert not isinstance(ended, openai.APIStatusError)
                assert (ended.body or {}).get("code") == "budget_exceeded", ended
            seen.text = "".join(texts)
        except openai.APIStatusError as failed:
            seen.status, seen.error_code = failed.status_code, failed.code
            assert failed.body["message"].startswith("The model server"), failed.body  # ours, and plain
            if model == "error-200":
                assert "The engine is currently overloaded." in failed.message  # the upstream's own words
    return seen


async def test_the_openai_client_gets_clear_answers_counted_and_settled(
    shim_factory: ShimFactory, hostile: h.Hostile
) -> None:
    shim = await _shim(shim_factory, hostile)
    await _run_all(shim, lambda key, model, e: _sdk(shim, key, model, e), "sdk-")


async def test_the_usage_chunk_reaches_the_client_only_after_the_event_is_spooled(
    shim_factory: ShimFactory, hostile: h.Hostile
) -> None:
    """OpenAI's client takes a stream whose usage chunk arrived as served, even
    if the connection breaks before [DONE]. The upstream here pauses between
    its usage chunk and [DONE]; the shim is SIGKILLed in that pause, its event
    not spooled yet. The client must not have the usage chunk: the shim holds
    it back with [DONE] until the request's event is spooled."""
    shim = await _shim(shim_factory, hostile)
    client = shim.client(shim.new_key("stall-co", "roomy"))
    texts: list[str] = []
    usage = None
    stream = await client.chat.completions.create(
        model="sse-stall-before-done", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    killed_at = None
    try:
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and chunk.choices[0].finish_reason == "stop" and killed_at is None:
                await asyncio.sleep(h.STALL_BEFORE_DONE_S / 3)  # the usage chunk, sent after this one, would be here by now
                killed_at = time.monotonic()
                shim.process.kill()
            elif chunk.choices and chunk.choices[0].delta.content:
                texts.append(chunk.choices[0].delta.content)
    except openai.APIConnectionError:
        pass
    assert killed_at is not None and "".join(texts) == SIX, texts
    assert usage is None, f"the client had the usage chunk ({usage}) before the shim had spooled the request's event"
