"""The shim's own telemetry, read as an operator reads it: ``GET /metrics``
after a known mix of traffic from the official openai client through the real
shim to the mock model (JSON and streamed answers, a refusal by requests per
minute, an unknown route, the model's 5xx), and the shim's JSON log lines.

The counters equal what was sent, and the token sums what the client was
served, to the token; the exposition names no key, no end user and no
customer (a second shim with ``customer_labels`` shows the customer label);
every access line parses, names the request's event id (as in its Kafka
event), customer and key id, and never the key."""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from gateway_shim.keystore import create_key, list_keys
from quotameter.config import Config
from quotameter.embedded.mock_llm import FAULT_HEADER
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.redis_keys import RedisKeys
from tests.conftest import make_config
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS
from tests.integration.pipeline_helpers import read_topic

TIERS = {
    "metered": {"requests_per_minute": 100, "tokens_per_minute": 1_000_000},
    "tight": {"requests_per_minute": 1},  # its second request in the minute is refused
}
END_USER = "enduser-4b1d"  # named in a body: it must never become a label


@dataclass
class RunningShim:
    config: Config
    shim: ManagedProcess
    mock: ManagedProcess

    @property
    def base_url(self) -> str:
        return f"http://{self.config.shim.host}:{self.config.shim.port}"

    def new_key(self, customer: str, tier: str) -> tuple[str, str]:
        """A key of ``customer`` in ``tier``: (the key, its id)."""
        import redis

        client = redis.Redis.from_url(self.config.services.redis_url)
        try:
            created = create_key(client, RedisKeys(self.config.services.redis_prefix), customer, tier)
            record = next(r for r in list_keys(client, RedisKeys(self.config.services.redis_prefix))
                          if r.customer == customer)
            return created.plaintext, record.key_id
        finally:
            client.close()

    def client(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=20)

    async def scrape(self) -> str:
        async with aiohttp.ClientSession() as session, session.get(f"{self.base_url}/metrics") as response:
            assert response.status == 200, await response.text()
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            return await response.text()


def start_shim(root: Path, redis_url: str, kafka_bootstrap: str, overrides: dict[str, Any],
               env: dict[str, str] | None = None) -> RunningShim:
    """The mock model and a shim in front of it, real processes; the shim forgets an
    event once Kafka has it (no worker runs)."""
    mock_port = free_port()
    mock = ManagedProcess("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)],
                          root / "mock.log").start()
    document = {"upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "tiers": TIERS,
                "shim": {"delivery": "broker"}, **overrides}
    config, path = make_config(root, redis_url, kafka_bootstrap, uuid.uuid4().hex[:10], document)
    shim = ManagedProcess("shim", [sys.executable, "-m", "quotameter", "proxy"], root / "shim.log",
                          env={"QUOTAMETER_CONFIG": str(path), **(env or {})}).start()
    try:
        mock.wait_port("127.0.0.1", mock_port)
        shim.wait_port(config.shim.host, config.shim.port)
    except Exception:
        shim.stop()
        mock.stop()
        raise
    return RunningShim(config, shim, mock)


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The exposition's samples by sample name: [(labels, value)]."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def value(found: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples whose labels include ``labels``."""
    assert name in found, f"{name} not in the exposition: {sorted(found)}"
    return sum(v for sample_labels, v in found[name] if labels.items() <= sample_labels.items())


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[RunningShim]:
    running = start_shim(tmp_path_factory.mktemp("telemetry"), redis_url, kafka_bootstrap,
                         {"telemetry": {"log_format": "json"}})
    yield running
    running.shim.stop()
    running.mock.stop()


@dataclass
class Traffic:
    key: str
    key_id: str
    tight_key: str
    tight_key_id: str
    input_tokens: int
    output_tokens: int
    exposition: str


