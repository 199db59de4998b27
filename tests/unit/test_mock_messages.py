"""The mock model's Messages API in-process, read by the official ``anthropic``
client: JSON and streams parse as Anthropic's, usage is the mock's own count,
the prompt cache writes once then reads."""

from __future__ import annotations

from collections.abc import AsyncIterator

import anthropic
import pytest
from aiohttp.test_utils import TestServer

from quotameter.embedded.mock_llm import FAULT_HEADER, MockLLM, completion_pieces

SYSTEM = "You are terse."
MESSAGES = [{"role": "user", "content": "Say some words."}]
PROMPT_TOKENS = 4 + (3 + 4) + 3  # system, one framed message, reply priming (o200k_base, written down)


@pytest.fixture
async def client() -> AsyncIterator[anthropic.AsyncAnthropic]:
    server = TestServer(MockLLM().app(), host="127.0.0.1")
    await server.start_server()
    try:
        async with anthropic.AsyncAnthropic(base_url=str(server.make_url("")), api_key="unused", max_retries=0,
                                            timeout=10) as sdk:
            yield sdk
    finally:
        await server.close()


async def test_a_message_counts_its_prompt_and_stops_at_max_tokens(client: anthropic.AsyncAnthropic) -> None:
    message = await client.messages.create(model="mock-large", max_tokens=5, system=SYSTEM, messages=MESSAGES)
    assert message.type == "message" and message.model == "mock-large"
    assert message.content[0].text == "".join(completion_pieces(5))
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert (message.usage.cache_read_input_tokens, message.usage.cache_creation_input_tokens) == (0, 0)
    longer = await client.messages.create(model="mock-small", max_tokens=100, messages=MESSAGES)
    assert longer.stop_reason == "end_turn" and longer.usage.output_tokens == 16


async def test_a_stream_is_accumulated_by_the_sdk(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model="mock-small", max_tokens=7, system=SYSTEM, messages=MESSAGES) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert final.content[0].text == "".join(completion_pieces(7))
    assert (final.usage.input_tokens, final.usage.output_tokens, final.stop_reason) == (PROMPT_TOKENS, 7, "max_tokens")


async def test_the_prompt_cache_is_written_once_then_read(client: anthropic.AsyncAnthropic) -> None:
    system = [{"type": "text", "text": SYSTEM, "cache_control": {"type": "ephemeral"}}]
    first = await client.messages.create(model="mock-small", max_tokens=3, system=system, messages=MESSAGES)
    second = await client.messages.create(model="mock-small", max_tokens=3, system=system, messages=MESSAGES)
    assert (first.usage.cache_creation_input_tokens, first.usage.cache_read_input_tokens) == (4, 0)
    assert (second.usage.cache_creation_input_tokens, second.usage.cache_read_input_tokens) == (0, 4)
    assert first.usage.input_tokens == second.usage.input_tokens == PROMPT_TOKENS - 4


async def test_faults_answer_in_anthropics_error_shape(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(model="mock-small", max_tokens=3, messages=MESSAGES,
                                     extra_headers={FAULT_HEADER: "status=529"})
    assert caught.value.status_code == 529
    assert caught.value.body == {"type": "error", "error": {"type": "overloaded_error",
                                                            "message": "mock fault: status 529"}}
    with pytest.raises(anthropic.BadRequestError):
        await client.messages.create(model="mock-small", max_tokens=0, messages=MESSAGES)
