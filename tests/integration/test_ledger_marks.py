"""Ledger confirmations set exactly the bits of the events, on a real Redis:
runs of consecutive seqs are set as one field of ones."""

from __future__ import annotations

import asyncio
import uuid
from types import SimpleNamespace

import redis
from redis.asyncio import Redis

from pipeline.ledger_marks import LedgerMarks
from quotameter.delivery import BLOCK_BITS, batch_delivery_headers, set_bits
from quotameter.redis_keys import RedisKeys


def test_marks_set_the_bits_of_every_event_and_no_other(redis_url: str) -> None:
    names = RedisKeys(f"marks-{uuid.uuid4().hex[:8]}")
    spool = uuid.uuid4().hex[:16].encode()
    # Records as Faust gives them: a few seqs each, in no order, with gaps,
    # a long run, a run across a block edge, and a neighbour already set.
    records = [
        [5, 6, 7, 9], [8, 200], list(range(1000, 1300)), [BLOCK_BITS - 3, BLOCK_BITS - 2, BLOCK_BITS - 1, BLOCK_BITS, BLOCK_BITS + 1],
    ]
    events = [SimpleNamespace(message=SimpleNamespace(headers=batch_delivery_headers(spool, seqs))) for seqs in records]
    sync = redis.Redis.from_url(redis_url)
    sync.setbit(names.ledgered(spool.decode(), 0), 4, 1)  # set before: stays set

    async def mark() -> int:
        client = Redis.from_url(redis_url)
        try:
            marks = LedgerMarks(client, names)
            await marks.mark(events)
            return marks.marked
        finally:
            await client.aclose()

    assert asyncio.run(mark()) == sum(len(seqs) for seqs in records)
    block0 = list(set_bits(sync.get(names.ledgered(spool.decode(), 0)) or b"", 0))
    block1 = list(set_bits(sync.get(names.ledgered(spool.decode(), 1)) or b"", 0))
    assert block0 == [4, 5, 6, 7, 8, 9, 200, *range(1000, 1300), BLOCK_BITS - 3, BLOCK_BITS - 2, BLOCK_BITS - 1]
    assert block1 == [0, 1]
