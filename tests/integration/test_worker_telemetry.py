"""The worker's telemetry against a real broker, redis-server and chDB ledger:
``GET /metrics`` counts exactly what was produced, the batch spans reach an
OTLP receiver linked to the requests' trace contexts, and every log line is
one JSON object.

Besides the records the test produces itself, the official openai client
sends requests through the real shim to the mock model: their events reach
the worker with the shim's trace context, which the batch spans link to.

One worker serves the whole module (JSON logs, spans and metrics exported to
the receiver below, which is also the alerts' webhook); its stdout and stderr
are kept apart to check each.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client.parser import text_string_to_metric_families

from gateway_shim.keystore import create_key
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import UsageEvent, encode_event
from quotameter.redis_keys import RedisKeys
from tests.conftest import make_config
from tests.integration.enforcement_helpers import MESSAGES
from tests.integration.pipeline_helpers import (
    READY_LINE,
    WORKER_READY_TIMEOUT_S,
    health_status,
    http_json,
    make_event,
    read_topic,
    wait_for,
)

LATE_GRACE_S = 60
# The ledger flush (and so the offset commit) waits this long: the lag stays
# above 0 long enough for a scrape to see it.
LEDGER_FLUSH_MS = 3000
ADMIN_TOKEN = "telemetry-admin-token"
WEBHOOK_SECRET = "whsec_telemetry"
MONTHLY_TOKENS = 1000
SHIM_REQUESTS = 3  # through the shim, in a tier without monthly limits (no alert)
ALERTS = 2 * 4  # two customers past 50, 80, 90 and 100 % of MONTHLY_TOKENS (no budget alert: pro's is $500)


# ---------------------------------------------------------------- an OTLP/HTTP traces receiver


class Receiver:
    """Takes OTLP/HTTP protobuf exports on 127.0.0.1, as a collector would, and
    the alerts' webhook: the first POST of each alert gets a 500, a retry 200,
    except the 100 % alert of REJECTED_CUSTOMER: 400 (given up, not retried)."""

    def __init__(self, rejected_customer: str) -> None:
        self.spans: list[Span] = []
        self.services: dict[bytes, str] = {}  # span id → service.name of the process that sent it
        self.events: dict[str, int] = {}  # quotameter.worker.events by outcome, as last exported (cumulative)
        self.lag: dict[int, int] = {}  # quotameter.worker.consumer.lag by partition, last export that had any
        self.hooks: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path == "/hook":
                    alert = json.loads(body)
                    data = alert["data"]
                    with receiver.lock:
                        first = all(hook["id"] != alert["id"] for hook in receiver.hooks)
                        receiver.hooks.append({"id": alert["id"], "data": data})
                    rejected = data["customer"] == rejected_customer and data["threshold_pct"] == 100
                    self.send_response(500 if first else 400 if rejected else 200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if self.path == "/v1/metrics":
                    receiver.take_metrics(ExportMetricsServiceRequest.FromString(body))
                    reply = ExportMetricsServiceResponse().SerializeToString()
                else:
                    request = ExportTraceServiceRequest.FromString(body)
                    with receiver.lock:
                        for resource in request.resource_spans:
                            service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
                            for scope in resource.scope_spans:
                                receiver.spans.extend(scope.spans)
                                receiver.services.update((span.span_id, service) for span in scope.spans)
                    reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.hook_url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def take_metrics(self, request: ExportMetricsServiceRequest) -> None:
        lag: dict[int, int] = {}
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "quotameter.worker.events":
                        for point in metric.sum.data_points:
                            outcome = {a.key: a.value.string_value for a in point.attributes}["outcome"]
                            self.events[outcome] = point.as_int
                    elif metric.name == "quotameter.worker.consumer.lag":
                        for point in metric.gauge.data_points:
                            lag[{a.key: a.value.int_value for a in point.attributes}["partition"]] = point.as_int
        if lag:
            self.lag = lag

    def named(self, name: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


@pytest.fixture(scope="module")
def tag() -> str:
    """This module's customers, topic, prefix and app id."""
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="module")
def receiver(tag: str) -> Iterator[Receiver]:
    receiver = Receiver(rejected_customer=f"{tag}-b")
    receiver.thread.start()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


