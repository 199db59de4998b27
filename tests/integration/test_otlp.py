"""The shim exporting over OTLP/HTTP (``OTEL_EXPORTER_OTLP_ENDPOINT``) to a
receiver the test runs (otlp_receiver.py), as it would to a collector.

One admitted request from the official openai client makes one trace: the
SERVER span, and under it ``quotameter.admit``, the GenAI CLIENT span of the
upstream call (its gen_ai.* attributes and usage equal to what the mock
served), and ``quotameter.settle``. A refused request's SERVER span says
why. The GenAI token-usage metric arrives with the same token sums. The
sampled request's trace context reaches its event, in the CloudEvent's
``traceparent`` and in the Kafka record's header of that name."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import openai
import pytest
import pytest_asyncio

from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS
from tests.integration.otlp_receiver import OtlpReceiver, Span, otlp_receiver  # noqa: F401
from tests.integration.pipeline_helpers import read_topic
from tests.integration.test_shim_telemetry import RunningShim, start_shim

MAX_TOKENS = 6
METRIC_MODEL = "mock-otlp"  # priced in this module's config: a model the metrics name
PRICES = [{"model": "mock-small", "input_per_million_usd": "0.10", "output_per_million_usd": "0.40"},
          {"model": METRIC_MODEL, "input_per_million_usd": "1.00", "output_per_million_usd": "2.00"}]


@pytest_asyncio.fixture(scope="module")
async def traced(
    otlp_receiver: OtlpReceiver, tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str
) -> AsyncIterator[RunningShim]:
    env = otlp_receiver.env(OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1.0")
    running = await asyncio.to_thread(start_shim, tmp_path_factory.mktemp("otlp"), redis_url, kafka_bootstrap,
                                      {"prices": PRICES}, env)
    yield running
    # In a thread: the shim's last export on its way out goes to the receiver on this loop.
    await asyncio.to_thread(running.shim.stop)
    running.mock.stop()


def children(spans: list[Span], parent: Span) -> dict[str, Span]:
    return {span.name: span for span in spans if span.parent_span_id == parent.span_id}


def server_spans(receiver: OtlpReceiver, outcome: str) -> list[Span]:
    return [s for s in receiver.spans if s.kind == "SERVER" and s.attributes.get("quotameter.outcome") == outcome]


async def test_a_request_is_one_trace_and_its_event_carries_it(
    traced: RunningShim, otlp_receiver: OtlpReceiver
) -> None:
    key, key_id = traced.new_key("traced-co", "metered")
    async with traced.client(key) as client:
        completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=MAX_TOKENS)
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (PROMPT_TOKENS, MAX_TOKENS)

    # The spans of the request: its SERVER span, then its three children.
    server = (await otlp_receiver.wait_for(lambda: server_spans(otlp_receiver, "admitted"), 15, "SERVER span"))[0]
    assert server.name == "POST /v1/chat/completions" and server.parent_span_id == ""
    assert server.resource["service.name"] == "quotameter-shim"
    assert server.attributes["http.request.method"] == "POST"
    assert server.attributes["url.path"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["quotameter.reason"] == ""
    spans = await otlp_receiver.wait_for(
        lambda: (found := children(otlp_receiver.spans, server)) and len(found) == 3 and found, 10, "child spans")
    assert set(spans) == {"quotameter.admit", "chat mock-small", "quotameter.settle"}
    assert all(span.trace_id == server.trace_id for span in spans.values())
    upstream = spans["chat mock-small"]
    assert upstream.kind == "CLIENT"
    assert upstream.attributes == {
        "gen_ai.operation.name": "chat", "gen_ai.provider.name": "openai",
        "gen_ai.request.model": "mock-small", "gen_ai.response.model": completion.model,
        "gen_ai.request.max_tokens": MAX_TOKENS, "http.response.status_code": 200,
        "gen_ai.usage.input_tokens": completion.usage.prompt_tokens,
        "gen_ai.usage.output_tokens": completion.usage.completion_tokens,
    }
    admit, settle = spans["quotameter.admit"], spans["quotameter.settle"]
    assert admit.attributes == {"quotameter.decision": "admitted", "quotameter.reason": ""}
    # In order, inside the request: admit, the upstream call, settle.
    assert server.start_ns <= admit.start_ns <= admit.end_ns <= upstream.start_ns
    assert upstream.end_ns <= settle.start_ns <= settle.end_ns <= server.end_ns

    # The event (as Kafka has it) carries the request's trace context, and so does its record.
    records = await read_topic(traced.config.services.kafka_bootstrap, traced.config.services.events_topic, 1,
                               keys={b"traced-co"})
    assert len(records) == 1
    event = json.loads(records[0].value)
    traceparent = event["traceparent"]
    version, trace_id, span_id, flags = traceparent.split("-")
    assert (version, trace_id, span_id) == ("00", server.trace_id, server.span_id)
    assert int(flags, 16) & 1  # sampled
    assert event["data"]["api_key_id"] == key_id
    assert (event["data"]["input_tokens"], event["data"]["output_tokens"]) == (PROMPT_TOKENS, MAX_TOKENS)
    assert dict(records[0].headers)["traceparent"] == traceparent.encode()


async def test_a_refused_request_span_says_why(traced: RunningShim, otlp_receiver: OtlpReceiver) -> None:
    key, _ = traced.new_key("refused-co", "tight")
    async with traced.client(key) as client:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
    server = (await otlp_receiver.wait_for(lambda: server_spans(otlp_receiver, "refused"), 15, "refused span"))[0]
    assert server.attributes["quotameter.reason"] == "rate_limit_requests"
    assert server.attributes["http.response.status_code"] == 429
    spans = await otlp_receiver.wait_for(lambda: children(otlp_receiver.spans, server), 10, "admit span")
    assert set(spans) == {"quotameter.admit"}  # never sent upstream, nothing to settle
    assert spans["quotameter.admit"].attributes["quotameter.reason"] == "rate_limit_requests"


async def test_token_usage_metric_arrives_over_otlp(traced: RunningShim, otlp_receiver: OtlpReceiver) -> None:
    key, _ = traced.new_key("metric-co", "metered")
    served = [0, 0]
    async with traced.client(key) as client:
        for max_tokens in (3, 8):  # a model of its own: these are its only points
            completion = await client.chat.completions.create(model=METRIC_MODEL, messages=MESSAGES,
                                                              max_tokens=max_tokens)
            assert completion.usage is not None and completion.model == METRIC_MODEL
            served[0] += completion.usage.prompt_tokens
            served[1] += completion.usage.completion_tokens
    assert served[1] == 11

    def totals() -> dict[str, tuple[int, float]] | None:
        points = [p for p in otlp_receiver.latest_points("gen_ai.client.token.usage")
                  if p.attributes["gen_ai.request.model"] == METRIC_MODEL]
        found = {p.attributes["gen_ai.token.type"]: (p.count, p.sum) for p in points}
        return found if found.get("output", (0, 0))[0] >= 2 else None

    found = await otlp_receiver.wait_for(totals, 15, "gen_ai.client.token.usage")
    assert found == {"input": (2, served[0]), "output": (2, served[1])}
    points = otlp_receiver.latest_points("gen_ai.client.token.usage")
    assert {p.unit for p in points} == {"{token}"}
    ours = [p for p in points if p.attributes["gen_ai.request.model"] == METRIC_MODEL]
    assert {(p.attributes["gen_ai.operation.name"], p.attributes["gen_ai.provider.name"],
             p.attributes["gen_ai.response.model"]) for p in ours} == {("chat", "openai", METRIC_MODEL)}
    tokens = otlp_receiver.latest_points("quotameter.shim.tokens")
    assert {p.attributes["type"]: p.value for p in tokens if p.attributes["model"] == METRIC_MODEL} == {
        "input": served[0], "output": served[1]}


async def test_the_clients_trace_context_is_followed(traced: RunningShim, otlp_receiver: OtlpReceiver) -> None:
    """A client's sampled traceparent makes the request part of its trace; an unsampled
    one (parent-based sampling) leaves no span, and the event no trace context."""
    key, _ = traced.new_key("joined-co", "metered")
    joined, dropped = "5" * 32, "6" * 32
    async with traced.client(key) as client:
        for trace_id, flags in ((joined, "01"), (dropped, "00")):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2,
                                                 extra_headers={"traceparent": f"00-{trace_id}-{'7' * 16}-{flags}"})
    server = (await otlp_receiver.wait_for(
        lambda: [s for s in otlp_receiver.spans if s.kind == "SERVER" and s.trace_id == joined], 15, "joined span"))[0]
    assert server.parent_span_id == "7" * 16
    records = await read_topic(traced.config.services.kafka_bootstrap, traced.config.services.events_topic, 2,
                               keys={b"joined-co"})
    contexts = sorted(json.loads(r.value).get("traceparent", "none")[:35] for r in records)
    assert contexts == [f"00-{joined}", "none"]
    await asyncio.sleep(0.5)  # a batch of spans more: none of the unsampled request's
    assert not [s for s in otlp_receiver.spans if s.trace_id == dropped]
