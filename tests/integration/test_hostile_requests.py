"""Hostile and malformed requests against a real shim (real process, real
Redis, real broker, the mock LLM upstream): each gets its own 4xx in OpenAI's
error shape naming the parameter, never a 500, never a forwarded answer; each
is still recorded as one event with that status. And the shim stays up."""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import re
import socket
import time
from typing import Any

import aiohttp

from quotameter.events import decode_event
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_shim import Shim as TopicReader

CHAT = "/chat/completions"
MSGS = [{"role": "user", "content": "Hi."}]
LIMITS = {"max_body_bytes": 4 * 1024 * 1024, "client_body_timeout_s": 1.5, "max_messages": 50,
          "max_content_parts": 20, "max_json_depth": 64}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "mock-small", "messages": MSGS, **fields}


def _deep(depth: int) -> bytes:
    head = b'{"model":"mock-small","messages":[{"role":"user","content":"x"}],"extra":'
    return head + b"[" * depth + b"]" * depth + b"}"


# (name, path, body, expected status, expected param); the body is JSON-encoded unless bytes.
CASES: list[tuple[str, str, Any, int, str | None]] = [
    ("max_tokens 'lots'", CHAT, _chat(max_tokens="lots"), 400, "max_tokens"),
    ("model 42", CHAT, {"model": 42, "messages": MSGS}, 400, "model"),
    ("model ''", CHAT, {"model": "", "messages": MSGS}, 400, "model"),
    ("no model", CHAT, {"messages": MSGS}, 400, "model"),
    ("max_tokens -5", CHAT, _chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens 3.7", CHAT, _chat(max_tokens=3.7), 400, "max_tokens"),
    ("max_tokens true", CHAT, _chat(max_tokens=True), 400, "max_tokens"),
    ("max_completion_tokens 0", CHAT, _chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("n 'two'", CHAT, _chat(n="two"), 400, "n"),
    ("stream 'yes'", CHAT, _chat(stream="yes"), 400, "stream"),
    ("stream_options 'usage'", CHAT, _chat(stream=True, stream_options="usage"), 400, "stream_options"),
    ("messages 'hi'", CHAT, {"model": "mock-small", "messages": "hi"}, 400, "messages"),
    ("no messages", CHAT, {"model": "mock-small"}, 400, "messages"),
    ("messages [1]", CHAT, {"model": "mock-small", "messages": [1]}, 400, "messages[0]"),
    ("message without role", CHAT, {"model": "mock-small", "messages": [{"content": "x"}]}, 400, "messages[0].role"),
    ("51 messages (max 50)", CHAT, _chat(messages=MSGS * 51), 400, "messages"),
    ("21 content parts (max 20)", CHAT,
     _chat(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}] * 21}]), 400, "messages[0].content"),
    ("prompt {}", "/completions", {"model": "mock-small", "prompt": {"a": 1}}, 400, "prompt"),
    ("input 5", "/embeddings", {"model": "mock-small", "input": 5}, 400, "input"),
    ("no input", "/embeddings", {"model": "mock-small"}, 400, "input"),
    ("100,000 nested arrays", CHAT, _deep(100_000), 400, None),
    ("65 nested arrays (max 64)", CHAT, _deep(65), 400, None),
    ("body 20 MB (max 4 MiB)", CHAT, _chat(messages=[{"role": "user", "content": "a " * 10_000_000}]), 413, None),
]
# Well-formed, at the edges: forwarded and billed.
ACCEPTED: list[tuple[str, str, Any]] = [
    ("60 nested arrays", CHAT, _deep(60)),
    ("50 messages", CHAT, _chat(messages=MSGS * 50, max_tokens=5)),
    ("unknown fields pass", CHAT, _chat(temperature=0.5, whatever={"a": [1, 2]})),
]