# ---------------------------------------------------------------- what is produced


def traceparent(sampled: bool = True) -> str:
    return f"00-{random.getrandbits(128):032x}-{random.getrandbits(64):016x}-{'01' if sampled else '00'}"


@dataclass
class Sent:
    """What the test produced, and what each outcome must count."""

    records: list[tuple[str, bytes, int, str | None]] = field(default_factory=list)  # key, value, ts, traceparent header
    in_events: list[str] = field(default_factory=list)  # traceparents sent as the CloudEvent attribute only
    unique: list[UsageEvent] = field(default_factory=list)
    on_time: int = 0
    late: int = 0
    duplicates: int = 0
    dead_lettered: int = 0

    def event(self, event: UsageEvent, context: str | None = None, *, late: bool = False) -> None:
        self.records.append((event.customer_id, encode_event(event), event.time_ms, context))
        self.unique.append(event)
        self.late += late
        self.on_time += not late

    def again(self, event: UsageEvent) -> None:
        self.records.append((event.customer_id, encode_event(event), event.time_ms, None))
        self.duplicates += 1

    def malformed(self, key: str, value: bytes) -> None:
        self.records.append((key, value, int(time.time() * 1000), None))
        self.dead_lettered += 1

    def linked(self) -> set[tuple[bytes, bytes]]:
        """(trace id, span id) of every sampled context sent."""
        out = set()
        for context in [*(record[-1] for record in self.records), *self.in_events]:
            if context and context.endswith("-01"):
                _, trace_id, span_id, _ = context.split("-")
                out.add((bytes.fromhex(trace_id), bytes.fromhex(span_id)))
        return out


def traffic(tag: str) -> Sent:
    now = datetime.now(UTC)
    sent = Sent()

    def event(n: int, customer: str, at: datetime, **tokens: int) -> UsageEvent:
        return make_event(f"{tag}-{n}", customer, **tokens).model_copy(update={"time": at})

    first = [event(n, f"{tag}-a" if n % 2 else f"{tag}-b", now, input_tokens=100 + n, output_tokens=n) for n in range(40)]
    for n, item in enumerate(first):
        # Sampled contexts on some, one unsampled (the shim sends none; a linked one would be wrong).
        header = traceparent() if n % 5 == 0 else traceparent(sampled=False) if n == 7 else None
        if n in (11, 13):  # the context in the CloudEvent only (a producer that sets no header)
            item = item.model_copy(update={"traceparent": traceparent()})
            sent.in_events.append(item.traceparent)
        elif n == 15:  # in both, as the shim sends it: one link
            item = item.model_copy(update={"traceparent": header})
        sent.event(item, header)
    sent.again(first[0])
    sent.again(first[3])
    # Older than its customer's newest event by more than the grace: late.
    sent.event(event(100, f"{tag}-b", now - timedelta(seconds=LATE_GRACE_S * 10), input_tokens=5), late=True)
    sent.malformed(f"{tag}-a", b"{not json")
    # Keyed by another customer than its subject: dead-lettered too.
    sent.records.append((f"{tag}-a", encode_event(event(101, f"{tag}-b", now, input_tokens=1)), now_ms(), None))
    sent.dead_lettered += 1
    return sent


def now_ms() -> int:
    return time.time_ns() // 1_000_000


async def send(config: Config, sent: Sent) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=config.services.kafka_bootstrap, linger_ms=5)
    await producer.start()
    try:
        for key, value, ts, context in sent.records:
            headers = [("traceparent", context.encode())] if context else None
            await producer.send(config.services.events_topic, value, key=key.encode(), timestamp_ms=ts, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


# ---------------------------------------------------------------- one worker for the module


@dataclass
class Run:
    config: Config
    worker: subprocess.Popen[bytes]
    stdout: Path
    stderr: Path
    sent: Sent
    lag_seen: int  # the largest total lag a scrape showed while the batch was in flight
    served: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) tokens of each shim answer
    shim_contexts: set[tuple[bytes, bytes]] = field(default_factory=set)  # the traceparent headers of the shim's events
    shim_records: int = 0  # the Kafka records carrying them (events that close together travel as one)
    stats_without_token: int = 0
    ledger: dict[str, int] = field(default_factory=dict)
    metrics_text: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


