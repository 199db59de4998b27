"""The offset guard against a real broker: skipped offsets are read back,
in order, and a position is taken from the ledger when the group has none."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from aiokafka import AIOKafkaProducer

from pipeline.offset_guard import FilledEvent, OffsetGuard
from pipeline.topics import ensure_topic


@dataclass
class Message:
    topic: str
    partition: int
    offset: int
    key: bytes | None = None


@dataclass
class Delivered:
    """What the agent reads of a Faust event."""

    message: Message
    value: bytes


async def produce(bootstrap: str, topic: str, count: int, partition: int = 0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        for n in range(count):
            await producer.send_and_wait(topic, f"v{n}".encode(), key=b"c", partition=partition)
    finally:
        await producer.stop()


def delivered(topic: str, offsets: range, partition: int = 0) -> list[Delivered]:
    return [Delivered(Message(topic, partition, o, b"c"), f"v{o}".encode()) for o in offsets]


async def test_a_batch_past_the_log_start_gets_the_skipped_records_first(kafka_bootstrap: str, unique: str) -> None:
    topic = f"guard-{unique}"
    await ensure_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, 20)

    async def empty_ledger(partitions: list[int]) -> dict[int, int]:
        return {}

    guard = OffsetGuard(kafka_bootstrap, topic, f"group-{unique}", empty_ledger)
    # No committed offset, nothing in the ledger: owed from the log start.
    batch = await guard.complete(delivered(topic, range(12, 15)))
    assert [e.message.offset for e in batch] == list(range(15))
    filled = [e for e in batch if isinstance(e, FilledEvent)]
    assert [e.value for e in filled] == [f"v{o}".encode() for o in range(12)]
    assert guard.filled == 12 and guard.expected == {0: 15}

    # A jump inside the next batch is filled too.
    batch = await guard.complete(delivered(topic, range(15, 16)) + delivered(topic, range(18, 20)))
    assert [e.message.offset for e in batch] == list(range(15, 20))
    assert guard.holes == 2 and guard.filled == 14


async def test_the_ledger_says_where_a_partition_resumes(kafka_bootstrap: str, unique: str) -> None:
    topic = f"guard-{unique}"
    await ensure_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, 10)

    async def ledger(partitions: list[int]) -> dict[int, int]:
        return {0: 6}  # rows up to offset 6 are in the ledger

    guard = OffsetGuard(kafka_bootstrap, topic, f"group-{unique}", ledger)
    batch = await guard.complete(delivered(topic, range(9, 10)))
    assert [e.message.offset for e in batch] == [7, 8, 9]  # only what the ledger lacks
    guard.reset()
    redelivered = delivered(topic, range(3, 6))  # after a rebalance: at or below the ledger, passed as they are
    assert await guard.complete(redelivered) == redelivered


async def test_a_failed_read_leaves_the_hole_to_be_found_again(
    kafka_bootstrap: str, unique: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"guard-{unique}"
    await ensure_topic(kafka_bootstrap, topic, 2)
    await produce(kafka_bootstrap, topic, 5)

    async def ledger(partitions: list[int]) -> dict[int, int]:
        return {0: 0}

    guard = OffsetGuard(kafka_bootstrap, topic, f"group-{unique}", ledger)
    read = guard._read

    async def broker_gone(holes: list) -> list:
        raise ConnectionError("broker gone")

    monkeypatch.setattr(guard, "_read", broker_gone)
    batch = delivered(topic, range(4, 5))
    with pytest.raises(ConnectionError):
        await guard.complete(batch)
    monkeypatch.setattr(guard, "_read", read)
    assert [e.message.offset for e in await guard.complete(batch)] == [1, 2, 3, 4]  # the retry, as the agent does it
