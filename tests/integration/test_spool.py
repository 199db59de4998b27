"""Kafka away, the shim killed: no usage event is lost (``shim.delivery: broker``).

These tests check the path to Kafka itself, so the shim forgets an event once
Kafka acknowledged it, as it does in front of a broker that persists; the
default, holding events until the ledger has them, is tested with a worker
in test_delivery.py.

Each test runs its own Tansu broker on a fixed port, so it can be stopped and
started again by PID on the same address. Tansu keeps records in memory only,
so a restarted broker starts empty. Tansu creates a topic when a client asks
for its metadata, but a produce request for a topic it does not have (a
producer still holding the old broker's metadata) is *acknowledged and
dropped* (checked with aiokafka 0.14 / Tansu 0.6). A real Kafka broker keeps
its topics, so the test recreates the topic with the admin client while the
shim is frozen (SIGSTOP), then lets it go on. What the first broker held is
read before it dies.

A request is identified by (customer, max_tokens): the mock answers exactly
max_tokens tokens and the event records them as output_tokens.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from gateway_shim.keystore import create_key
from quotameter.config import Config
from quotameter.embedded.broker import broker_process
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.events import UsageEvent, decode_event
from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import unpacked

MESSAGES = [{"role": "user", "content": "Count."}]
UNLIMITED = {"tiers": {"unlimited": {}}}


class Broker:
    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.log = tmp_path / "own-broker.log"
        self.proc: ManagedProcess | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = broker_process(self.port, self.log).start()
        self.proc.wait_port("127.0.0.1", self.port, timeout_s=30)

    def signal(self, sig: int) -> None:
        assert self.proc is not None and self.proc.pid is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    own = Broker(tmp_path)
    yield own
    if own.proc is not None:
        own.signal(signal.SIGCONT)
        own.proc.stop()


async def _start(cli_process, config_factory, broker: Broker, overrides: dict[str, Any] | None = None):
    mock_port = free_port()
    mock = cli_process("mock", "mock-llm", "--port", str(mock_port))
    config, path = config_factory(
        {**UNLIMITED, "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
         "services": {"kafka_bootstrap": broker.bootstrap}, "shim": {"delivery": "broker"}, **(overrides or {})}
    )
    await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
    return config, path, await _start_shim(cli_process, config, path, "shim")


async def _start_shim(cli_process, config: Config, path: Path, name: str) -> ManagedProcess:
    shim = cli_process(name, "proxy", config_path=path)
    await asyncio.to_thread(shim.wait_port, config.shim.host, config.shim.port)
    return shim


def _key(config: Config, customer: str) -> str:
    client = redis.Redis.from_url(config.services.redis_url)
    try:
        return create_key(client, RedisKeys(config.services.redis_prefix), customer, "unlimited").plaintext
    finally:
        client.close()


async def _health(config: Config) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://{config.shim.host}:{config.shim.port}/healthz") as response:
            return response.status, await response.json()


async def _wait_depth(config: Config, done: Any, timeout_s: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        _, health = await _health(config)
        if done(health["events"]["spool"]["depth"]) or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.05)


class Collector:
    """Reads the topic from the beginning in the background."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
            metadata_max_age_ms=500,
        )
        self.events: list[UsageEvent] = []
        self.records = 0  # Kafka records, each carrying one event or a batch of them
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Collector:
        await self.consumer.start()
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            for batch in (await self.consumer.getmany(timeout_ms=100)).values():
                self.records += len(batch)
                self.events.extend(decode_event(record.value) for record in unpacked(batch))

    async def until(self, count: int, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        # After its broker died, aiokafka's fetcher re-raises the cancellation of
        # its own backoff sleep on stop; the consumer is closed all the same.
        await asyncio.gather(self.consumer.stop(), return_exceptions=True)


def _check_delivered(events: list[UsageEvent], sent: set[tuple[str, int]]) -> int:
    """Every request's event, once after dedupe by id; returns the duplicates delivered."""
    unique = {event.id: event for event in events}
    assert len(unique) == len(sent), f"{len(unique)} distinct event ids for {len(sent)} requests"
    assert {(e.subject, e.data.output_tokens) for e in unique.values()} == sent
    return len(events) - len(unique)


@pytest.mark.parametrize("linger_ms", [0, 400])
async def test_events_gather_for_the_linger_into_few_records(
    cli_process, config_factory, broker: Broker, linger_ms: int
) -> None:
    """shim.event_linger_ms: the sender waits that long between turns, so the
    events of requests answered meanwhile go out together, as one record of the
    customer's partition. Without the wait, each turn takes the one or two
    events spooled since the last."""
    broker.start()
    config, _, shim = await _start(cli_process, config_factory, broker, {"shim": {"delivery": "broker", "event_linger_ms": linger_ms}})
    key = _key(config, "lingerer")
    collector = await Collector(broker.bootstrap, config.services.events_topic).start()
    base = f"http://{config.shim.host}:{config.shim.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=10) as client:
        began = time.monotonic()
        for n in range(1, 31):  # one after the other, about 30 ms apart: ~1 s of answers
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=n)
            await asyncio.sleep(0.03)
        answering_s = time.monotonic() - began
    await collector.until(30)
    await asyncio.sleep(0.5)
    await collector.stop()
    assert sorted(event.data.output_tokens for event in collector.events) == list(range(1, 31))
    if linger_ms:  # a first lone event, then one record per turn of 400 ms while the answers last
        assert collector.records <= 2 + answering_s * 1000 / linger_ms, (collector.records, answering_s)
    else:
        assert collector.records >= 20, collector.records
    assert await asyncio.to_thread(shim.stop) == 0