def scrape(config: Config) -> str:
    """GET /metrics as a Prometheus server does: no token."""
    with urllib.request.urlopen(f"{config.services.worker_url}/metrics", timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(sample name, labels) → value, from the Prometheus text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float:
    found = samples(text).get((name, frozenset(labels.items())))
    assert found is not None, f"{name}{labels} not in /metrics:\n{text}"
    return found


def lag(text: str, topic: str) -> dict[int, float]:
    return {
        int(dict(labels)["partition"]): v
        for (name, labels), v in samples(text).items()
        if name == "quotameter_worker_consumer_lag" and dict(labels).get("topic") == topic
    }


def stop(worker: subprocess.Popen[bytes]) -> int:
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            return worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.kill()
    return worker.wait(timeout=10)


@pytest.fixture(scope="module")
async def run(
    tmp_path_factory: pytest.TempPathFactory, redis_url: str, kafka_bootstrap: str, receiver: Receiver, tag: str
) -> AsyncIterator[Run]:
    began = time.monotonic()
    directory = tmp_path_factory.mktemp("worker-telemetry")
    unique = tag
    mock_port = free_port()
    config, path = make_config(directory, redis_url, kafka_bootstrap, unique, {
        "pipeline": {"late_grace_s": LATE_GRACE_S, "ledger_flush_ms": LEDGER_FLUSH_MS},
        "telemetry": {"log_format": "json"},
        # Both customers pass every token threshold: ALERTS alerts, each posted to the receiver.
        "tiers": {"pro": {"monthly_tokens": MONTHLY_TOKENS},
                  "metered": {"requests_per_minute": 100, "tokens_per_minute": 1_000_000}},
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
        "shim": {"delivery": "broker"},
        # /metrics stays open for a scraper without it; the other views do not.
        "services": {"admin_token": ADMIN_TOKEN},
        "alerts": {"webhook_url": receiver.hook_url, "webhook_secret": WEBHOOK_SECRET, "webhook_max_attempts": 3,
                   "webhook_backoff_initial_s": 0.05, "webhook_backoff_max_s": 0.1},
    })
    env = {
        **os.environ,
        "QUOTAMETER_CONFIG": str(path),
        # Spans and metrics over OTLP/HTTP to the receiver, besides /metrics.
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",  # ms: spans reach the receiver soon
        "OTEL_METRIC_EXPORT_INTERVAL": "500",  # ms
        # Faust's own INFO lines too (assignment tables span many lines): each must still be one JSON line.
        "QUOTAMETER_WORKER_LIBRARY_LOG_LEVEL": "INFO",
    }
    stdout, stderr = directory / "worker.stdout", directory / "worker.stderr"
    with stdout.open("wb") as out, stderr.open("wb") as err:
        worker = subprocess.Popen([sys.executable, "-m", "quotameter", "worker"], stdout=out, stderr=err, env=env,
                                  start_new_session=True)
    mock = ManagedProcess("mock", [sys.executable, "-m", "quotameter", "mock-llm", "--port", str(mock_port)],
                          directory / "mock.log").start()
    shim = ManagedProcess("shim", [sys.executable, "-m", "quotameter", "proxy"], directory / "shim.log", env={
        "QUOTAMETER_CONFIG": str(path), "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{receiver.endpoint}/v1/traces",
        "OTEL_BSP_SCHEDULE_DELAY": "200"}).start()
    try:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while health_status(config) != 200:
            assert worker.poll() is None, f"the worker exited with {worker.returncode}:\n{stderr.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker was not ready in {WORKER_READY_TIMEOUT_S}s"
            time.sleep(0.1)
        topic = config.services.events_topic
        assert not any(lag(scrape(config), topic).values())  # nothing produced yet

        sent = traffic(unique)
        await send(config, sent)
        served, shim_contexts = await through_the_shim(config, mock, shim, f"{tag}-shim")
        shim_records = await records_of(config, f"{tag}-shim")
        wait_for(lambda: all(span_id in receiver.services for _, span_id in shim_contexts), 10, "the shim's spans")
        # The rows wait LEDGER_FLUSH_MS for the ledger, the commit waits for the rows.
        lag_seen = 0.0

        def in_flight() -> bool:
            nonlocal lag_seen
            lag_seen = max(lag_seen, sum(lag(scrape(config), topic).values()))
            return lag_seen > 0

        wait_for(in_flight, 10, "a scrape to show the lag of the batch in flight")
        wait_for(lambda: ledger_rows(config) == len(sent.unique) + SHIM_REQUESTS, 30, "every unique event in the ledger")
        wait_for(lambda: (p := lag(scrape(config), topic)) and len(p) == 4 and not any(p.values()), 15,
                 "the lag of all 4 partitions to fall to 0")
        # Every alert posted twice (500, then 200 or 400), each counted once its last answer was read.
        wait_for(lambda: len(receiver.hooks) == 2 * ALERTS, 15, f"{2 * ALERTS} webhook requests")
        wait_for(lambda: ended_deliveries(scrape(config)) == ALERTS, 5, "every delivery counted")
        current = Run(config, worker, stdout, stderr, sent, int(lag_seen), served, shim_contexts, shim_records)
        current.metrics_text = scrape(config)
        current.ledger = ledger(config)
        current.stats = http_json(f"{config.services.worker_url}/stats", config=config)[1]
        current.stats_without_token = http_json(f"{config.services.worker_url}/stats")[0]
        wait_for(lambda: receiver.named("quotameter.ledger_insert"), 10, "the ledger insert's span")
        wait_for(lambda: receiver.lag == {0: 0, 1: 0, 2: 0, 3: 0}, 5, "an OTLP export of the lag at 0")
        shim.stop()
        current.exit_code = stop(worker)
        print(f"module ready in {time.monotonic() - began:.1f}s")
        yield current
    finally:
        shim.stop()
        mock.stop()
        stop(worker)


async def records_of(config: Config, customer: str) -> int:
    """How many Kafka records of the events topic are keyed by ``customer`` (a batch counts once),
    read from the start until nothing more comes for a second."""
    consumer = AIOKafkaConsumer(config.services.events_topic, bootstrap_servers=config.services.kafka_bootstrap,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        count, seen, idle_since, deadline = 0, 0, time.monotonic(), time.monotonic() + 20
        while (not seen or time.monotonic() - idle_since < 1.0) and time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=200)).values():
                count += sum(record.key == customer.encode() for record in records)
                seen, idle_since = seen + len(records), time.monotonic()
        return count
    finally:
        await consumer.stop()


