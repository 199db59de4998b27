"""The Responses API (``POST /v1/responses``) through the real shim, with the
official ``openai`` client against the mock model: admission, the 429, a
stream cut at the budget that the SDK reads to its end, passthrough routes,
one stream through Envoy's ext_proc, and the ledger to the token of what
each client was served."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from quotameter.embedded import mock_responses
from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import free_port
from quotameter.tokens import count_response_input, count_text
from tests.integration.enforcement_helpers import Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for
from tests.integration.test_envoy import client as envoy_client
from tests.integration.test_envoy import model_port, start_envoy

INPUT = [{"role": "user", "content": [{"type": "input_text", "text": "Say some words."}]}]
INSTRUCTIONS = "Answer in words of one token."
# The mock counts the input its own way (mock_responses.input_tokens); the shim's
# estimate (count_response_input) differs, and only the shim's count of a cut stream bills.
MOCK_INPUT = mock_responses.input_tokens({"instructions": INSTRUCTIONS, "input": INPUT}, "mock-small")
SHIM_INPUT = count_response_input({"instructions": INSTRUCTIONS, "input": INPUT}, "mock-large")
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    "metered": {"requests_per_minute": 4, "monthly_tokens": 1_000_000, "upgrade_hint": "Upgrade to Pro."},
    "hard": {"monthly_budget_usd": "0.0001", "cut_streams": True, "upgrade_hint": "Upgrade to Pro."},
}
BUDGET_LEFT = 50  # micro-USD: the prompt at 1 each, then 4 per output token


def ledger(shim: Shim, customer: str) -> list[dict[str, Any]]:
    status, body = http_json(
        f"{shim.config.services.worker_url}/query",
        f"""SELECT id, count() AS copies, any(route) AS route, any(status) AS status, any(reason) AS reason,
                   any(input_tokens) AS input_tokens, any(output_tokens) AS output_tokens,
                   any(usage_source) AS usage_source, any(streamed) AS streamed
            FROM quotameter.events WHERE customer = '{customer}' GROUP BY id ORDER BY id""",
    )
    assert status == 200, body
    return body["rows"]


def rows_of(shim: Shim, customer: str, count: int) -> list[dict[str, Any]]:
    return wait_for(lambda: len(rows := ledger(shim, customer)) >= count and rows, 45.0, f"{customer}'s events")


async def _cut_stream(client: openai.AsyncOpenAI, sdk_stream: bool) -> tuple[str, list[Any]]:
    """The text a budget-cut stream served, and its events, read to the end by the SDK."""
    if sdk_stream:  # the helper that accumulates the response as events arrive
        async with client.responses.stream(model="mock-large", instructions=INSTRUCTIONS, input=INPUT) as stream:
            events = [event async for event in stream]
    else:
        events = [event async for event in await client.responses.create(
            model="mock-large", instructions=INSTRUCTIONS, input=INPUT, stream=True)]
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    return text, events


async def test_responses_admitted_refused_cut_passed_through_and_billed_to_the_token(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    """One shim (and its ext_proc port) for everything: the suite's time is counted."""
    ext_proc_port = free_port()
    shim = await shim_factory(TIERS, prices=PRICES,
                              shim={"passthrough_routes": ["/v1/files", "/v1/files/*"], "ext_proc_port": ext_proc_port})
    key = shim.new_key("writer", "metered")
    async with shim.client(key) as client:
        # A body the shim cannot meter: OpenAI's 400, naming the field.
        with pytest.raises(openai.BadRequestError) as bad:
            await client.responses.create(model="mock-small", input=INPUT, max_output_tokens=0)
        assert bad.value.body["param"] == "max_output_tokens" and bad.value.code == "invalid_value"

        # JSON: the mock's usage, as the client reads it; the shim's rate-limit headers.
        raw = await client.responses.with_raw_response.create(
            model="mock-small", instructions=INSTRUCTIONS, input=INPUT, max_output_tokens=5)
        answer = raw.parse()
        assert answer.output_text == "".join(completion_pieces(5))
        assert answer.usage is not None and (answer.usage.input_tokens, answer.usage.output_tokens) == (MOCK_INPUT, 5)
        assert raw.headers["x-ratelimit-limit-requests"] == "4" and raw.headers["x-ratelimit-remaining-requests"] == "2"

        # A stream: every event reaches the client, response.completed last (held until billed).
        events = [event async for event in await client.responses.create(
            model="mock-small", instructions=INSTRUCTIONS, input=INPUT, stream=True)]
        assert events[0].type == "response.created" and events[-1].type == "response.completed"
        streamed = events[-1].response
        assert streamed.output_text == "".join(completion_pieces(16))
        assert streamed.usage is not None and streamed.usage.output_tokens == 16

        # The SDK's accumulating helper, to its final response.
        async with client.responses.stream(
            model="mock-small", instructions=INSTRUCTIONS, input=INPUT, max_output_tokens=6
        ) as stream:
            async for _ in stream:
                pass
            final = await stream.get_final_response()
        assert final.output_text == "".join(completion_pieces(6)) and final.usage is not None

        # The fifth in the minute: OpenAI's 429, as the SDK raises it.
        with pytest.raises(openai.RateLimitError) as refused:
            await client.responses.create(model="mock-small", input=INPUT, max_output_tokens=5)
        error = refused.value
        assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
        assert "4 requests per minute" in error.message and "Upgrade to Pro." in error.message
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.response.headers["x-ratelimit-limit-requests"] == "4"
        assert 1 <= int(error.response.headers["Retry-After"]) <= 60
        assert error.response.headers["content-type"].startswith("application/json")

    # Cut at the budget: the SDK iterates both kinds of stream to their end, and learns why.
    cut_texts: list[str] = []
    for customer, sdk_stream in (("cutter", False), ("cutter-helper", True)):
        shim.set_totals(customer, micro_usd=BUDGET_LEFT)
        async with shim.client(shim.new_key(customer, "hard")) as cutter:
            text, events = await _cut_stream(cutter, sdk_stream)
        delivered = len(text.split())
        assert text == "".join(completion_pieces(delivered))
        assert SHIM_INPUT + 4 * delivered <= BUDGET_LEFT < SHIM_INPUT + 4 * (delivered + 1)
        errors = [event for event in events if event.type == "error"]
        assert len(errors) == 1 and errors[0].code == "budget_exceeded" and "budget reached" in errors[0].message
        last = events[-1]
        assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"
        assert last.response.usage.output_tokens == delivered and last.response.output_text == text
        cut_texts.append(text)

    # Other routes: an unknown one is the shim's 404 naming it; a listed one is proxied as is
    # (the mock has no /v1/files: its own 404 comes back), behind a valid key.
    async with aiohttp.ClientSession() as session:
        base, auth = shim.base_url, {"Authorization": f"Bearer {shim.new_key('filer', 'metered')}"}
        async with session.post(f"{base}/batches", json={}, headers=auth) as unknown:
            assert unknown.status == 404
            assert (await unknown.json())["error"]["message"].startswith("Unknown request URL: POST /v1/batches.")
        async with session.get(f"{base}/files/file-1", headers=auth) as passed:
            assert passed.status == 404 and not passed.content_type.startswith("application/json")  # the mock's
        async with session.get(f"{base}/files/file-1", headers={"Authorization": "Bearer sk-wrong"}) as stranger:
            assert stranger.status == 401 and (await stranger.json())["error"]["code"] == "invalid_api_key"

    # Through Envoy's ext_proc: the same lifecycle, the same stream, held end and all.
    envoy, port = await asyncio.to_thread(
        start_envoy, tmp_path, "ext_proc.yaml", ext_proc=ext_proc_port, model=model_port(shim)
    )
    try:
        async with envoy_client(port, shim.new_key("edge", "metered")) as edge:
            edge_events = [event async for event in await edge.responses.create(
                model="mock-small", instructions=INSTRUCTIONS, input=INPUT, max_output_tokens=7, stream=True)]
    finally:
        envoy.stop()
    assert edge_events[-1].type == "response.completed"
    edge_usage = edge_events[-1].response.usage
    assert edge_events[-1].response.output_text == "".join(completion_pieces(7))
    assert (edge_usage.input_tokens, edge_usage.output_tokens) == (MOCK_INPUT, 7)
    assert shim.reserved("edge")[0] == MOCK_INPUT + 7  # settled to the true usage

    # The check endpoint (auth_request, forwardAuth) reads a Responses body through the same dialect:
    # its input and max_output_tokens are what it reserves.
    checked = {"model": "mock-small", "instructions": INSTRUCTIONS, "input": INPUT, "max_output_tokens": 9}
    async with aiohttp.ClientSession() as session, session.post(
        f"{shim.base_url}/check", json=checked, headers={
            "Authorization": f"Bearer {shim.new_key('checked', 'metered')}", "X-Original-URI": "/v1/responses"},
    ) as admitted:
        assert admitted.status == 200, await admitted.text()
    assert shim.reserved("checked")[0] == count_response_input(checked, "mock-small") + 9

    # The ledger: each request once, to the token the client was served.
    await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
    rows = await asyncio.to_thread(rows_of, shim, "writer", 5)
    assert len(rows) == 5 and all(row["copies"] == 1 for row in rows)
    assert all(row["route"] == "/v1/responses" for row in rows)
    admitted = [row for row in rows if row["status"] == 200]
    served = [(answer.usage.input_tokens, answer.usage.output_tokens),
              (streamed.usage.input_tokens, streamed.usage.output_tokens),
              (final.usage.input_tokens, final.usage.output_tokens)]
    assert sorted((row["input_tokens"], row["output_tokens"]) for row in admitted) == sorted(served)
    assert all(row["usage_source"] == "upstream" and row["reason"] is None and row["streamed"] == (i > 0)
               for i, row in enumerate(sorted(admitted, key=lambda row: row["output_tokens"] != 5)))
    assert sorted(row["status"] for row in rows if row["status"] != 200) == [400, 429]
    for customer, text in zip(("cutter", "cutter-helper"), cut_texts, strict=True):
        (cut,) = await asyncio.to_thread(rows_of, shim, customer, 1)
        assert cut["reason"] == "budget_cut" and cut["usage_source"] == "counted" and cut["streamed"]
        assert (cut["input_tokens"], cut["output_tokens"]) == (SHIM_INPUT, count_text(text, "mock-large"))
    (passed_row,) = await asyncio.to_thread(rows_of, shim, "filer", 1)
    assert passed_row["route"] == "/v1/files/*" and passed_row["usage_source"] == "none"
    assert (passed_row["status"], passed_row["input_tokens"], passed_row["output_tokens"]) == (404, 0, 0)

    (edge_row,) = await asyncio.to_thread(rows_of, shim, "edge", 1)
    assert (edge_row["route"], edge_row["status"], edge_row["reason"], edge_row["usage_source"]) == (
        "/v1/responses", 200, None, "upstream")
    assert (edge_row["input_tokens"], edge_row["output_tokens"]) == (edge_usage.input_tokens, edge_usage.output_tokens)
