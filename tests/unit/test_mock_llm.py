"""The mock LLM in-process (aiohttp's test server), no other services."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from quotameter.embedded.mock_llm import MockLLM, completion_pieces, parse_fault

MESSAGES = [{"role": "user", "content": "hello there"}]
# 3 per message + "user" (1) + "hello there" (2) + 3 priming the reply, under
# o200k_base (tiktoken agrees): written down, not counted by the code under test.
PROMPT_TOKENS = 9


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(MockLLM().app())) as test_client:
        yield test_client


def _chunks(text: str) -> list[dict]:
    lines = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


async def test_health_and_models(client: TestClient) -> None:
    assert (await client.get("/healthz")).status == 200
    models = await (await client.get("/v1/models")).json()
    assert models["object"] == "list" and "mock-small" in [m["id"] for m in models["data"]]


async def test_completion_reports_deterministic_usage(client: TestClient) -> None:
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "max_tokens": 7}
    answer = await (await client.post("/v1/chat/completions", json=body)).json()
    assert answer["model"] == "gpt-4o-mini"
    assert answer["choices"][0]["message"]["content"] == "".join(completion_pieces(7))
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {
        "prompt_tokens": PROMPT_TOKENS,
        "completion_tokens": 7,
        "total_tokens": PROMPT_TOKENS + 7,
    }
    default = await (await client.post("/v1/chat/completions", json={"messages": MESSAGES})).json()
    assert default["usage"]["completion_tokens"] == 16 and default["model"] == "mock-small"


async def test_stream_with_and_without_usage(client: TestClient) -> None:
    body = {"messages": MESSAGES, "max_completion_tokens": 3, "stream": True}
    response = await client.post("/v1/chat/completions", json=body)
    assert response.content_type == "text/event-stream"
    chunks = _chunks(await response.text())
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "".join(completion_pieces(3))
    assert len({c["id"] for c in chunks}) == 1

    body["stream_options"] = {"include_usage": True}
    chunks = _chunks(await (await client.post("/v1/chat/completions", json=body)).text())
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["usage"] is None for c in chunks[:-1])  # as OpenAI sends them


async def test_fault_cut_after_ends_the_connection_abruptly(client: TestClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 10, "stream": True}
    response = await client.post("/v1/chat/completions", json=body, headers={"x-mock-fault": "cut-after=3"})
    received = b""
    with pytest.raises(aiohttp.ClientPayloadError):
        async for data in response.content.iter_any():
            received += data
    assert b"[DONE]" not in received
    assert received.count(b'"content"') == 4  # the role chunk and three words


async def test_fault_status_garbage_and_no_usage(client: TestClient) -> None:
    failed = await client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"x-mock-fault": "status=503"})
    assert failed.status == 503 and (await failed.json())["error"]["type"] == "server_error"
    garbage = await client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"x-mock-fault": "garbage"})
    assert garbage.status == 200
    with pytest.raises(ValueError):
        json.loads(await garbage.text())
    silent = await client.post("/v1/chat/completions", json={"messages": MESSAGES}, headers={"x-mock-fault": "no-usage"})
    assert "usage" not in await silent.json()


async def test_bad_requests(client: TestClient) -> None:
    assert (await client.post("/v1/chat/completions", data=b"{nope")).status == 400
    assert (await client.post("/v1/chat/completions", json={"model": "x"})).status == 400


def test_parse_fault() -> None:
    fault = parse_fault("cut-after=3, no-usage")
    assert fault.cut_after == 3 and fault.no_usage and fault.status is None
    assert parse_fault(None) == parse_fault("")
