"""``quotameter worker``: run one pipeline worker in the foreground.

Startup: create the events topic if missing, open the ledger (this process
owns the chDB directory from here on), then run Faust until SIGINT/SIGTERM.
Once the worker has joined its group and recovered its tables it prints
``quotameter worker ready`` on stdout and ``GET /healthz`` answers 200.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import faust
from mode import Service
from redis.asyncio import Redis

from pipeline.app import TOPIC_PARTITIONS, FaustParts, build_app
from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.store import AsyncHistory
from pipeline.redis_writer import UsageWriter
from pipeline.topics import ensure_topic
from pipeline.usage_agent import UsageSink, register_usage_agent
from pipeline.web import Readiness, register_views
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys

READY_LINE = "quotameter worker ready"
LIBRARY_LOG_LEVEL_ENV = "QUOTAMETER_WORKER_LIBRARY_LOG_LEVEL"
log = logging.getLogger(__name__)


class SinkService(Service):
    """Closes the sinks after the app (and its agents) stopped: waits for an
    insert already handed to the ledger thread, flushes Redis."""

    def __init__(self, history: AsyncHistory, writer: UsageWriter, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history
        self.writer = writer

    async def on_stop(self) -> None:
        await self.writer.close()
        await asyncio.get_running_loop().run_in_executor(None, self.history.close)
        log.info("sinks flushed and closed")


def _announce_ready(parts: FaustParts, readiness: Readiness, started: float) -> None:
    async def on_rebalance_complete(sender: Any = None, **kwargs: Any) -> None:
        if not readiness.ready:
            # Print first: whoever sees /healthz answer 200 can rely on the line.
            log.info("worker ready after %.1fs", time.monotonic() - started)
            print(READY_LINE, flush=True)
            readiness.ready = True

    parts.app.on_rebalance_complete.connect(on_rebalance_complete, weak=False)


def serve(config: Config) -> None:
    """Run the worker until SIGINT/SIGTERM; exit 0 after a clean stop."""
    started = time.monotonic()
    services = config.services
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(ensure_topic(services.kafka_bootstrap, services.events_topic, TOPIC_PARTITIONS))
        store = ChdbHistory(services.history_dir)
    except QuotameterError as exc:
        loop.close()
        raise SystemExit(f"error: {exc}") from None

    history = AsyncHistory(store)
    writer = UsageWriter(Redis.from_url(services.redis_url), RedisKeys(services.redis_prefix), lambda: time.time_ns() // 1_000_000)
    parts = build_app(config)
    sink = UsageSink(parts, history, writer, PriceTable(list(config.prices)), config.billing.timezone)
    readiness = Readiness()
    register_usage_agent(parts, sink)
    register_views(parts, history, readiness, config.billing.timezone)
    _announce_ready(parts, readiness, started)

    # Faust, mode and aiokafka log every step at INFO; set
    # QUOTAMETER_WORKER_LIBRARY_LOG_LEVEL=INFO to see those steps.
    library_level = os.environ.get(LIBRARY_LOG_LEVEL_ENV, "WARNING").upper()
    for library in ("aiokafka", "faust", "mode"):
        logging.getLogger(library).setLevel(library_level)
    worker = faust.Worker(
        parts.app,
        SinkService(history, writer, loop=loop),
        loop=loop,
        loglevel="INFO",
        quiet=True,
        redirect_stdouts=False,
    )
    worker.execute_from_commandline()
