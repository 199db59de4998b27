"""``quotameter worker``: run one pipeline worker in the foreground.

Startup: create the events and dead-letter topics if missing, open the ledger
(with chDB this process owns the directory from here on), give Redis the
ledger's totals of the current period where it has none or older ones
(``pipeline.rebuild``), then run Faust until SIGINT/SIGTERM. Once the worker
has joined its group and recovered its tables it prints
``quotameter worker ready`` on stdout and ``GET /healthz`` answers 200.

Everything else it says goes to stderr as log lines in ``telemetry.log_format``
(json: one object per line, Faust's and the libraries' lines included); its
metrics are on ``GET /metrics`` (pipeline.telemetry) and its spans go to the
OTLP endpoint of the ``OTEL_*`` variables, if any (pipeline.tracing).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from typing import Any

import faust
from aiokafka import AIOKafkaProducer
from mode import Service
from redis.asyncio import Redis
from redis.exceptions import RedisError

import telemetry.logs
import telemetry.setup
from pipeline import telemetry as worker_telemetry
from pipeline.alerts import AlertEngine, alert_topic
from pipeline.app import FaustParts, build_app, changelog_topics, worker_address
from pipeline.consumer_lag import lag_of
from pipeline.dedupe import Deduplicator, RecentIds
from pipeline.freshness import Freshness
from pipeline.history import schema
from pipeline.history.factory import open_store
from pipeline.history.store import AsyncHistory, HistoryError
from pipeline.ledger_marks import LedgerMarks
from pipeline.ledger_sink import LedgerSink
from pipeline.offset_guard import OffsetGuard
from pipeline.rebuild import rebuild_state
from pipeline.redis_restarts import CHECK_EVERY_S, RedisRestarts
from pipeline.redis_writer import UsageWriter
from pipeline.topics import ensure_topics, topic_partitions
from pipeline.usage_agent import UsageSink, register_usage_agent
from pipeline.web import Readiness, register_views
from pipeline.window_tables import WindowTables
from quotameter.config import Config, Services
from quotameter.errors import ConfigError, QuotameterError, ServiceError
from quotameter.kafka_client import client_options, explain, producer_options
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import redis_client as waiting_redis_client
from quotameter.service_auth import TokenGate, require_token_off_loopback

READY_LINE = "quotameter worker ready"
SERVICE = "quotameter-worker"
LIBRARY_LOG_LEVEL_ENV = "QUOTAMETER_WORKER_LIBRARY_LOG_LEVEL"
log = logging.getLogger(__name__)


def dlq_topic(config: Config) -> str:
    return config.pipeline.dlq_topic or f"{config.services.events_topic}.dlq"


class SinkService(Service):
    """Starts the alerts producer; after the app (and its agents) stopped,
    writes the rows still buffered for the ledger and closes the sinks."""

    def __init__(self, config: Config, sink: UsageSink, history: AsyncHistory, redis_client: Redis, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = config
        self.sink = sink
        self.history = history
        self.redis_client = redis_client
        self.producer: AIOKafkaProducer | None = None

    async def on_start(self) -> None:
        if self.config.alerts.enabled:
            self.producer = AIOKafkaProducer(**producer_options(self.config.services, linger_ms=5))
            await self.producer.start()
            self.sink.observer = AlertEngine.from_config(self.config, self.redis_client, self.producer)

    async def on_stop(self) -> None:
        # The buffered rows' table state is in the changelog already, so
        # writing them now keeps the ledger ⇒ changelog invariant; their
        # events stay unacked and a restart skips them (ledger lookup).
        self.sink.ledger.ack = None
        await self.sink.ledger.flush()
        await self.sink.writer.close()
        if isinstance(self.sink.observer, AlertEngine):
            await self.sink.observer.close()
        if self.producer is not None:
            await self.producer.stop()
        await asyncio.get_running_loop().run_in_executor(None, self.history.close)
        log.info("sinks flushed and closed")


# Collections of the youngest generation every this many new container
# objects, not Python's 700: a batch makes hundreds of thousands (decoded
# events, rows, table values), nearly all freed by reference counting, and
# the collector's passes over them took a third of the time to decode.
GC_YOUNG_THRESHOLD = 50_000


def settle_heap() -> None:
    """Once running: what start-up made (modules, Faust, clients, recovered
    tables) leaves the collector's sight, and young collections run less
    often. Only cyclic garbage waits longer."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, middle, old)


