"""Usage events to Kafka, without ever holding up a response.

``emit`` only schedules the send; the event's delivery is tracked in the
background and ``close`` waits for every send still in flight, then flushes
the producer. If the broker is unreachable at start, or a send fails, the
event is parked (``_park``) and sent again once the broker answers.

Delivery guarantee today: at-least-once while this process lives (a retried
send may duplicate; the pipeline deduplicates by event id). Parked events are
held in memory only: a crash loses them. ``_park`` is the seam where the
durable local spool goes, so that no usage is lost across restarts.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from quotameter.events import UsageEvent, encode_event

log = logging.getLogger("gateway_shim.emitter")

_PRODUCER_OPTIONS = {
    "acks": "all",
    "linger_ms": 5,  # small batches; adds at most 5 ms between response and broker
    # No compression: aiokafka's lz4 needs cramjam, and every consumer would too.
    "compression_type": None,
    "request_timeout_ms": 15_000,
}


class EventEmitter:
    def __init__(self, bootstrap: str, topic: str, retry_s: float = 1.0, backlog_max: int = 100_000) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.retry_s = retry_s
        self._producer: AIOKafkaProducer | None = None
        self._in_flight: set[asyncio.Task[None]] = set()
        self._parked: deque[UsageEvent] = deque(maxlen=backlog_max)
        self._keeper: asyncio.Task[None] | None = None
        self.sent = 0

    def status(self) -> dict[str, object]:
        return {"connected": self._producer is not None, "parked": len(self._parked), "sent": self.sent}

    async def start(self) -> None:
        """Start connecting in the background; never fails, never waits for the broker."""
        self._keeper = asyncio.create_task(self._keep_connected(), name="kafka-keeper")

    def emit(self, event: UsageEvent) -> None:
        if self._producer is None:
            self._park(event, "broker not connected")
            return
        task = asyncio.create_task(self._send(self._producer, event))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)

    async def _send(self, producer: AIOKafkaProducer, event: UsageEvent) -> None:
        try:
            delivery = await producer.send(
                self.topic, encode_event(event), key=event.customer_id.encode(), timestamp_ms=event.time_ms
            )
            await delivery
            self.sent += 1
        except (KafkaError, OSError) as exc:
            self._park(event, f"send failed: {exc!r}")

    def _park(self, event: UsageEvent, why: str) -> None:
        # Seam for the durable spool: write the event to disk here, replay it in _replay.
        if len(self._parked) == self._parked.maxlen:
            log.error("event backlog full (%d): dropping the oldest event", len(self._parked))
        self._parked.append(event)
        if len(self._parked) == 1 or len(self._parked) % 1000 == 0:
            log.warning("usage events parked in memory (%s): %d waiting", why, len(self._parked))

    def _replay(self) -> None:
        while self._parked and self._producer is not None:
            self.emit(self._parked.popleft())

    async def _keep_connected(self) -> None:
        while True:
            if self._producer is None:
                self._producer = await self._connect()
            if self._producer is not None and self._parked:
                self._replay()
            await asyncio.sleep(self.retry_s)

    async def _connect(self) -> AIOKafkaProducer | None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, **_PRODUCER_OPTIONS)
        try:
            await producer.start()
        except (KafkaError, OSError) as exc:
            log.warning("Kafka at %s unreachable (%s); events are parked, retrying every %.0fs",
                        self.bootstrap, exc, self.retry_s)
            await producer.stop()
            return None
        log.info("connected to Kafka at %s; events go to topic %s", self.bootstrap, self.topic)
        return producer

    async def close(self, timeout_s: float = 10.0) -> None:
        """Deliver what is in flight, flush the producer and stop."""
        if self._keeper is not None:
            self._keeper.cancel()
            await asyncio.gather(self._keeper, return_exceptions=True)
        if self._producer is None and self._parked:
            self._producer = await self._connect()  # one last try for what is parked
        if self._producer is not None:
            self._replay()
        if self._in_flight:
            await asyncio.wait(set(self._in_flight), timeout=timeout_s)
        if self._producer is not None:
            await self._producer.stop()  # flushes what is still batched
            self._producer = None
        if self._parked:
            log.error("%d usage events could not be delivered to Kafka and are lost", len(self._parked))
        log.info("event emitter closed: %d events delivered", self.sent)
