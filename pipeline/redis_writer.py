"""Quota state in Redis: each customer's period totals, as absolute values.

Writes are HSETs of whole totals, never INCRBY: writing the same batch twice
(a retry, a redelivery) leaves the same hash, and a flushed Redis is rebuilt
by the next batch of each customer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from redis.asyncio import Redis
from redis.exceptions import RedisError

from quotameter.aggregate import Totals
from quotameter.redis_keys import USAGE_FIELDS, RedisKeys

log = logging.getLogger(__name__)

PeriodKey = tuple[str, str]  # (customer, billing period YYYY-MM)


def usage_hash(totals: Totals, updated_ms: int) -> dict[str, str]:
    """The fields of ``{p}:usage:{customer}:{period}``: USAGE_FIELDS, refused, updated_ms."""
    record = totals.to_record()
    fields = {name: str(record[name]) for name in USAGE_FIELDS}
    fields["refused"] = str(totals.refused)
    fields["updated_ms"] = str(updated_ms)
    return fields


class UsageWriter:
    """Writes period totals in one pipelined round trip per batch.

    A failed write is kept and retried with the next batch (newer totals of
    the same key replace it), so a Redis outage delays quota state but never
    stops the pipeline: the ledger, not Redis, is the record.
    """

    def __init__(self, client: Redis, keys: RedisKeys, clock_ms: Callable[[], int]) -> None:
        self.client = client
        self.keys = keys
        self.clock_ms = clock_ms
        self._pending: dict[PeriodKey, Totals] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def write(self, totals: Mapping[PeriodKey, Totals]) -> bool:
        self._pending.update(totals)
        return await self.flush()

    async def flush(self) -> bool:
        if not self._pending:
            return True
        batch = dict(self._pending)
        now_ms = self.clock_ms()
        pipe = self.client.pipeline(transaction=False)
        for (customer, period), totals in batch.items():
            pipe.hset(self.keys.usage(customer, period), mapping=usage_hash(totals, now_ms))
        try:
            await pipe.execute()
        except (RedisError, OSError) as exc:
            log.warning("quota state not written to Redis (%d keys kept for the next batch): %s", len(batch), exc)
            return False
        for key, totals in batch.items():
            if self._pending.get(key) is totals:
                del self._pending[key]
        return True

    async def close(self) -> None:
        await self.flush()
        await self.client.aclose()
