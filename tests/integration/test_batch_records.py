"""Records carrying many events, against a real broker, redis-server, a real
``quotameter worker`` and its chDB ledger: each event lands once with its
exact tokens and its place in the record, a record of one event (an older
shim, another producer) still counts, a redelivered batch counts nothing
twice, bad elements go to the dead-letter topic alone, and every spool seq a
record names is confirmed to its shim."""

from __future__ import annotations

import json

import redis
from aiokafka import AIOKafkaProducer

from pipeline.usage_agent import partition_of
from quotameter.config import Config
from quotameter.delivery import batch_delivery_headers, delivery_headers, set_bits
from quotameter.event_batch import BATCH_CONTENT_TYPE, CONTENT_TYPE_HEADER, encode_batch
from quotameter.events import UsageEvent, encode_event
from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import (
    PERIOD,
    http_json,
    make_event,
    read_topic,
    redis_usage,
    start_worker,
    wait_for,
)

SPOOL = "feedbeef01"


def same_partition_customers(count: int, partitions: int) -> tuple[int, list[str]]:
    """``count`` customers the default partitioner puts in one partition."""
    found: dict[int, list[str]] = {}
    n = 0
    while True:
        name = f"cust{n}"
        group = found.setdefault(partition_of(name.encode(), partitions), [])
        group.append(name)
        if len(group) == count:
            return partition_of(name.encode(), partitions), group
        n += 1


async def send(config: Config, partition: int, records: list[tuple[bytes, bytes, list[tuple[str, bytes]]]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=config.services.kafka_bootstrap)
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send_and_wait(config.services.events_topic, value, key=key, partition=partition, headers=headers)
    finally:
        await producer.stop()


def batch(events: list[UsageEvent | bytes], seqs: list[int]) -> tuple[bytes, bytes, list[tuple[str, bytes]]]:
    first = next(e for e in events if isinstance(e, UsageEvent))
    values = [encode_event(e) if isinstance(e, UsageEvent) else e for e in events]
    headers = [*batch_delivery_headers(SPOOL.encode(), seqs), (CONTENT_TYPE_HEADER, BATCH_CONTENT_TYPE)]
    return first.customer_id.encode(), encode_batch(values), headers


def ledger_positions(config: Config, customers: list[str]) -> dict[str, tuple[int, int, int, int, int]]:
    """id -> (rows, input tokens, output tokens, offset, index), duplicates included (no FINAL)."""
    names = ", ".join(f"'{c}'" for c in customers)
    status, body = http_json(
        f"{config.services.worker_url}/query",
        f"""SELECT id, count() AS n, sum(input_tokens) AS i, sum(output_tokens) AS o,
                   any(kafka_offset) AS off, any(kafka_index) AS idx
            FROM quotameter.events WHERE customer IN ({names}) GROUP BY id""",
        config=config,
    )
    assert status == 200, body
    return {row["id"]: (int(row["n"]), int(row["i"]), int(row["o"]), int(row["off"]), int(row["idx"])) for row in body["rows"]}


async def test_batched_records_land_once_each_with_their_place(config_factory, cli_process) -> None:
    config, path = config_factory()
    start_worker(cli_process, config, path, "worker")
    partitions = config.services.kafka_topic_partitions
    partition, (a, b, c) = same_partition_customers(3, partitions)
    stranger = next(f"x{n}" for n in range(1000) if partition_of(f"x{n}".encode(), partitions) != partition)

    first = [make_event("b1-0", a, input_tokens=11, output_tokens=1), make_event("b1-1", b, input_tokens=22, output_tokens=2),
             make_event("b1-2", a, input_tokens=33, output_tokens=3)]
    single = make_event("s-0", c, input_tokens=44, output_tokens=4)
    bad = json.dumps({"specversion": "1.0", "id": "broken", "subject": a}).encode()
    second = [make_event("b2-0", c, input_tokens=55, output_tokens=5), bad, make_event("b2-2", stranger, input_tokens=66),
              make_event("b2-3", b, input_tokens=77, output_tokens=7)]
    await send(config, partition, [
        batch(first, [10, 11, 12]),  # offset 0
        (c.encode(), encode_event(single), delivery_headers(SPOOL.encode(), 13)),  # offset 1: one envelope, as older shims send
        batch(first, [10, 11, 12]),  # offset 2: the same batch again (a shim's redelivery)
        batch(second, [20, 21, 22, 23]),  # offset 3
    ])

    expected = {"b1-0": (1, 11, 1, 0, 0), "b1-1": (1, 22, 2, 0, 1), "b1-2": (1, 33, 3, 0, 2),
                "s-0": (1, 44, 4, 1, 0), "b2-0": (1, 55, 5, 3, 0), "b2-3": (1, 77, 7, 3, 3)}

    def landed() -> dict | None:
        rows = ledger_positions(config, [a, b, c, stranger])
        return rows if len(rows) >= len(expected) else None

    wait_for(landed, 30, "the batches' rows in the ledger")
    assert ledger_positions(config, [a, b, c, stranger]) == expected  # once each, none of the stranger's

    # Redis holds the same totals, to the token.
    for customer, ids in {a: ["b1-0", "b1-2"], b: ["b1-1", "b2-3"], c: ["s-0", "b2-0"]}.items():
        totals = wait_for(lambda: (u := redis_usage(config, customer, PERIOD)) and u.get("events") == str(len(ids)) and u,
                          20, f"{customer}'s usage in Redis")
        assert int(totals["input_tokens"]) == sum(expected[i][1] for i in ids)
        assert int(totals["output_tokens"]) == sum(expected[i][2] for i in ids)

    # Only the bad elements went to the dead-letter topic, each alone, with its reason.
    dead = await read_topic(config.services.kafka_bootstrap, f"{config.services.events_topic}.dlq", 2)
    assert len(dead) == 2
    assert json.loads(dead[0].value) == json.loads(bad)
    assert json.loads(dead[1].value)["id"] == "b2-2"
    reasons = [dict(r.headers)["quotameter-dlq-reason"].decode() for r in dead]
    assert "malformed usage event" in reasons[0] and f"does not belong in partition {partition}" in reasons[1]

    # Every seq the records named is confirmed to the spool, the dead-lettered included (handled), none other.
    client = redis.Redis.from_url(config.services.redis_url)
    key = RedisKeys(config.services.redis_prefix).ledgered(SPOOL, 0)

    def confirmed() -> list[int]:
        return list(set_bits(client.get(key) or b"", 0))

    wait_for(lambda: confirmed() == [10, 11, 12, 13, 20, 21, 22, 23], 20, "the spool's confirmations")