async def test_broker_stopped_mid_traffic_loses_no_event(
    cli_process, config_factory, broker: Broker, capsys: pytest.CaptureFixture[str]
) -> None:
    broker.start()
    config, _, shim = await _start(cli_process, config_factory, broker)
    customers = [f"spooler-{i}" for i in range(4)]
    keys = {c: _key(config, c) for c in customers}
    sent: set[tuple[str, int]] = set()
    stop_sending = asyncio.Event()

    async def client_loop(customer: str) -> None:
        base = f"http://{config.shim.host}:{config.shim.port}/v1"
        async with openai.AsyncOpenAI(base_url=base, api_key=keys[customer], max_retries=0, timeout=10) as client:
            for n in range(1, 100_000):  # until stop_sending: running out first would read as a failure
                if stop_sending.is_set():
                    return
                stream = n % 2 == 0
                result = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=n, stream=stream,
                )
                if stream:
                    async for _ in result:
                        pass
                sent.add((customer, n))  # succeeded: its event must arrive
                await asyncio.sleep(0.02)

    first = await Collector(broker.bootstrap, config.services.events_topic).start()
    clients = [asyncio.create_task(client_loop(c)) for c in customers]
    await asyncio.sleep(1.5)

    # Stop the broker without racing our reader: freeze it (no more acks), and
    # kill it only once the reader holds everything the shim saw acknowledged.
    while True:
        broker.signal(signal.SIGSTOP)
        await asyncio.sleep(0.2)
        acked = (await _health(config))[1]["events"]["sent"]
        if len(first.events) >= acked:
            break
        broker.signal(signal.SIGCONT)
        await first.until(acked, timeout_s=1)
    broker.kill()
    partitions = len(first.consumer.partitions_for_topic(config.services.events_topic) or ())
    await first.stop()
    before_outage = len(sent)

    await asyncio.sleep(2.5)  # the clients keep going, the broker is gone
    status, health = await _health(config)
    assert status == 200 and health["status"] == "ok"
    assert health["events"]["spool"]["depth"] > 0, health
    assert len(sent) > before_outage + 20
    assert not any(task.done() for task in clients), "a request failed while the broker was down"

    # Same port, empty memory: recreate the topic before the shim's producer,
    # still holding the old metadata, can produce into the void (see above).
    shim.send_signal(signal.SIGSTOP)
    try:
        broker.start()
        admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(config.services.events_topic, partitions, 1)])
        await admin.close()
    finally:
        shim.send_signal(signal.SIGCONT)
    second = await Collector(broker.bootstrap, config.services.events_topic).start()
    await asyncio.sleep(1.5)
    stop_sending.set()
    await asyncio.gather(*clients)
    health = await _wait_depth(config, lambda depth: depth == 0)
    assert health["events"]["spool"]["depth"] == 0
    await second.until(len(sent) - len(first.events))
    await asyncio.sleep(0.5)  # catch duplicates still arriving
    await second.stop()

    duplicates = _check_delivered(first.events + second.events, sent)
    with capsys.disabled():
        print(f"\n[spool] {len(sent)} requests ({len(sent) - before_outage} after the broker died); "
              f"{len(first.events)} events from the first broker, {len(second.events)} from the restarted one; "
              f"{duplicates} duplicates delivered, removed by id")
    assert await asyncio.to_thread(shim.stop) == 0


