"""Telling each shim which of its events the ledger holds.

Called by the ledger sink after an insert succeeded, with every event of the
flushed batches: the new rows, and the duplicates and redeliveries the
ledger already had. Each record that came from a shim's spool carries its
spool id and the sequence number of each of its events as headers; each
event's bit is set in that spool's
bitmap (layout and reasons: quotameter/delivery.py), one BITFIELD per block,
consecutive bits set together as one field of ones.

A crash or a Redis error before the bits are set loses nothing: the shim
keeps the events and sends them again after ``shim.redeliver_after_ms``; the
dedupe drops them and they are marked then. So a failure here is logged, not
retried, and never holds up the acks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from quotameter.delivery import MARK_TTL_S, bit_runs, marks_by_block, read_seqs
from quotameter.redis_keys import RedisKeys

log = logging.getLogger(__name__)

_RUNS_PER_CALL = 2000  # SET subcommands (runs of bits) per BITFIELD


class LedgerMarks:
    def __init__(self, client: Redis, names: RedisKeys) -> None:
        self.client = client
        self.names = names
        self.marked = 0
        self.failures = 0

    async def mark(self, events: Iterable[Any]) -> None:
        """Set the bit of every event (Faust events, or filled records) that carries a spool's headers."""
        by_spool: dict[str, list[int]] = {}
        for event in events:
            found = read_seqs(getattr(event.message, "headers", None))
            if found is not None:  # one seq per event the record carries
                by_spool.setdefault(found[0], []).extend(found[1])
        if not by_spool:
            return
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for spool_id, seqs in by_spool.items():
                    for block, bits in marks_by_block(seqs).items():
                        key = self.names.ledgered(spool_id, block)
                        runs = bit_runs(bits)
                        for start in range(0, len(runs), _RUNS_PER_CALL):
                            args: list[Any] = []
                            for first, length in runs[start : start + _RUNS_PER_CALL]:
                                args += ["SET", f"u{length}", first, (1 << length) - 1]
                            pipe.execute_command("BITFIELD", key, *args)
                        pipe.expire(key, MARK_TTL_S)
                await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failures += 1
            log.warning("could not confirm %d ledger rows to the shims (%s); they will send them again",
                        sum(len(s) for s in by_spool.values()), exc)
            return
        self.marked += sum(len(s) for s in by_spool.values())