async def through_the_shim(
    config: Config, mock: ManagedProcess, shim: ManagedProcess, customer: str
) -> tuple[list[tuple[int, int]], set[tuple[bytes, bytes]]]:
    """SHIM_REQUESTS chat completions: the usage served, and the trace contexts their events carry."""
    mock.wait_port("127.0.0.1", int(config.upstream.url.rsplit(":", 1)[1].split("/")[0]))
    shim.wait_port(config.shim.host, config.shim.port)
    client = redis.Redis.from_url(config.services.redis_url)
    try:
        key = create_key(client, RedisKeys(config.services.redis_prefix), customer, "metered").plaintext
    finally:
        client.close()
    openai_client = openai.AsyncOpenAI(base_url=f"http://{config.shim.host}:{config.shim.port}/v1", api_key=key,
                                       max_retries=0, timeout=20)
    served = []
    for _ in range(SHIM_REQUESTS):
        answer = await openai_client.chat.completions.create(model="mock-small", messages=MESSAGES)
        served.append((answer.usage.prompt_tokens, answer.usage.completion_tokens))
    await openai_client.close()
    records = await read_topic(config.services.kafka_bootstrap, config.services.events_topic, SHIM_REQUESTS,
                               keys={customer.encode()})
    assert len(records) == SHIM_REQUESTS
    contexts = set()
    for record in records:
        _, trace_id, span_id, flags = dict(record.headers)["traceparent"].decode().split("-")
        assert int(flags, 16) & 1  # sampled: the shim's default sampler keeps every trace
        contexts.add((bytes.fromhex(trace_id), bytes.fromhex(span_id)))
    return served, contexts


