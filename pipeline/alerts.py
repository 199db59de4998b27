"""Threshold alerts: fire each (customer, period, kind, pct) once, publish it
to the alerts topic and POST it to the webhook, in the background.

The worker calls ``observe`` after each batch's Redis write with the
customer's absolute period totals. The steps, and what a crash causes:

    1. crossed?    pure, in-process: a threshold below the totals that this
                   process has not seen fire. Nothing new: return (no I/O).
    2. claim       SET NX {p}:alert:{customer}:{period}:{kind}:{pct} (one
                   pipelined round trip). Exactly one worker ever wins a key,
                   across restarts too: the key outlives the period. Redis
                   down: nothing is remembered, the next observe retries.
    3. deliver     a background task (observe never waits on it): the Kafka
                   event and the webhook, concurrently; then the outcome is
                   written back into the key. A crash between 2 and the end
                   of 3 leaves the alert claimed but undelivered: it is
                   listed with ``kafka``/``webhook`` still "pending" and is
                   not re-sent (at most once per threshold, never twice).

Totals that run high after a redelivery (see usage_agent) can fire an alert
early; they never make one fire twice.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis
from aiokafka import AIOKafkaProducer
from redis.asyncio import Redis
from redis.exceptions import RedisError

from pipeline import telemetry
from pipeline.topics import ensure_topics
from pipeline.webhook import Delivery, WebhookSender
from quotameter.alert_rules import Alert, AlertKind, AlertLimits, build_alerts, crossed, limits_for, sort_listing
from quotameter.config import Config, Services
from quotameter.errors import QuotameterError
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import is_cluster

log = logging.getLogger(__name__)

ALERT_TOPIC_PARTITIONS = 1
CLOSE_TIMEOUT_S = 10.0
MAX_CONCURRENT_DELIVERIES = 32
MAX_TRACKED_PERIODS = 100_000  # (customer, period) pairs remembered in-process

Fired = set[tuple[AlertKind, int]]


def alert_topic(config: Config) -> str:
    return config.alerts.topic or f"{config.services.events_topic}.alerts"


def alert_record(alert: Alert, kafka: str, webhook: str, delivery: Delivery | None = None) -> str:
    """What the alert key holds: the alert and its delivery state."""
    record: dict[str, Any] = {"alert": alert.envelope(), "kafka": kafka, "webhook": webhook}
    if delivery is not None:
        record |= {"webhook_attempts": delivery.attempts, "webhook_status": delivery.status, "webhook_error": delivery.error}
    return json.dumps(record, sort_keys=True)


class AlertEngine:
    def __init__(
        self,
        client: Redis,
        keys: RedisKeys,
        limits_of: Callable[[str | None, str], AlertLimits],
        *,
        producer: AIOKafkaProducer | None = None,
        topic: str = "",
        kafka: Services | None = None,
        webhook: WebhookSender | None = None,
        retention_s: int = 400 * 86_400,
        clock_s: Callable[[], float] = time.time,
    ) -> None:
        self.client = client
        self.keys = keys
        self._limits_of = limits_of
        self.producer = producer
        self.topic = topic
        self.kafka = kafka  # creates the topic if missing (None: never)
        self.webhook = webhook
        self.retention_s = retention_s
        self._clock_s = clock_s
        self._fired: dict[tuple[str, str], Fired] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_DELIVERIES)
        self._topic_ready: asyncio.Task[None] | None = None
        self.claimed = 0  # alerts this engine won and delivers

    @classmethod
    def from_config(cls, config: Config, redis_client: Redis, producer: AIOKafkaProducer | None) -> AlertEngine:
        settings = config.alerts
        webhook = None
        if settings.webhook_url and settings.webhook_secret is not None:
            webhook = WebhookSender(
                settings.webhook_url,
                settings.webhook_secret.get_secret_value().encode(),
                timeout_s=settings.webhook_timeout_s,
                max_attempts=settings.webhook_max_attempts,
                backoff_initial_s=settings.webhook_backoff_initial_s,
                backoff_max_s=settings.webhook_backoff_max_s,
            )
        cache: dict[tuple[str | None, str | None], AlertLimits] = {}

        def limits_of(tier: str | None, customer: str) -> AlertLimits:
            # One entry per tier, plus one per customer with overrides.
            key = (tier, customer if customer in config.customers else None)
            if key not in cache:
                cache[key] = limits_for(config, tier, customer)
            return cache[key]

        return cls(
            redis_client,
            RedisKeys(config.services.redis_prefix),
            limits_of,
            producer=producer,
            topic=alert_topic(config),
            kafka=config.services,
            webhook=webhook,
            retention_s=settings.retention_days * 86_400,
        )

    async def observe(self, customer: str, period: str, tier: str | None, tokens: int, cost_usd: Decimal) -> None:
        limits = self._limits_of(tier, customer)
        if limits.silent:
            return
        reached = crossed(limits, tokens, cost_usd)
        if not reached:
            return
        fired = self._fired.get((customer, period))
        new = [hit for hit in reached if fired is None or hit not in fired]
        if not new:
            return
        now = datetime.fromtimestamp(self._clock_s(), UTC)
        alerts = build_alerts(customer, period, tier, limits, new, tokens, cost_usd, now)
        pipe = self.client.pipeline(transaction=False)
        for alert in alerts:
            pending = alert_record(alert, "pending" if self.producer else "off", "pending" if self.webhook else "off")
            pipe.set(self._key(alert), pending, nx=True, ex=self.retention_s)
        try:
            won = await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("alerts of %s %s not claimed (Redis: %s); retried with its next batch", customer, period, exc)
            return
        if fired is None:
            if len(self._fired) >= MAX_TRACKED_PERIODS:
                self._fired.clear()  # only a cache: Redis still refuses a second claim
            fired = self._fired.setdefault((customer, period), set())
        for alert, claimed in zip(alerts, won, strict=True):
            fired.add((alert.kind, alert.threshold_pct))
            if claimed:
                self.claimed += 1
                telemetry.alert_fired(alert.kind.value)
                log.info("alert %s: %s %s %s reached %d%%", alert.id, customer, period, alert.kind, alert.threshold_pct)
                task = asyncio.create_task(self._deliver(alert), name=f"alert-{alert.id}")
                self._tasks.add(task)
                task.add_done_callback(self._finished)

    def _key(self, alert: Alert) -> str:
        return self.keys.alert(alert.customer, alert.period, alert.kind.value, alert.threshold_pct)

    async def _deliver(self, alert: Alert) -> None:
        body = alert.to_json()
        async with self._slots:
            kafka, delivery = await asyncio.gather(self._publish(alert, body), self._post(alert, body))
        webhook = "off" if self.webhook is None else ("delivered" if delivery and delivery.delivered else "failed")
        try:
            await self.client.set(self._key(alert), alert_record(alert, kafka, webhook, delivery), xx=True, keepttl=True)
        except (RedisError, OSError) as exc:
            log.warning("delivery state of alert %s not recorded: %s", alert.id, exc)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("alert delivery %s failed", task.get_name(), exc_info=task.exception())

    async def _publish(self, alert: Alert, body: bytes) -> str:
        if self.producer is None:
            return "off"
        try:
            await self._ensure_topic()
            await self.producer.send_and_wait(
                self.topic, body, key=alert.customer.encode(), timestamp_ms=int(alert.fired_at.timestamp() * 1000)
            )
        except Exception as exc:  # aiokafka's KafkaError tree, timeouts
            log.error("alert %s not published to %s: %s", alert.id, self.topic, exc)
            return "failed"
        return "sent"

    async def _ensure_topic(self) -> None:
        if self.kafka is None:
            return
        if self._topic_ready is None or (self._topic_ready.done() and self._topic_ready.exception() is not None):
            self._topic_ready = asyncio.ensure_future(ensure_topics(self.kafka, [self.topic], ALERT_TOPIC_PARTITIONS))
        try:
            await asyncio.shield(self._topic_ready)
        except QuotameterError as exc:
            log.warning("topic %s not ready (%s); sending anyway", self.topic, exc)

    async def _post(self, alert: Alert, body: bytes) -> Delivery | None:
        if self.webhook is None:
            return None
        return await self.webhook.deliver(body, alert.id)

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Wait up to ``timeout_s`` for deliveries in flight, then cancel the
        rest (their keys stay "pending") and close the webhook session."""
        if self._tasks:
            done, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%d alert deliveries still in flight after %.0fs; abandoned", len(pending), timeout_s)
                await asyncio.gather(*pending, return_exceptions=True)
        if self.webhook is not None:
            await self.webhook.close()


def list_alerts(client: redis.Redis, keys: RedisKeys, customer: str | None = None, period: str | None = None) -> list[dict[str, Any]]:
    """The stored alert records (``alert_record``) of one customer and/or
    period, oldest period first. Reads Redis, where alerts are claimed."""
    names = list(client.scan_iter(match=keys.alert_pattern(customer, period), count=1000))
    records = []
    for start in range(0, len(names), 500):
        for raw in _mget(client, names[start : start + 500]):
            if raw is None:  # expired since the scan
                continue
            record = json.loads(raw)
            data = record["alert"]["data"]
            if (customer is None or data["customer"] == customer) and (period is None or data["period"] == period):
                records.append(record)
    return sort_listing(records)


def _mget(client: redis.Redis, names: list) -> list:
    # On a cluster the names span slots: redis-py splits the read per slot there.
    return client.mget_nonatomic(names) if is_cluster(client) else client.mget(names)