def _announce_ready(parts: FaustParts, readiness: Readiness, started: float) -> None:
    async def on_rebalance_complete(sender: Any = None, **kwargs: Any) -> None:
        if not readiness.ready:
            # Print first: whoever sees /healthz answer 200 can rely on the line.
            log.info("worker ready after %.1fs", time.monotonic() - started)
            print(READY_LINE, flush=True)
            readiness.ready = True
            settle_heap()

    parts.app.on_rebalance_complete.connect(on_rebalance_complete, weak=False)


def build_sink(config: Config, parts: FaustParts, history: AsyncHistory, writer: UsageWriter) -> UsageSink:
    settings, billing = config.pipeline, config.billing
    recent = RecentIds(settings.dedupe_window_s, settings.dedupe_window_max_ids)
    freshness = Freshness()
    ledger = LedgerSink(history, recent, settings.ledger_batch_rows, settings.ledger_flush_ms)
    ledger.on_inserted = lambda rows: freshness.observe("clickhouse", (p.event.time_ms for p in rows))
    ledger.marks = LedgerMarks(writer.client, RedisKeys(config.services.redis_prefix))
    windows = WindowTables(
        parts.tables, history, ledger.flush, billing.calendar, int(settings.late_grace_s * 1000)
    )
    prices = PriceTable(list(config.prices), config.default_price)
    async def ledger_offsets(partitions: list[int]) -> dict[int, int]:
        rows = await history.query(schema.applied_offsets(partitions))
        return {int(row["p"]): int(row["o"]) for row in rows if int(row["o"]) >= 0}

    guard = OffsetGuard(
        config.services.kafka_bootstrap, config.services.events_topic, config.services.worker_app_id, ledger_offsets,
        kafka_options=client_options(config.services),
    )
    return UsageSink(parts, windows, Deduplicator(recent, history), ledger, writer, prices, dlq_topic(config), freshness, guard)


async def prepare_topics(config: Config) -> None:
    """The events and dead-letter topics, created if missing; with
    kafka_create_topics false, every topic the worker uses must exist (the
    tables' changelogs too, which Faust would otherwise declare, and the
    alerts topic), and a failure names all the missing ones. The events
    topic must have the tables' partition count."""
    services = config.services
    if services.kafka_create_topics:
        await ensure_topics(services, [services.events_topic])
        await ensure_topics(services, [dlq_topic(config)], partitions=1)  # rare, read by people: one, in order
    else:
        alerts = [alert_topic(config)] if config.alerts.enabled else []
        await ensure_topics(services, [services.events_topic, dlq_topic(config), *changelog_topics(config), *alerts])
    count = await topic_partitions(services, services.events_topic)
    if count != services.kafka_topic_partitions:
        raise ServiceError(
            f"topic {services.events_topic} has {count} partitions but services.kafka_topic_partitions is "
            f"{services.kafka_topic_partitions}: the tables are partitioned like the events topic, set it to {count}"
        )


async def check_producer(services: Services) -> None:
    """Start and stop a producer as the alerts producer is started: settings
    it cannot start with (credentials, idempotence) stop the worker here,
    named, rather than deep inside Faust's start. (Dead letters go through
    Faust's own producer: acks=all, Faust's default, and the same credentials.)"""
    producer = AIOKafkaProducer(**producer_options(services))
    try:
        await producer.start()
    except Exception as exc:  # KafkaError, OSError, what aiokafka's SASL clients raise on a refusal
        raise ServiceError(explain(exc, services)) from None
    finally:
        await producer.stop()