def ended_deliveries(text: str) -> float:
    found = samples(text)
    return sum(found.get(("quotameter_worker_webhook_deliveries_total", frozenset({("outcome", o)})), 0)
               for o in ("delivered", "failed"))


def ledger_rows(config: Config) -> int:
    return ledger(config)["rows"]


def ledger(config: Config) -> dict[str, int]:
    """Rows (no FINAL: a row written twice would show) and their tokens."""
    status, body = http_json(
        f"{config.services.worker_url}/query",
        "SELECT count() AS rows, sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens FROM quotameter.events",
        config=config,
    )
    assert status == 200, body
    return {name: int(value) for name, value in body["rows"][0].items()}


# ---------------------------------------------------------------- the tests


def test_metrics_count_every_record_under_its_outcome(run: Run) -> None:
    text, sent = run.metrics_text, run.sent
    counted = {
        outcome: value(text, "quotameter_worker_events_total", outcome=outcome)
        for outcome in ("consumed", "late", "duplicate", "dead_lettered")
    }
    assert counted == {"consumed": sent.on_time + SHIM_REQUESTS, "late": sent.late, "duplicate": sent.duplicates,
                       "dead_lettered": sent.dead_lettered}
    assert sum(counted.values()) == len(sent.records) + SHIM_REQUESTS
    # The same as the ledger (every unique event, each once) and the worker's own counters.
    assert run.ledger == {
        "rows": counted["consumed"] + counted["late"],
        # What was produced, and what the shim's client was served, to the token.
        "input_tokens": sum(event.data.input_tokens for event in sent.unique) + sum(p for p, _ in run.served),
        "output_tokens": sum(event.data.output_tokens for event in sent.unique) + sum(c for _, c in run.served),
    }
    assert run.stats["applied"] == sent.on_time + sent.late + SHIM_REQUESTS and run.stats["malformed"] == sent.dead_lettered
    # One batch-size observation per batch, summing to every record read.
    assert value(text, "quotameter_worker_batch_size_count") == run.stats["batches"]
    assert value(text, "quotameter_worker_batch_size_sum") == len(sent.records) + SHIM_REQUESTS


def test_otlp_export_carries_the_same_counts(run: Run, receiver: Receiver) -> None:
    """The periodic OTLP reader (its last export at shutdown) sees what /metrics showed."""
    text = run.metrics_text
    assert receiver.events == {
        outcome: int(value(text, "quotameter_worker_events_total", outcome=outcome))
        for outcome in ("consumed", "late", "duplicate", "dead_lettered")
    }


def test_freshness_is_one_observation_per_write_and_the_late_event_shows(run: Run) -> None:
    text = run.metrics_text
    ledger_count = value(text, "quotameter_worker_freshness_seconds_count", target="ledger")
    assert ledger_count == run.stats["ledger_inserts"] >= 1
    redis_count = value(text, "quotameter_worker_freshness_seconds_count", target="redis")
    assert 1 <= redis_count <= run.stats["batches"]
    for target, count in (("ledger", ledger_count), ("redis", redis_count)):
        # The late event (10 grace periods old) is in exactly one write of each;
        # the others were written within seconds of being made.
        assert value(text, "quotameter_worker_freshness_seconds_bucket", target=target, le="60") == count - 1, target
        assert value(text, "quotameter_worker_freshness_seconds_bucket", target=target, le="900") == count, target
    assert value(text, "quotameter_worker_ledger_insert_duration_seconds_count") == run.stats["ledger_inserts"]
    failures = samples(text).get(("quotameter_worker_ledger_insert_failures_total", frozenset()))
    assert failures in (None, 0)  # no insert failed (a counter never added to is not exported)


def test_alerts_and_webhook_deliveries_are_counted(run: Run, receiver: Receiver) -> None:
    text = run.metrics_text
    assert value(text, "quotameter_worker_alerts_fired_total", kind="tokens") == ALERTS
    assert not [name for (name, labels) in samples(text) if name == "quotameter_worker_alerts_fired_total"
                and dict(labels)["kind"] != "tokens"]
    assert len({hook["id"] for hook in receiver.hooks}) == ALERTS
    deliveries = {o: value(text, "quotameter_worker_webhook_deliveries_total", outcome=o)
                  for o in ("delivered", "failed", "retried")}
    assert deliveries == {"delivered": ALERTS - 1, "failed": 1, "retried": ALERTS}


