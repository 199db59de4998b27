"""Usage events to Kafka through a write-ahead spool, never holding up a response.

``emit`` appends the event to the on-disk spool (gateway_shim/spool.py, one
``os.write``) and returns; one sender task hands spooled events to the
producer in spool order, each partition's events of a turn as few Kafka
records (a CloudEvents batch each: gateway_shim/kafka_records.py) whose
headers name the spool and every event's sequence number, and the spool
forgets an event once it is delivered: in the ledger (the default; step 4
below) or in Kafka (step 3). Whether the broker is up or
down, the path is the same: while it is down events accumulate on disk (the
spool's depth grows), and when it is back the sender resumes from the oldest
undelivered event, in order.

Why write-ahead, not "spool only when a send fails": a send is only known to
have failed after the producer's timeout, and the events waiting in the
producer's memory meanwhile (every event of the last ``request_timeout_ms``
while the broker is silently gone) die with the process on a SIGKILL. Writing
every event first costs one small ``os.write`` per request (~5 µs here, see
bench/README.md) and makes the loss window zero for process crashes.

Guarantee, in order of the steps one event goes through:

1. ``emit`` returns: the event is in the segment file (page cache). A SIGKILL
   from here on loses nothing; the next start replays it.
2. group commit (every ``shim.spool_fsync_interval_ms``, fdatasync in a
   thread): from here on it also survives a power loss or kernel crash. The
   exact loss window is therefore: power loss only, events emitted in the
   last ``spool_fsync_interval_ms`` (with 0, fsync is left to the kernel's
   writeback, ~30 s).
3. Kafka acknowledges it (``acks=all``). With ``shim.delivery: broker`` the
   spool marks it delivered here. With ``ledger`` (the default) Kafka's
   acknowledgement only means "sent": the embedded broker keeps records in
   memory, so a broker that stops before a worker read them would take them
   along. The event stays spooled.
4. ``ledger`` only: a worker wrote the event's ledger row and set its bit in
   Redis (quotameter/delivery.py); the confirmation poll marks it delivered.
   Events Kafka took that the ledger still lacks after
   ``shim.redeliver_after_ms`` (a broker that lost them) are sent again, and
   so is everything unconfirmed after any failed send: duplicates at worst,
   dropped by the pipeline's dedupe by event id. Delivery is at-least-once on
   the wire and exactly-once in the ledger.
5. checkpoint: the delivered watermark is persisted and spooled segments
   wholly below it are deleted. A crash before the next checkpoint resends
   what was delivered since: duplicates again.

What the shim cannot spool is an event that does not exist yet: a request in
flight when the shim dies is not recorded (the event is built when the
request ends). For streams the event is emitted after the client received the
last byte, so a SIGKILL in that instant loses that one event.

A full spool (``shim.spool_max_bytes``: Kafka has been away long enough)
is logged as an error every few seconds and shown in /healthz. With
``shim.spool_full: refuse`` (the default) the shim answers new requests 503
until the spool drains, so that nothing is served unbilled; requests already
in flight still spool their events past the bound. With ``drop`` it keeps
serving and drops (counts, logs) the events that do not fit.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial

import redis.exceptions
from aiokafka import AIOKafkaProducer
from aiokafka.producer.message_accumulator import BatchBuilder
from aiokafka.errors import KafkaError

from gateway_shim.confirmations import LedgerConfirmations
from gateway_shim.errors import MeteringUnavailable
from gateway_shim.kafka_records import kafka_records
from gateway_shim.spool import Spool, SpoolRecord
from quotameter.config import Config, Services
from quotameter.delivery import AckMode
from quotameter.events import EncodedEvent, UsageEvent, encode_event
from quotameter.kafka_client import explain, producer_options
from quotameter.redis_keys import RedisKeys

log = logging.getLogger("gateway_shim.emitter")

_PRODUCER_OPTIONS = {
    "acks": "all",
    "linger_ms": 5,  # for send(); the sender's own batches are closed, so they go out at once
    # No compression: aiokafka's lz4 needs cramjam, and every consumer would too.
    "compression_type": None,
    "request_timeout_ms": 15_000,
}
_BATCH = 500  # events handed to the producer per turn of the sender
_RECENT = 10_000  # events kept in memory so the live path never reads the disk
_LARGE_EVENT_BYTES = 64 * 1024  # larger events go through producer.send() (its size check) alone
_CHECKPOINT_S = 0.25
_FULL_LOG_EVERY_S = 5.0
_CONFIRM_POLL_S = 0.2  # how often the ledger's confirmations are read
_REDELIVER_BACKOFF_MAX = 8  # the redelivery wait grows to this many times redeliver_after
_DRAIN_LOG_EVERY_S = 2.0


class EventEmitter:
    def __init__(
        self,
        bootstrap: str,
        topic: str,
        spool: Spool,
        *,
        fsync_interval_ms: int = 10,
        linger_ms: int = 50,
        refuse_when_full: bool = True,
        retry_s: float = 1.0,
        max_in_flight: int = 20_000,
        delivery: AckMode = AckMode.BROKER,
        confirmations: Callable[[str], LedgerConfirmations] | None = None,
        redeliver_after_s: float = 15.0,
        kafka: Services | None = None,
    ) -> None:
        self.bootstrap = bootstrap
        # Security, idempotence, and whether the topic must exist already
        # (None: a plaintext broker at ``bootstrap``).
        self.kafka = kafka or Services(kafka_bootstrap=bootstrap)
        self.topic = topic
        self.spool = spool
        self.fsync_interval_s = fsync_interval_ms / 1000
        self.linger_s = linger_ms / 1000  # between the sender's turns (shim.event_linger_ms)
        self.refuse_when_full = refuse_when_full
        self.retry_s = retry_s
        self.max_in_flight = max_in_flight
        if delivery == AckMode.LEDGER and confirmations is None:
            raise ValueError("ledger delivery needs the ledger's confirmations (a Redis client)")
        self.delivery = delivery
        self._make_confirmations = confirmations
        self._confirmations: LedgerConfirmations | None = None
        self.redeliver_after_s = redeliver_after_s
        self._redeliver_backoff = 1
        self._last_progress = time.monotonic()  # when the delivered watermark last moved
        self._stalled_at = -1  # the watermark as last seen by the stall check
        self._in_producer = 0  # events handed to the producer and not yet acknowledged or failed
        self.redelivered = 0  # times unconfirmed events were sent again
        self._producer: AIOKafkaProducer | None = None
        self._recent: deque[SpoolRecord] = deque(maxlen=_RECENT)
        self._next = 0  # the next seq to hand to the producer
        self._partition_set: set[int] | None = None  # the topic's partitions, as last seen
        self._partition_of: dict[bytes, int] = {}  # key -> partition for that set
        self._generation = 0  # bumped on every rewind; stale failures are ignored
        self._rewind = False
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False
        self._write_error: str | None = None
        self._full_logged_at = 0.0
        self.sent = 0  # acknowledged by Kafka (a resent event counts again)
        self.dropped = 0  # not spooled: spool full in "drop" mode, or the disk failed

    @classmethod
    def from_config(cls, config: Config, redis_client: object | None = None) -> EventEmitter:
        """``redis_client`` (redis.asyncio) reads the ledger's confirmations; needed for ``delivery: ledger``."""
        shim = config.shim
        names = RedisKeys(config.services.redis_prefix)
        confirmations = None
        if redis_client is not None:
            confirmations = partial(LedgerConfirmations, redis_client, names)
        return cls(
            config.services.kafka_bootstrap,
            config.services.events_topic,
            Spool(shim.spool_dir, shim.spool_max_bytes, durable=shim.spool_fsync_interval_ms > 0),
            fsync_interval_ms=shim.spool_fsync_interval_ms,
            linger_ms=shim.event_linger_ms,
            refuse_when_full=shim.spool_full == "refuse",
            delivery=shim.delivery,
            confirmations=confirmations,
            redeliver_after_s=shim.redeliver_after_ms / 1000,
            kafka=config.services,
        )

    # -- what the server asks -------------------------------------------------

    @property
    def refusing(self) -> MeteringUnavailable | None:
        """Why new requests must be refused now, or None."""
        if not self.refuse_when_full:
            return None
        if self._write_error is not None:
            return MeteringUnavailable(f"Usage cannot be recorded ({self._write_error}). Please retry later.")
        if self.spool.full:
            return MeteringUnavailable("Usage cannot be recorded right now (spool full). Please retry later.")
        return None

    def oldest_undelivered_ms(self) -> int | None:
        """When the oldest event still waiting for delivery happened (Unix ms), or None."""
        return self.spool.oldest_ms()

    def status(self) -> dict[str, object]:
        return {
            "connected": self._producer is not None,
            "delivery": self.delivery.value,
            "sent": self.sent,
            "redelivered": self.redelivered,
            "dropped": self.dropped,
            "spool": {**self.spool.stats(), "write_error": self._write_error},
        }

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        """Open the spool (replaying what it holds) and start sending in the
        background; never waits for the broker."""
        self.spool.open()
        self._next = self.spool.watermark
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="events-sender"),
            asyncio.create_task(self._sync_loop(), name="spool-sync"),
        ]
        if self.delivery == AckMode.LEDGER:
            assert self._make_confirmations is not None
            self._confirmations = self._make_confirmations(self.spool.spool_id.decode())
            self._tasks.append(asyncio.create_task(self._confirm_loop(), name="ledger-confirmations"))

    def emit(self, event: UsageEvent | EncodedEvent) -> None:
        """Spool one event (a model, or one encoded already: the shim's hot path)."""
        if self.spool.full:
            self._log_full()
            if not self.refuse_when_full:
                self.dropped += 1
                return
        value = event.value if isinstance(event, EncodedEvent) else encode_event(event)
        try:
            record = self.spool.append(event.customer_id.encode(), event.time_ms, value)
        except OSError as exc:
            self.dropped += 1
            self._write_error = f"spool write failed: {exc.strerror or exc}"
            log.error("usage event %s NOT recorded: cannot write the spool at %s: %s",
                      event.id, self.spool.directory, exc)
            return
        self._write_error = None
        self._recent.append(record)
        self._wake.set()

    async def close(self, timeout_s: float = 10.0) -> None:
        """Deliver (to the ledger, or to Kafka) what gets there within
        ``timeout_s``, saying how far it is; the rest stays spooled."""
        began = time.monotonic()
        deadline = began + timeout_s
        where = "the ledger" if self.delivery == AckMode.LEDGER else "Kafka"
        if self.spool.depth:
            log.info("delivering %d spooled usage events to %s (up to %.0fs)…", self.spool.depth, where, timeout_s)
        logged = began
        while self.spool.depth and time.monotonic() < deadline:
            if self._producer is None:
                break  # Kafka unreachable: nothing more gets anywhere through us
            await _wait(self._progress, min(_DRAIN_LOG_EVERY_S, max(deadline - time.monotonic(), 0.01)))
            self._progress.clear()
            if time.monotonic() - logged >= _DRAIN_LOG_EVERY_S:
                logged = time.monotonic()
                log.info("  %d usage events still on their way to %s (%.0fs)", self.spool.depth, where, logged - began)
        if not self.spool.depth:
            log.info("every usage event is delivered to %s", where)
        self._stopping = True
        self._wake.set()
        sender, syncer, *confirming = self._tasks
        for task in (sender, *confirming):
            task.cancel()
        await asyncio.gather(sender, *confirming, return_exceptions=True)
        await asyncio.gather(syncer, return_exceptions=True)  # ends after its last sync
        if self._producer is not None:
            try:  # flushes what is batched; callbacks acknowledge it in the spool
                await asyncio.wait_for(self._producer.stop(), max(deadline - time.monotonic(), 1.0))
            except TimeoutError:
                log.warning("Kafka did not take the last batch in time; it stays spooled")
            self._producer = None
        left = self.spool.depth
        self.spool.close()
        if left:
            log.error("%d usage events could not be delivered to %s yet; they stay spooled in %s "
                      "and are sent on the next start", left, where, self.spool.directory)
        log.info("event emitter closed: %d events sent to Kafka", self.sent)

    # -- the sender -----------------------------------------------------------

    async def _send_loop(self) -> None:
        while True:
            if self._producer is None:
                self._producer = await self._connect()
                if self._producer is None:
                    await asyncio.sleep(self.retry_s)
                    continue
            if self._rewind:
                self._rewind = False
                self._generation += 1
                self._next = self.spool.watermark
                log.warning("resending usage events from seq %d (%d undelivered)",
                            self._next, self.spool.depth)
                await asyncio.sleep(self.retry_s)
                continue
            if self._next >= self.spool.next_seq:
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._in_producer >= self.max_in_flight:
                self._progress.clear()
                await _wait(self._progress, 1.0)
                continue
            batch = await self._take(_BATCH)
            await self._send_batch(self._producer, batch)
            if len(batch) < _BATCH:
                # Let the next events gather for a linger: one producer batch per partition
                # and turn, not a turn (and a produce request) per event loop iteration.
                await asyncio.sleep(self.linger_s)

    async def _take(self, limit: int) -> list[SpoolRecord]:
        recent = self._recent
        while recent and recent[0].seq < self._next:
            recent.popleft()
        if recent and recent[0].seq == self._next:
            return [recent.popleft() for _ in range(min(limit, len(recent)))]
        # Behind the in-memory window (a backlog, a rewind, or a restart): read the disk.
        return await asyncio.to_thread(self.spool.read, self._next, limit)

    async def _send_batch(self, producer: AIOKafkaProducer, batch: list[SpoolRecord]) -> None:
        """Hand ``batch`` (in spool order) to the producer: each partition's
        events as few Kafka records (gateway_shim.kafka_records), in one record
        batch per partition, each acknowledged as a whole: one future per
        batch, not per event. A partition's events keep their spool order."""
        generation = self._generation
        try:
            partitions = await producer.partitions_for(self.topic)  # metadata, cached by the client
        except (KafkaError, OSError) as exc:
            self._failed(generation, exc)
            return
        if partitions != self._partition_set:
            self._partition_set, self._partition_of = set(partitions), {}
        all_partitions = list(partitions)
        by_partition: dict[int, list[SpoolRecord]] = {}
        for record in batch:
            if self._rewind or generation != self._generation:
                return
            if self.spool.is_acked(record.seq):  # delivered before a rewind
                self._next = record.seq + 1
                continue
            partition = self._partition_of.get(record.key)
            if partition is None:
                # The producer's own partitioner (by key) over the topic's partitions, as send() picks.
                partition = producer._partitioner(record.key, all_partitions, all_partitions)
                self._partition_of[record.key] = partition
            if len(record.value) > _LARGE_EVENT_BYTES:
                # Rare: let send() size-check it as always, after what this partition holds.
                if not await self._send_partition(producer, partition, by_partition.pop(partition, []), generation):
                    return
                try:
                    delivery = await producer.send(
                        self.topic, record.value, key=record.key, partition=partition, timestamp_ms=record.timestamp_ms,
                        headers=next(kafka_records(self.spool.spool_id, [record])).headers,
                    )
                except (KafkaError, OSError) as exc:
                    self._failed(generation, exc)
                    return
                self._in_producer += 1
                delivery.add_done_callback(partial(self._delivered, (record.seq,), generation))
                self._next = record.seq + 1
                continue
            by_partition.setdefault(partition, []).append(record)
            self._next = record.seq + 1
        for partition, records in by_partition.items():
            if not await self._send_partition(producer, partition, records, generation):
                return

    async def _send_partition(
        self, producer: AIOKafkaProducer, partition: int, records: list[SpoolRecord], generation: int
    ) -> bool:
        pending: tuple[BatchBuilder, list[int]] = (producer.create_batch(), [])
        for out in kafka_records(self.spool.spool_id, records):
            if pending[0].append(key=out.key, value=out.value, timestamp=out.timestamp_ms, headers=out.headers) is None:
                # Full: send it, and start the next one with this record (a first record always fits).
                if not await self._submit(producer, partition, pending, generation):
                    return False
                pending = (producer.create_batch(), [])
                pending[0].append(key=out.key, value=out.value, timestamp=out.timestamp_ms, headers=out.headers)
            pending[1].extend(out.seqs)
        return await self._submit(producer, partition, pending, generation)

    async def _submit(
        self, producer: AIOKafkaProducer, partition: int, pending: tuple[BatchBuilder, list[int]] | None, generation: int
    ) -> bool:
        if pending is None or not pending[1]:
            return True
        pending[0].close()  # complete: the producer sends it without lingering (the sender lingered)
        try:
            delivery = await producer.send_batch(pending[0], self.topic, partition=partition)
        except (KafkaError, OSError, AssertionError, TypeError) as exc:  # also: the partition vanished meanwhile
            self._failed(generation, exc)
            return False
        self._in_producer += len(pending[1])
        delivery.add_done_callback(partial(self._delivered, pending[1], generation))
        return True

    def _delivered(self, seqs: Sequence[int], generation: int, delivery: asyncio.Future[object]) -> None:
        self._in_producer -= len(seqs)
        exc = asyncio.CancelledError() if delivery.cancelled() else delivery.exception()
        if exc is not None:
            self._failed(generation, exc)
            return
        if self.delivery == AckMode.BROKER:
            for seq in seqs:
                self.spool.ack(seq)
        self.sent += len(seqs)
        self._progress.set()

    # -- the ledger's confirmations (delivery: ledger) ----------------------------

    async def _confirm_loop(self) -> None:
        assert self._confirmations is not None
        failing = False
        while True:
            await asyncio.sleep(_CONFIRM_POLL_S)
            spool = self.spool
            try:
                if spool.depth:
                    before = spool.watermark
                    for seq in await self._confirmations.confirmed(before, min(self._next, spool.next_seq)):
                        spool.ack(seq)
                    if spool.watermark != before:
                        self._progress.set()
                await self._confirmations.trim(spool.watermark)
            except (redis.exceptions.RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot read the ledger's confirmations from Redis (%s); events stay spooled", exc)
                failing = True
                continue
            if failing:
                log.info("reading the ledger's confirmations again")
                failing = False
            self._check_stalled()

    def _check_stalled(self) -> None:
        """Send again what Kafka took long ago and the ledger still lacks."""
        now = time.monotonic()
        if self.spool.watermark != self._stalled_at or not self.spool.depth:
            self._stalled_at, self._last_progress, self._redeliver_backoff = self.spool.watermark, now, 1
            return
        if self._next <= self.spool.watermark:  # nothing was handed to Kafka yet
            self._last_progress = now
            return
        if now - self._last_progress >= self.redeliver_after_s * self._redeliver_backoff:
            log.warning("the ledger has had none of %d usage events (from seq %d) for %.0fs: sending them again",
                        self.spool.depth, self.spool.watermark, now - self._last_progress)
            self.redelivered += 1
            self._last_progress = now
            self._redeliver_backoff = min(self._redeliver_backoff * 2, _REDELIVER_BACKOFF_MAX)
            if not self._rewind:
                self._rewind = True
                self._wake.set()

    def _failed(self, generation: int, exc: BaseException) -> None:
        if generation == self._generation and not self._rewind:
            log.warning("Kafka did not take usage events (%r); they stay spooled (%d waiting)",
                        exc, self.spool.depth)
            self._rewind = True
            self._wake.set()
            self._progress.set()

    async def _connect(self) -> AIOKafkaProducer | None:
        producer = AIOKafkaProducer(**producer_options(self.kafka, **_PRODUCER_OPTIONS))
        try:
            await producer.start()
            if not self.kafka.kafka_create_topics:
                # All topics' metadata: asking for this one would make a broker
                # that auto-creates topics create it.
                if self.topic not in (await producer.client.fetch_all_metadata()).topics():
                    log.error("Kafka topic %s does not exist and services.kafka_create_topics is false: create it "
                              "(e.g. a Strimzi KafkaTopic); events are spooled (%d waiting), retrying every %.0fs",
                              self.topic, self.spool.depth, self.retry_s)
                    await producer.stop()
                    return None
        except Exception as exc:  # KafkaError, OSError, and what aiokafka's SASL clients raise on a refusal
            await producer.stop()
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # aiokafka turns a cancelled connect into a connection error: stopping must
                # not read as "the broker is away, retry" (the loop would never end).
                raise asyncio.CancelledError from exc
            log.warning("%s; events are spooled (%d waiting), retrying every %.0fs",
                        explain(exc, self.kafka), self.spool.depth, self.retry_s)
            return None
        log.info("connected to Kafka at %s; events go to topic %s (%d spooled events to send)",
                 self.bootstrap, self.topic, self.spool.depth)
        return producer

    # -- group commit and checkpoints -------------------------------------------

    async def _sync_loop(self) -> None:
        interval_s = self.fsync_interval_s or _CHECKPOINT_S
        last_checkpoint = time.monotonic()
        while True:
            stopping = self._stopping
            if self.spool.dirty:
                try:
                    await asyncio.to_thread(self.spool.run_sync, self.spool.take_sync_work())
                except OSError as exc:
                    self._write_error = f"spool fsync failed: {exc.strerror or exc}"
                    log.error("cannot fsync the spool at %s: %s", self.spool.directory, exc)
            if stopping:
                return
            if time.monotonic() - last_checkpoint >= _CHECKPOINT_S:
                last_checkpoint = time.monotonic()
                self.spool.checkpoint()
                if self.spool.full:
                    self._log_full()
            await asyncio.sleep(interval_s)

    def _log_full(self) -> None:
        now = time.monotonic()
        if now - self._full_logged_at >= _FULL_LOG_EVERY_S:
            self._full_logged_at = now
            action = "refusing new requests with 503" if self.refuse_when_full else "DROPPING usage events"
            log.error("usage spool FULL: %d events, %d bytes >= spool_max_bytes %d in %s; Kafka at %s is %s; %s",
                      self.spool.depth, self.spool.size_bytes, self.spool.max_bytes, self.spool.directory,
                      self.bootstrap, "connected" if self._producer else "unreachable", action)


async def _wait(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