def serve(config: Config) -> None:
    """Run the worker until SIGINT/SIGTERM; exit 0 after a clean stop."""
    started = time.monotonic()
    services, billing = config.services, config.billing
    # Before the first line is logged. Faust is told below to leave logging
    # alone, so its lines (and the libraries') come out in this format too.
    telemetry.logs.configure(config.telemetry, SERVICE)
    logging.captureWarnings(True)  # a warning is one log line, not raw text on stderr
    telemetry.setup.start(SERVICE, config.telemetry)
    gate = TokenGate.from_services(services)
    try:  # before anything listens
        require_token_off_loopback(worker_address(config)[0], gate, f"the worker's HTTP endpoints ({services.worker_url})")
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(prepare_topics(config))
        loop.run_until_complete(check_producer(services))
        store = open_store(config)
    except QuotameterError as exc:
        loop.close()
        raise SystemExit(f"error: {exc}") from None

    history = AsyncHistory(store)
    # Batch writes, alert claims and deliveries, and rebuilds share it: they wait
    # for a free connection rather than fail (no read timeout: a batch's writes
    # may take long, and a failed write is retried with the next batch anyway).
    redis_client = waiting_redis_client(services, timeout_s=None)
    writer = UsageWriter(redis_client, RedisKeys(services.redis_prefix), lambda: time.time_ns() // 1_000_000)

    async def rewrite_quota_state() -> int:
        async with sink.lock:  # between batches: their rows are in the ledger first
            await sink.ledger.flush()
            return (await rebuild_state(history, writer, billing.calendar))["customers"]

    # Redis's run_id is taken before the state is written below: a restart
    # from then on, however soon, is one the worker rewrites after.
    restarts = RedisRestarts(redis_client, rewrite_quota_state)
    loop.run_until_complete(restarts.check())
    try:
        # Redis flushed, or behind a ledger kept across a lost broker: the
        # ledger's totals now, before the first batch (never lowers a total).
        counts = loop.run_until_complete(rebuild_state(history, writer, billing.calendar))
        log.info("quota state of %d customers checked against the ledger", counts["customers"])
    except (HistoryError, RedisError, OSError, ConnectionError) as exc:
        log.warning("quota state not rebuilt from the ledger on start (the next batches write it): %s", exc)

    parts = build_app(config)
    sink = build_sink(config, parts, history, writer)
    readiness = Readiness()
    register_usage_agent(parts, sink, config.pipeline.batch_max_events, config.pipeline.batch_max_wait_ms)

    parts.app.timer(CHECK_EVERY_S)(restarts.check)
    register_views(parts, history, readiness, sink, billing.calendar, gate, metrics=config.telemetry.metrics)
    worker_telemetry.watch_lag(lambda: lag_of(parts.app.consumer, services.events_topic))
    _announce_ready(parts, readiness, started)

    # Faust, mode and aiokafka log every step at INFO; set
    # QUOTAMETER_WORKER_LIBRARY_LOG_LEVEL=INFO to see those steps.
    library_level = os.environ.get(LIBRARY_LOG_LEVEL_ENV, "WARNING").upper()
    for library in ("aiokafka", "faust", "mode"):
        logging.getLogger(library).setLevel(library_level)
    worker = faust.Worker(
        parts.app,
        SinkService(config, sink, history, redis_client, loop=loop),
        loop=loop,
        loglevel="INFO",
        quiet=True,
        redirect_stdouts=False,
        # mode would replace the root handlers with its colored console
        # handler on stdout: telemetry.logs.configure set them above.
        override_logging=False,
    )
    # Without mode's logging setup the startup spinner stays on, and it would
    # write terminal control characters to stdout.
    worker.spinner = None
    try:
        worker.execute_from_commandline()
    finally:
        telemetry.setup.shutdown()  # the last spans and metric interval
