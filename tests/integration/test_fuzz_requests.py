"""Property-based: arbitrary bodies and headers against a real shim in front of
the mock LLM. Whatever arrives, the shim never answers 500, stays up, records
every request it took as exactly one event with the answer's status, bills a
served answer to the token, and records each malformed body as refused."""

from __future__ import annotations

import asyncio
import http.client
import json
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quotameter.events import decode_event
from tests.integration.enforcement_helpers import MESSAGES, ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_shim import Shim as TopicReader

LIMITS = {"max_json_depth": 16, "max_messages": 20, "max_content_parts": 8, "max_body_bytes": 256 * 1024,
          "max_header_bytes": 2048, "max_headers": 40}
TIERS = {"pro": {"requests_per_minute": 100_000}}
# The shim's own refusals of a body (request_checks.py, request_body.py): each is recorded with its code as reason.
SHIM_CODES = {"invalid_json", "invalid_type", "invalid_value", "missing_required_parameter", "too_many_items",
              "nesting_too_deep", "payload_too_large", "invalid_content_encoding"}
PATHS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]

_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=20)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
_small_ints = st.integers(-3, 40) | st.sampled_from([0, 2**31, 2**31 - 1, 10**30])
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant"]) | _scalars},
    optional={
        "content": st.text(max_size=40) | _json | st.lists(
            st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=10)}) | _scalars, max_size=10),
        "name": st.text(max_size=8)},
)
# Near-valid bodies (every field admission reads, sometimes wrong), arbitrary JSON, and raw bytes.
_fields = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["mock-small", "gpt-4o", ""]) | _scalars,
        "messages": st.lists(_message, max_size=22) | _json,
        "prompt": st.text(max_size=20) | st.lists(st.integers(0, 1000), max_size=5) | _json,
        "input": st.text(max_size=20) | st.lists(st.text(max_size=5), max_size=3) | _json,
        "max_tokens": _small_ints | _scalars,
        "max_completion_tokens": _small_ints | _scalars,
        "n": _small_ints,
        "stream": st.booleans() | _scalars,
        "stream_options": st.just({"include_usage": False}) | _json,
        "temperature": _json,
        "deep": st.integers(0, 40).map(lambda depth: json.loads("[" * depth + "]" * depth) if depth else []),
    },
)
_valid = st.fixed_dictionaries(
    {"model": st.sampled_from(["mock-small", "gpt-4o", "unpriced-model"]),
     "messages": st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(max_size=30)}),
                          min_size=1, max_size=3)},
    optional={"max_tokens": st.integers(1, 30) | st.none(), "n": st.integers(1, 3), "stream": st.booleans(),
              "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "temperature": _json},
)
_bodies = (
    _valid.map(lambda body: json.dumps(body).encode())
    | _valid.map(lambda body: json.dumps(body).encode())
    | _valid.map(lambda body: json.dumps(body).encode())
    | _fields.map(lambda body: json.dumps(body).encode())
    | _json.map(lambda value: json.dumps(value).encode())
    | st.binary(max_size=64)
    | st.integers(1, 400).map(
        lambda kb: json.dumps({"model": "mock-small", "messages": MESSAGES, "pad": "x" * kb * 1024}).encode())
)
_header_names = st.sampled_from(["Content-Type", "Content-Encoding", "Expect", "Accept", "X-Request-Id", "User-Agent",
                                 "OpenAI-Organization", "Accept-Encoding"]) | st.from_regex(r"\AX-[A-Za-z0-9-]{1,20}\Z")
_header_values = (
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
    | st.sampled_from(["gzip", "deflate", "br", "application/json", "text/plain", "100-continue", "identity"])
    | st.integers(1, 5000).map(lambda n: "v" * n)
)
_headers = st.lists(st.tuples(_header_names, _header_values), max_size=6)


def _send(port: int, key: str, path: str, body: bytes, headers: list[tuple[str, str]]) -> tuple[int, str, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        connection.putrequest("POST", path, skip_accept_encoding=True)
        connection.putheader("Authorization", f"Bearer {key}")
        for name, value in headers:
            if name.lower() not in ("expect",):  # a 100-continue that is never answered would hang http.client
                connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type") or "", response.read()
    finally:
        connection.close()


async def test_no_body_or_header_breaks_the_shim_or_goes_unbilled(shim_factory: ShimFactory) -> None:
    shim = await shim_factory(TIERS, shim=LIMITS)
    key = shim.new_key("fuzzed", "pro")
    port = shim.config.shim.port
    answers: list[tuple[int, str | None, dict[str, Any] | None]] = []  # status, the shim's error code, usage
    header_refusals = 0

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(path=st.sampled_from(PATHS[:1] * 3 + PATHS), body=_bodies, headers=_headers)
    def fuzz(path: str, body: bytes, headers: list[tuple[str, str]]) -> None:
        nonlocal header_refusals
        status, content_type, raw = _send(port, key, path, body, headers)
        assert status < 500, (status, raw[:300], body[:200], headers)
        if status == 400 and content_type.startswith("text/plain"):
            # aiohttp's own answer, before any key is read (no event): headers past
            # max_header_bytes, a repeated Content-Type or User-Agent, or a body it
            # cannot start to decompress.
            names = Counter(name.lower() for name, _ in headers)
            assert (any(len(value) + 2 > LIMITS["max_header_bytes"] for _, value in headers)
                    or names["content-encoding"] or names["content-type"] > 1 or names["user-agent"] > 1), raw
            header_refusals += 1
            return
        if content_type.startswith("text/event-stream"):
            answers.append((status, None, None))
            return
        answer = json.loads(raw)
        error = answer.get("error") if isinstance(answer, dict) else None
        if status >= 400:
            assert isinstance(error, dict) and error["message"] and "param" in error, answer
            code = error["code"] if error["code"] in SHIM_CODES and status in (400, 413) else None
            answers.append((status, code, None))
        else:
            answers.append((status, None, answer.get("usage")))

    await asyncio.to_thread(fuzz)
    assert shim.process.alive, shim.process.log_tail()
    assert (await shim.health())["status"] == "ok"

    reader = TopicReader(shim.config, shim.process, None)
    events = [decode_event(record.value).data for record in await reader.events(len(answers), settle_s=1.5)]
    # Exactly one event per request the shim took, with its answer's status.
    assert Counter(status for status, _, _ in answers) == Counter(event.status for event in events)
    # Each body the shim refused is recorded as refused for that reason, and billed nothing.
    assert Counter(code for _, code, _ in answers if code) == Counter(
        event.reason for event in events if event.reason in SHIM_CODES)
    for event in events:
        if event.reason in SHIM_CODES:
            assert event.usage_source == "none" and event.input_tokens == event.output_tokens == 0, event
    # Every answer served with usage is billed to the token.
    served = Counter((usage["prompt_tokens"], usage["completion_tokens"]) for _, _, usage in answers if usage)
    billed = Counter((event.input_tokens, event.output_tokens) for event in events
                     if event.status == 200 and not event.streamed and event.route == "/v1/chat/completions")
    assert served == billed
    print(f"\n{len(answers)} requests: {sorted(Counter(s for s, _, _ in answers).items())}, "
          f"{header_refusals} header refusals; shim codes {sorted(Counter(c for _, c, _ in answers if c).items())}")
