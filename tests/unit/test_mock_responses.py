"""The mock model's Responses API in-process (aiohttp's test server)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer

from quotameter.embedded.mock_llm import MockLLM, completion_pieces

INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "hello there"}]}]
# The mock's own count, written down: 4 per item + "hello there" (2), 4 + "Be brief." (3) for the instructions.
INPUT_TOKENS = 4 + 2 + 4 + 3


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    async with TestClient(TestServer(MockLLM().app())) as test_client:
        yield test_client


async def test_a_json_response_has_the_mocks_usage(client: TestClient) -> None:
    body = {"model": "mock-small", "instructions": "Be brief.", "input": INPUT, "max_output_tokens": 5}
    answer = await (await client.post("/v1/responses", json=body)).json()
    assert answer["object"] == "response" and answer["status"] == "completed"
    assert answer["output"][0]["content"][0]["text"] == "".join(completion_pieces(5))
    assert (answer["usage"]["input_tokens"], answer["usage"]["output_tokens"]) == (INPUT_TOKENS, 5)


async def test_a_stream_is_named_numbered_and_ends_with_its_usage(client: TestClient) -> None:
    body = {"model": "mock-small", "instructions": "Be brief.", "input": INPUT, "stream": True}
    text = await (await client.post("/v1/responses", json=body)).text()
    events = [event.split("\n") for event in text.split("\n\n") if event]
    assert all(name == f"event: {json.loads(data[6:])['type']}" for name, data in events)
    data = [json.loads(data[6:]) for _, data in events]
    assert [event["sequence_number"] for event in data] == list(range(len(data)))
    assert data[0]["type"] == "response.created" and data[-1]["type"] == "response.completed"
    deltas = [event["delta"] for event in data if event["type"] == "response.output_text.delta"]
    assert deltas == completion_pieces(16)
    assert data[-1]["response"]["usage"]["input_tokens"] == INPUT_TOKENS


async def test_faults_and_a_missing_input(client: TestClient) -> None:
    assert (await client.post("/v1/responses", json={"model": "m"})).status == 400
    failed = await client.post("/v1/responses", json={"model": "m", "input": "x"}, headers={"x-mock-fault": "status=503"})
    assert failed.status == 503 and (await failed.json())["error"]["type"] == "server_error"
    silent = await client.post("/v1/responses", json={"model": "m", "input": "x"}, headers={"x-mock-fault": "no-usage"})
    assert (await silent.json())["usage"] is None
