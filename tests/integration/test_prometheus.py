"""Debian's Prometheus 2.42, started here on 127.0.0.1 with
deploy/prometheus/prometheus.yml (scrape every second) and its alert rules,
scraping a real shim and a real worker. Known traffic goes through the shim
with the official openai client: admitted answers (JSON and streamed), one
the model fails, and refusals. Through Prometheus's HTTP API the request
counters by outcome, the token counters and the cost (integer micro-USD)
equal what the client was served, and what the ledger holds; the rules load;
every PromQL expression of the service-health dashboard evaluates; and the
built-in dashboard's live figures are the ones Prometheus scraped."""

from __future__ import annotations

import asyncio
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any
import openai
import pytest
import redis
import yaml

from dashboards.service_health import SERVICE_HEALTH
from gateway_shim.keystore import create_key
from quotameter.config import Config
from quotameter.embedded.mock_llm import FAULT_HEADER
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.redis_keys import RedisKeys
from tests.conftest import make_config
from tests.integration.enforcement_helpers import MESSAGES
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for
from tests.integration.prometheus_binaries import DEPLOY, Prometheus, scrape_config
from tests.integration.test_ingest import ledger_rows

CUSTOMER = "scraped"
RPM = 6  # requests a minute: the seventh and eighth are refused
JSON_MAX_TOKENS = (7, 9, 11)
STREAM_MAX_TOKENS = (5, 13)
TIERS = {"watched": {"requests_per_minute": RPM, "tokens_per_minute": 1_000_000, "default_max_tokens": 50}}
PRICES = [{"model": "mock-small", "input_per_million_usd": "1.00", "output_per_million_usd": "2.00"}]
PRICE_MICRO_USD = {"input": 1, "output": 2}  # per token: the prices above
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval stands for at a 15 s scrape


@dataclass
class Stack:
    config: Config
    config_path: Path
    prometheus: Prometheus
    start: Callable[..., ManagedProcess]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str) -> Iterator[Stack]:
    directory = tmp_path_factory.mktemp("prometheus")
    mock_port = free_port()
    config, path = make_config(directory, redis_url, kafka_bootstrap, uuid.uuid4().hex[:10], {
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "tiers": TIERS, "prices": PRICES})
    started: list[ManagedProcess] = []

    def start(name: str, *args: str, config_path: Path | None = path) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], directory / f"{name}.log",
                              env={"QUOTAMETER_CONFIG": str(config_path)}).start()
        started.append(proc)
        return proc

    prometheus = None
    try:
        start("mock", "mock-llm", "--port", str(mock_port)).wait_port("127.0.0.1", mock_port)
        start_worker(start, config, path, "worker")
        start("shim", "proxy").wait_port(config.shim.host, config.shim.port)
        worker = config.services.worker_url.removeprefix("http://")
        prometheus = Prometheus(scrape_config(directory, {"quotameter-shim": f"127.0.0.1:{config.shim.port}",
                                                          "quotameter-worker": worker}), directory).start()
        prometheus.wait_scraped({"quotameter-shim", "quotameter-worker"})
        yield Stack(config, path, prometheus, start)
    finally:
        if prometheus is not None:
            prometheus.stop()
        for proc in reversed(started):
            proc.stop()


@dataclass
class Served:
    input_tokens: int = 0
    output_tokens: int = 0
    outcomes: dict[str, int] | None = None


async def send_traffic(stack: Stack) -> Served:
    """Five answers (three JSON, two streamed), one the model fails with a 500, two refusals."""
    client_redis = redis.Redis.from_url(stack.config.services.redis_url, decode_responses=True)
    try:
        key = create_key(client_redis, RedisKeys(stack.config.services.redis_prefix), CUSTOMER, "watched").plaintext
    finally:
        client_redis.close()
    base_url = f"http://{stack.config.shim.host}:{stack.config.shim.port}/v1"
    client = openai.AsyncOpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=20)
    served = Served()
    try:
        for max_tokens in JSON_MAX_TOKENS:
            answer = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=max_tokens)
            served.input_tokens += answer.usage.prompt_tokens
            served.output_tokens += answer.usage.completion_tokens
        for max_tokens in STREAM_MAX_TOKENS:
            stream = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=max_tokens,
                                                          stream=True, stream_options={"include_usage": True})
            usage = [chunk.usage async for chunk in stream if chunk.usage is not None]
            assert len(usage) == 1
            served.input_tokens += usage[0].prompt_tokens
            served.output_tokens += usage[0].completion_tokens
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3,
                                                 extra_headers={FAULT_HEADER: "status=500"})
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3)
    finally:
        await client.close()
    served.outcomes = {"admitted": len(JSON_MAX_TOKENS) + len(STREAM_MAX_TOKENS), "upstream_error": 1, "refused": 2}
    return served