@pytest_asyncio.fixture(scope="module")
async def traffic(shim: RunningShim) -> AsyncIterator[Traffic]:
    """The mix, sent once: 2 JSON + 1 stream admitted, 1 upstream 500, 1 admitted and 1
    refused by requests/min in the tight tier, 1 unknown route."""
    key, key_id = shim.new_key("acme-telemetry", "metered")
    tight_key, tight_key_id = shim.new_key("tight-telemetry", "tight")
    input_tokens = output_tokens = 0
    async with shim.client(key) as client:
        for max_tokens in (5, 9):
            completion = await client.chat.completions.create(
                model="mock-small", messages=MESSAGES, max_tokens=max_tokens, user=END_USER)
            assert completion.usage is not None
            input_tokens += completion.usage.prompt_tokens
            output_tokens += completion.usage.completion_tokens
        stream = await client.chat.completions.create(
            model="mock-small", messages=MESSAGES, max_tokens=7, stream=True, stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == 7
        assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) == 7  # what the client read
        input_tokens += usage.prompt_tokens
        output_tokens += usage.completion_tokens
        with pytest.raises(openai.InternalServerError) as failed:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5,
                                                 extra_headers={FAULT_HEADER: "status=500"})
        assert failed.value.status_code == 500
    async with shim.client(tight_key) as client:
        completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3)
        assert completion.usage is not None
        input_tokens += completion.usage.prompt_tokens
        output_tokens += completion.usage.completion_tokens
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3)
        assert refused.value.code == "rate_limit_exceeded"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{shim.base_url}/v1/no/such/route", json={},
                                headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status == 404
    assert input_tokens == 4 * PROMPT_TOKENS and output_tokens == 5 + 9 + 7 + 3
    yield Traffic(key, key_id, tight_key, tight_key_id, input_tokens, output_tokens, await shim.scrape())


async def test_metrics_count_the_requests_and_the_tokens_served(traffic: Traffic) -> None:
    found = samples(traffic.exposition)
    requests = "quotameter_shim_requests_total"
    chat = {"route": "chat", "model": "mock-small"}
    assert value(found, requests, **chat, outcome="admitted", reason="", limit_kind="", tier="metered") == 3
    assert value(found, requests, **chat, outcome="admitted", tier="tight") == 1
    assert value(found, requests, **chat, outcome="refused", reason="rate_limit_requests", limit_kind="rpm",
                 tier="tight") == 1
    assert value(found, requests, **chat, outcome="upstream_error", reason="upstream_error", tier="metered") == 1
    assert value(found, requests, route="unknown", outcome="error", reason="unknown_url") == 1
    assert value(found, requests) == 7  # nothing else was counted
    assert value(found, "quotameter_shim_upstream_errors_total", route="chat", kind="status_5xx") == 1
    assert value(found, "quotameter_shim_upstream_errors_total") == 1

    # Tokens, to the token, as the client was served them.
    tokens = "quotameter_shim_tokens_total"
    assert value(found, tokens, type="input", model="mock-small") == traffic.input_tokens
    assert value(found, tokens, type="output", model="mock-small") == traffic.output_tokens
    assert value(found, tokens, type="input", tier="tight") == PROMPT_TOKENS
    usage = "gen_ai_client_token_usage"
    genai = {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "openai",
             "gen_ai_request_model": "mock-small", "gen_ai_response_model": "mock-small"}
    assert value(found, f"{usage}_sum", **genai, gen_ai_token_type="input") == traffic.input_tokens
    assert value(found, f"{usage}_sum", **genai, gen_ai_token_type="output") == traffic.output_tokens
    assert value(found, f"{usage}_count", gen_ai_token_type="output") == 4  # the 500 reported none
    # mock-small: $0.10 in, $0.40 out per 1M tokens, in integer micro-USD per request.
    expected_cost = sum(n * 0.10 + o * 0.40 for n, o in ((11, 5), (11, 9), (11, 7), (11, 3)))
    assert value(found, "quotameter_shim_cost_total", model="mock-small") == pytest.approx(expected_cost, abs=4)

    # Durations: one admission per admitted or refused request, one upstream call per forwarded one.
    admission = "quotameter_shim_admission_duration_seconds_count"
    assert value(found, admission, route="chat") == 6
    assert value(found, "quotameter_shim_upstream_duration_seconds_count", route="chat", status_class="2xx") == 4
    assert value(found, "quotameter_shim_upstream_duration_seconds_count", route="chat", status_class="5xx") == 1
    assert value(found, "quotameter_shim_added_duration_seconds_count", streamed="true") == 1
    assert value(found, "quotameter_shim_added_duration_seconds_count", streamed="false") == 4
    operation = "gen_ai_client_operation_duration_seconds_count"
    assert value(found, operation, gen_ai_operation_name="chat", error_type="500") == 1
    assert value(found, operation, gen_ai_operation_name="chat") == 5
    assert value(found, "quotameter_shim_inflight") == 0
    assert value(found, "quotameter_shim_spool_depth") >= 0 and "quotameter_shim_spool_age_seconds" in found