def test_metrics_need_no_token_and_name_no_customer_event_or_secret(run: Run, tag: str) -> None:
    assert run.stats_without_token == 401  # scrape() sent no token, and was answered
    text = run.metrics_text
    # Customers and event ids are all "<tag>-…"; the topic ("events-<tag>") is the only mention of the tag.
    assert f"{tag}-" not in text
    assert ADMIN_TOKEN not in text and WEBHOOK_SECRET not in text


def test_lag_was_seen_and_fell_to_zero(run: Run) -> None:
    assert run.lag_seen > 0
    assert lag(run.metrics_text, run.config.services.events_topic) == {0: 0, 1: 0, 2: 0, 3: 0}


def test_batch_spans_link_the_requests_and_hold_the_stages(run: Run, receiver: Receiver) -> None:
    topic = run.config.services.events_topic
    batches = receiver.named(f"process {topic}")
    assert batches, [span.name for span in receiver.spans]
    for span in batches:
        assert span.kind == Span.SpanKind.SPAN_KIND_CONSUMER
        attributes = {a.key: a.value for a in span.attributes}
        assert attributes["messaging.system"].string_value == "kafka"
        assert attributes["messaging.destination.name"].string_value == topic
        assert attributes["messaging.operation.type"].string_value == "process"
        assert attributes["messaging.batch.message_count"].int_value >= 1
    assert sum(
        {a.key: a.value for a in span.attributes}["messaging.batch.message_count"].int_value for span in batches
    ) == len(run.sent.records) + run.shim_records
    assert 1 <= run.shim_records <= SHIM_REQUESTS
    links = {(link.trace_id, link.span_id) for span in batches for link in span.links}
    # Every sampled context, the unsampled one not; the shim's are spans the shim exported.
    assert links == run.sent.linked() | run.shim_contexts
    assert len(run.shim_contexts) == SHIM_REQUESTS
    assert {receiver.services[span_id] for _, span_id in run.shim_contexts} == {"quotameter-shim"}
    assert run.shim_contexts <= {(span.trace_id, span.span_id) for span in receiver.spans}
    assert {receiver.services[span.span_id] for span in batches} == {"quotameter-worker"}
    ids = {span.span_id for span in batches}
    for stage in ("quotameter.redis_write", "quotameter.ledger_insert"):
        spans = receiver.named(stage)
        assert spans and all(span.parent_span_id in ids for span in spans), stage


def test_log_lines_are_json_one_per_line(run: Run, receiver: Receiver) -> None:
    assert run.exit_code == 0
    assert run.stdout.read_text().splitlines() == [READY_LINE]
    text = run.stderr.read_text()
    assert ADMIN_TOKEN not in text and WEBHOOK_SECRET not in text
    lines = text.splitlines()
    records = [json.loads(line) for line in lines]  # each line is one object
    assert all({"time", "level", "logger", "message"} <= record.keys() for record in records)
    loggers = {record["logger"] for record in records}
    # The worker's lines, the libraries' (Faust at INFO here) and the shutdown's.
    assert "pipeline.worker" in loggers and any(name.startswith("faust") for name in loggers), loggers
    dead = [record for record in records if record["message"].startswith("malformed event at")]
    assert len(dead) == run.sent.dead_lettered
    assert {(r["topic"], r["dlq_topic"]) for r in dead} == {(run.config.services.events_topic, f"{run.config.services.events_topic}.dlq")}
    assert all(isinstance(r["partition"], int) and isinstance(r["offset"], int) and r["reason"] for r in dead)
    # Logged inside its batch's span: the line names that span, so the trace leads to it.
    batches = {(span.trace_id.hex(), span.span_id.hex()) for span in receiver.named(f"process {run.config.services.events_topic}")}
    assert {(r["trace_id"], r["span_id"]) for r in dead} <= batches
    assert any(record["message"] == "sinks flushed and closed" for record in records)