def series_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    return set(re.findall(r"\b((?:quotameter|gen_ai)_[a-z_]+)\b", expr)) | ({"up"} if re.search(r"\bup\{", expr) else set())


def scraped(prometheus: Prometheus, expr: str, label: str) -> dict[str, float]:
    return {r["metric"].get(label, ""): float(r["value"][1]) for r in prometheus.query(expr)}


def settle(prometheus: Prometheus, expr: str, label: str, expected: dict[str, float], what: str) -> None:
    """Until Prometheus's latest scrape shows ``expected`` (it scrapes every second)."""
    deadline = time.monotonic() + 20
    while (got := scraped(prometheus, expr, label)) != expected:
        assert time.monotonic() < deadline, f"{what}: Prometheus has {got}, the client saw {expected}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def traffic(stack: Stack) -> Served:
    served = asyncio.run(send_traffic(stack))
    # Every request, refusals included, is one event in the ledger, billed to the token as served.
    total = sum(served.outcomes.values())
    rows = wait_for(lambda: (r := ledger_rows(stack.config, CUSTOMER))["ids"] == total and r, 30, "the ledger")
    assert (rows["input_tokens"], rows["output_tokens"]) == (served.input_tokens, served.output_tokens)
    # Both processes scraped since: Prometheus holds the state the ledger shows.
    written = time.time()
    wait_for(lambda: min(float(r["value"][1]) for r in stack.prometheus.query("timestamp(up)")) > written, 10,
             "a scrape of both targets after the ledger's rows")
    return served


def test_the_alert_rules_load_and_none_fires(stack: Stack) -> None:
    # First in the module: the stack is healthy, no fault injected yet.
    def evaluated() -> list[dict[str, Any]]:  # every group evaluated once at least (every second here)
        found = stack.prometheus.api("rules")["groups"]
        return found if found and all(not g["lastEvaluation"].startswith("0001") for g in found) else []

    groups = wait_for(evaluated, 10, "the rules' first evaluation")
    shipped = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert sorted(loaded) == sorted(r["alert"] for g in shipped for r in g["rules"])
    for name, rule in loaded.items():
        assert (rule["type"], rule["health"]) == ("alerting", "ok"), (name, rule.get("lastError"))
        assert rule["state"] == "inactive", f"{name} is {rule['state']} on a healthy stack: {rule['alerts']}"


def test_request_and_token_counters_equal_what_was_served(stack: Stack, traffic: Served) -> None:
    p = stack.prometheus
    settle(p, 'sum by (outcome) (quotameter_shim_requests_total{job="quotameter-shim", route="chat"})', "outcome",
           {k: float(v) for k, v in traffic.outcomes.items()}, "requests by outcome")
    tokens = {"input": float(traffic.input_tokens), "output": float(traffic.output_tokens)}
    settle(p, 'sum by (type) (quotameter_shim_tokens_total{type=~"input|output"})', "type", tokens, "tokens by type")
    # The GenAI semantic conventions' histogram sums the same tokens.
    settle(p, "sum by (gen_ai_token_type) (gen_ai_client_token_usage_sum)", "gen_ai_token_type", tokens,
           "gen_ai.client.token.usage")
    assert scraped(p, 'sum by (reason) (quotameter_shim_requests_total{outcome="refused"})', "reason") == {
        "rate_limit_requests": 2.0}
    assert scraped(p, "sum by (kind) (quotameter_shim_upstream_errors_total)", "kind") == {"status_5xx": 1.0}
    # The shim's cost in integer micro-USD is the ledger's exact Decimal (the same prices).
    status, body = http_json(f"{stack.config.services.worker_url}/query",
                             f"SELECT toString(sum(cost_usd)) AS usd FROM quotameter.events WHERE customer = '{CUSTOMER}'")
    assert status == 200, body
    ledger_micro_usd = Decimal(body["rows"][0]["usd"]) * 1_000_000
    expected_micro_usd = (traffic.input_tokens * PRICE_MICRO_USD["input"] + traffic.output_tokens * PRICE_MICRO_USD["output"])
    assert ledger_micro_usd == expected_micro_usd
    assert scraped(p, "sum(quotameter_shim_cost_total)", "") == {"": float(expected_micro_usd)}
    # Every event the worker consumed, once.
    settle(p, 'sum by (outcome) (quotameter_worker_events_total{outcome="consumed"})', "outcome",
           {"consumed": float(sum(traffic.outcomes.values()))}, "worker events")