async def _post(session: aiohttp.ClientSession, url: str, body: Any, key: str) -> tuple[int, dict[str, Any]]:
    data = io.BytesIO(body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with session.post(url, data=data, headers=headers) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, {"raw": text[:80]}


async def test_malformed_bodies_get_openai_errors_and_are_recorded(shim_factory: ShimFactory) -> None:
    shim = await shim_factory({}, shim=LIMITS)
    key = shim.new_key("hostile", "pro")
    answers: list[tuple[str, int, Any]] = []
    async with aiohttp.ClientSession() as session:
        for name, path, body, _, _ in CASES:
            status, answer = await _post(session, shim.base_url + path, body, key)
            answers.append((name, status, answer.get("error", answer)))
        accepted = [await _post(session, shim.base_url + path, body, key) for _, path, body in ACCEPTED]
    for name, status, error in answers:
        print(f"| {name} | {status} | {error.get('code') if isinstance(error, dict) else error} |")
    assert shim.process.alive, shim.process.log_tail()

    for (name, _, _, want_status, want_param), (_, status, error) in zip(CASES, answers, strict=True):
        assert status == want_status, (name, status, error)
        assert error["type"] == "invalid_request_error", (name, error)
        assert error["param"] == want_param, (name, error)
        assert error["message"] and isinstance(error["code"], str), (name, error)
    assert "4194304" in answers[-1][2]["message"]  # the limit is named
    assert [status for status, _ in accepted] == [200] * len(ACCEPTED), accepted

    reader = TopicReader(shim.config, shim.process, None)
    records = await reader.events(len(CASES) + len(ACCEPTED), settle_s=1.0)
    events = [decode_event(record.value).data for record in records]
    assert len(events) == len(CASES) + len(ACCEPTED)
    statuses = sorted(event.status for event in events)
    assert statuses == sorted([want for *_, want, _ in CASES] + [200] * len(ACCEPTED))
    for event in events:
        if event.status >= 400:  # refused before the upstream: nothing billed
            assert event.usage_source == "none" and event.input_tokens == 0 and event.output_tokens == 0, event
            assert event.reason, event
    by_reason = {event.reason for event in events if event.status == 400}
    assert {"invalid_type", "missing_required_parameter", "nesting_too_deep"} <= by_reason, by_reason
    assert "payload_too_large" in {event.reason for event in events if event.status == 413}


def _raw_exchange(port: int, head: bytes, body_parts: list[bytes], pause_s: float) -> bytes:
    """Send ``head`` and ``body_parts`` (``pause_s`` apart) on a raw socket; what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        try:
            for part in body_parts:
                time.sleep(pause_s)
                sock.sendall(part)
        except OSError:
            pass  # the shim hung up on us: read its answer
        answer = b""
        while data := sock.recv(65536):  # one answer: its head, then Content-Length bytes
            answer += data
            head, sep, rest = answer.partition(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            if sep and length and len(rest) >= int(length[1]):
                break
        return answer


async def test_limits_of_size_headers_and_time(shim_factory: ShimFactory) -> None:
    shim = await shim_factory({}, shim=LIMITS)
    key = shim.new_key("hostile", "pro")
    port = shim.config.shim.port
    body = json.dumps(_chat(max_tokens=3)).encode()

    def head(length: int, extra: bytes = b"") -> bytes:
        return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n").encode() + extra + b"\r\n"

    # A Content-Length past the limit is refused before a byte of the body is read.
    started = time.monotonic()
    answer = await asyncio.to_thread(_raw_exchange, port, head(50 * 1024 * 1024), [], 0)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"param": null' in answer and b"4194304 bytes" in answer and b"max_body_bytes" in answer, answer
    assert time.monotonic() - started < 5

    # A gzip bomb (50 KiB that decompress to 50 MiB): refused as it grows past the limit.
    bomb = gzip.compress(b"{" + b" " * (50 * 1024 * 1024), compresslevel=9)
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(bomb), b"Content-Encoding: gzip\r\n"), [bomb], 0)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A body that does not decompress as its Content-Encoding says: 400, not a failure.
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(body), b"Content-Encoding: gzip\r\n"), [body], 0)
    assert answer.startswith(b"HTTP/1.1 400") and b"invalid_content_encoding" in answer, answer[:300]

    # A slow body (slowloris): cut at client_body_timeout_s with 408.
    started = time.monotonic()
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(body)), [body[i:i + 1] for i in range(8)], 0.5)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"request_timeout" in answer and b"1.5" in answer, answer
    assert 1.4 < time.monotonic() - started < 6

    # Headers past the limit: aiohttp's own clean 400 (it closes the connection), and the shim serves on.
    big = b"X-Junk: " + b"a" * 20_000 + b"\r\n"
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(body), big), [body], 0)
    assert re.match(rb"HTTP/1.[01] 400 ", answer), answer[:200]
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(body), many), [body], 0)
    assert re.match(rb"HTTP/1.[01] 400 ", answer), answer[:200]

    # The well-formed request is served, and the shim is still up.
    answer = await asyncio.to_thread(_raw_exchange, port, head(len(body), b"Connection: close\r\n"), [body], 0)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:300]
    assert shim.process.alive, shim.process.log_tail()

    reader = TopicReader(shim.config, shim.process, None)
    events = [decode_event(record.value).data for record in await reader.events(5, settle_s=1.0)]
    # 413, 400 and 408 are recorded (the key was known); the header refusals come before any key is read.
    assert sorted((event.status, event.reason) for event in events) == [
        (200, None), (400, "invalid_content_encoding"), (408, "request_timeout"),
        (413, "payload_too_large"), (413, "payload_too_large")]

