"""The ledger's confirmations of one spool's events, read from Redis.

The worker sets a bit per event once the ledger holds it (the layout and the
reasons are in quotameter/delivery.py); this reads the bits from the spool's
watermark on, so the emitter can acknowledge them in the spool, and deletes
the blocks the watermark has left behind.
"""

from __future__ import annotations

from collections.abc import Iterator

import redis.asyncio as aioredis

from quotameter.delivery import BLOCK_BITS, set_bits
from quotameter.redis_keys import RedisKeys

MAX_SCAN_EVENTS = 256 * 1024  # bits read per poll (32 KiB): the rest waits for the next


class LedgerConfirmations:
    def __init__(self, client: aioredis.Redis, names: RedisKeys, spool_id: str) -> None:
        self.client = client
        self.names = names
        self.spool_id = spool_id
        self._trimmed_below = 0  # blocks below this one are deleted

    async def confirmed(self, from_seq: int, to_seq: int) -> list[int]:
        """The confirmed seqs in ``[from_seq, to_seq)`` (at most MAX_SCAN_EVENTS of them scanned)."""
        to_seq = min(to_seq, from_seq + MAX_SCAN_EVENTS)
        out: list[int] = []
        for block, first_bit, last_bit in _spans(from_seq, to_seq):
            data = await self.client.getrange(self.names.ledgered(self.spool_id, block), first_bit // 8, last_bit // 8)
            base = block * BLOCK_BITS + (first_bit // 8) * 8
            out.extend(s for s in set_bits(data, base) if from_seq <= s < to_seq)
        return out

    async def trim(self, watermark: int) -> None:
        """Delete the blocks wholly below ``watermark`` (each once)."""
        below = watermark // BLOCK_BITS
        if below > self._trimmed_below:
            await self.client.delete(*(self.names.ledgered(self.spool_id, b) for b in range(self._trimmed_below, below)))
            self._trimmed_below = below


def _spans(from_seq: int, to_seq: int) -> Iterator[tuple[int, int, int]]:
    """(block, first bit, last bit) of each block the range touches."""
    seq = from_seq
    while seq < to_seq:
        block, bit = divmod(seq, BLOCK_BITS)
        last = min(to_seq - seq - 1 + bit, BLOCK_BITS - 1)
        yield block, bit, last
        seq = block * BLOCK_BITS + last + 1