def test_every_dashboard_expression_evaluates(stack: Stack, traffic: Served) -> None:
    p = stack.prometheus
    names = set(p.api("label/__name__/values"))
    for panel in SERVICE_HEALTH.panels:
        for query in panel.promql:
            expr = query.expr.replace("$__rate_interval", RATE_INTERVAL)
            p.query(expr)  # an error fails with Prometheus's message
    # The series the panels read exist (a misspelt name evaluates too, to nothing): all but those only an
    # incident creates.
    incidents = {"quotameter_shim_fail_mode_decisions_total", "quotameter_worker_ledger_insert_failures_total"}
    read = {name for panel in SERVICE_HEALTH.panels for q in panel.promql for name in series_names(q.expr)}
    missing = sorted(read - names - incidents)
    exposed = sorted(n for n in names if n.startswith(("quotameter_", "gen_ai_")))
    assert missing == [], f"the dashboard reads series no target exposes: {missing}; exposed: {exposed}"
    # And they answer with data where the traffic put some.
    requests = SERVICE_HEALTH.panel("requests_by_outcome").promql[0].expr.replace("$__rate_interval", RATE_INTERVAL)
    assert {r["metric"]["outcome"] for r in p.query(requests)} >= {"admitted", "refused"}


def _live_from_prometheus(p: Prometheus) -> dict[str, Any]:
    """The built-in page's live figures, asked of Prometheus directly."""
    figures: dict[str, Any] = {
        "refused": scraped(p, 'sum by (reason) (quotameter_shim_requests_total{outcome="refused"})', "reason"),
        "spool_depth": scraped(p, "sum(quotameter_shim_spool_depth)", "")[""],
        "consumer_lag": scraped(p, "sum(quotameter_worker_consumer_lag)", "")[""],
    }
    for target in ("redis", "ledger"):
        # PromQL's own quantile over the same cumulative buckets the page read
        figures[f"freshness_{target}_p99_s"] = scraped(p, "histogram_quantile(0.99, sum by (le) "
                                                          f'(quotameter_worker_freshness_seconds_bucket{{target="{target}"}}))', "")[""]
    return figures


def test_the_built_in_page_shows_what_prometheus_scraped(stack: Stack, traffic: Served) -> None:
    port = free_port()
    dashboard = stack.start("dashboard", "dashboard", "--port", str(port))
    dashboard.wait_port("127.0.0.1", port, timeout_s=60)
    p = stack.prometheus
    # Prometheus scrapes every second and a gauge (the consumer lag) may move
    # between two reads: compare the page with a pair of reads that agree.
    for _ in range(20):
        before = _live_from_prometheus(p)
        status, body = http_json(f"http://127.0.0.1:{port}/api/dashboard/operations")
        assert status == 200, body
        if _live_from_prometheus(p) == before:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"Prometheus's figures never held still across a page read; last: {before}")
    live = {panel["key"]: panel for panel in body["panels"] if panel.get("live")}
    assert all(panel["error"] is None for panel in live.values()), {k: p["error"] for k, p in live.items()}
    assert {r["reason"]: r["refused"] for r in live["live_refusals"]["rows"]} == before["refused"]
    (now,) = live["live_shim"]["rows"]
    assert now["inflight"] == 0
    assert now["spool_depth"] == before["spool_depth"]
    (worker,) = live["live_worker"]["rows"]
    for target in ("redis", "ledger"):
        key = f"freshness_{target}_p99_s"
        assert worker[key] == pytest.approx(before[key], abs=1e-6), target
    assert worker["consumer_lag"] == before["consumer_lag"]