async def test_metrics_name_no_key_end_user_or_customer(traffic: Traffic) -> None:
    text = traffic.exposition
    for secret in (traffic.key, traffic.tight_key, traffic.key_id, END_USER, "acme-telemetry", "tight-telemetry"):
        assert secret not in text
    assert "customer=" not in text


async def test_json_access_lines_carry_the_request_and_never_the_key(shim: RunningShim, traffic: Traffic) -> None:
    # The events Kafka got: 6 (the unknown route has no customer, so no event).
    records = await read_topic(shim.config.services.kafka_bootstrap, shim.config.services.events_topic, 6)
    events = {json.loads(r.value)["id"]: json.loads(r.value) for r in records}
    assert len(events) == 6
    # Not traced (no OTLP endpoint): the events and their records carry no trace context.
    assert not [e for e in events.values() if "traceparent" in e]
    assert not [r for r in records if "traceparent" in dict(r.headers)]
    lines = [line for line in shim.shim.log_path.read_text().splitlines() if line.startswith("{")]
    parsed = [json.loads(line) for line in lines]  # every JSON line parses
    assert parsed and all({"time", "level", "logger", "message"} <= p.keys() for p in parsed)
    access = [p for p in parsed if p["logger"] == "quotameter.access"]
    by_id = {p["request_id"]: p for p in access if "request_id" in p}
    assert by_id.keys() == events.keys()
    for event_id, line in by_id.items():
        data = events[event_id]["data"]
        assert line["event_id"] == event_id and line["key_id"] == data["api_key_id"]
        assert line["customer"] == events[event_id]["subject"]
        assert (line["status"], line["input_tokens"], line["output_tokens"]) == (
            data["status"], data["input_tokens"], data["output_tokens"])
        assert line["message"] == f"POST /v1/chat/completions {data['status']} {line['outcome']}"
    outcomes = sorted(line["outcome"] for line in by_id.values())
    assert outcomes == ["admitted"] * 4 + ["refused", "upstream_error"]
    unknown = [p for p in access if p["path"] == "/v1/no/such/route"]
    assert len(unknown) == 1 and unknown[0]["status"] == 404 and unknown[0]["reason"] == "unknown_url"
    log = shim.shim.log_path.read_text()
    for secret in (traffic.key, traffic.tight_key):
        assert secret not in log


async def test_customer_label_only_when_configured(
    tmp_path: Path, redis_url: str, kafka_bootstrap: str
) -> None:
    labelled = await asyncio.to_thread(start_shim, tmp_path, redis_url, kafka_bootstrap,
                                       {"telemetry": {"customer_labels": True, "access_log": False}})
    try:
        key, _ = labelled.new_key("labelled-co", "metered")
        async with labelled.client(key) as client:
            completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=4)
        assert completion.usage is not None
        found = samples(await labelled.scrape())
        assert value(found, "quotameter_shim_requests_total", customer="labelled-co", outcome="admitted") == 1
        assert value(found, "quotameter_shim_tokens_total", customer="labelled-co", type="output") == 4
        assert not [line for line in labelled.shim.log_path.read_text().splitlines() if "quotameter.access" in line]
    finally:
        labelled.shim.stop()
        labelled.mock.stop()