async def test_shim_sigkilled_with_a_full_spool_delivers_after_restart(
    cli_process, config_factory, broker: Broker
) -> None:
    # The broker is down from the start: every event goes only to the spool.
    config, path, shim = await _start(cli_process, config_factory, broker)
    sent: set[tuple[str, int]] = set()
    base = f"http://{config.shim.host}:{config.shim.port}/v1"
    for customer in ("killed-a", "killed-b"):
        async with openai.AsyncOpenAI(base_url=base, api_key=_key(config, customer), max_retries=0) as client:
            for n in range(1, 16):
                result = await client.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=n, stream=n % 3 == 0
                )
                if n % 3 == 0:
                    async for _ in result:
                        pass
                sent.add((customer, n))
    # Streams emit their event just after the last byte: let that instant pass.
    health = await _wait_depth(config, lambda depth: depth >= len(sent))
    assert health["events"]["spool"]["depth"] == len(sent) and not health["events"]["connected"]

    shim.kill()  # SIGKILL: no shutdown, no flush
    assert shim.proc is not None and shim.proc.returncode == -signal.SIGKILL
    again = await _start_shim(cli_process, config, path, "shim-again")
    _, health = await _health(config)
    assert health["events"]["spool"]["depth"] == len(sent)  # recovered from disk

    broker.start()
    health = await _wait_depth(config, lambda depth: depth == 0)
    assert health["events"]["spool"]["depth"] == 0
    collector = await Collector(broker.bootstrap, config.services.events_topic).start()
    await collector.until(len(sent))
    await asyncio.sleep(0.3)
    await collector.stop()
    _check_delivered(collector.events, sent)
    assert await asyncio.to_thread(again.stop) == 0


async def test_full_spool_refuses_with_503_then_recovers(cli_process, config_factory, broker: Broker) -> None:
    config, _, shim = await _start(
        cli_process, config_factory, broker, {"shim": {"spool_max_bytes": 4000, "delivery": "broker"}}
    )
    base = f"http://{config.shim.host}:{config.shim.port}/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=_key(config, "hoarder"), max_retries=0) as client:
        served = 0
        with pytest.raises(openai.APIStatusError) as refused:
            for _ in range(50):
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
                served += 1
        assert refused.value.status_code == 503 and refused.value.code == "metering_unavailable"
        assert 3 <= served < 50
        status, health = await _health(config)
        assert status == 503 and health["status"] == "refusing" and health["events"]["spool"]["full"]

        broker.start()
        await _wait_depth(config, lambda depth: depth == 0)
        for _ in range(20):  # the next checkpoint frees the delivered segments
            if (await _health(config))[0] == 200:
                break
            await asyncio.sleep(0.1)
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
    assert "usage spool FULL" in shim.log_tail(200)
    collector = await Collector(broker.bootstrap, config.services.events_topic).start()
    await collector.until(served + 1)
    await asyncio.sleep(0.3)
    await collector.stop()
    assert len({e.id for e in collector.events}) == served + 1  # the 503 was never served, nor billed
