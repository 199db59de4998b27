"""Deduplication by event id: a bounded window in memory, the ledger beyond it.

An id is *known* once its event was applied (or skipped as applied) by this
worker: from then on it sits in the window, unconfirmed until its ledger row
is written, then for ``window_s`` more. Ids not in the window are looked up
in the ledger (a primary-key lookup on ``(customer, id)``), so a duplicate
the shim re-sends days later is still caught: the window only saves queries.

Unconfirmed ids are never evicted: they are not in the ledger yet, so the
window is the only place that knows them.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from pipeline.history import schema
from pipeline.history.store import AsyncHistory
from quotameter.windows import Delivered

LOOKUP_CHUNK = 5000  # ids per ledger query (the store returns at most 10k rows)


class RecentIds:
    def __init__(self, window_s: float, max_ids: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self.clock = clock
        self._ids: OrderedDict[str, float | None] = OrderedDict()  # id -> confirmed at (None: not yet)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def clear(self) -> None:
        self._ids.clear()

    def add(self, ids: Iterable[str]) -> None:
        for event_id in ids:
            self._ids[event_id] = None
            self._ids.move_to_end(event_id)

    def confirm(self, ids: Iterable[str]) -> None:
        now = self.clock()
        for event_id in ids:
            if event_id in self._ids:
                self._ids[event_id] = now
        self._evict(now)

    def _evict(self, now: float) -> None:
        # Oldest first; stop at the first id still unconfirmed or young enough.
        while self._ids:
            event_id, confirmed = next(iter(self._ids.items()))
            if confirmed is None:
                break
            if now - confirmed < self.window_s and len(self._ids) <= self.max_ids:
                break
            del self._ids[event_id]


class Deduplicator:
    def __init__(self, recent: RecentIds, history: AsyncHistory) -> None:
        self.recent = recent
        self.history = history
        self.ledger_lookups = 0

    async def known(self, batch: Sequence[Delivered]) -> dict[str, tuple[int, int] | None]:
        """The ids of ``batch`` already seen: in the window (None), or in the
        ledger (the Kafka partition and offset its row was written from)."""
        known: dict[str, tuple[int, int] | None] = {d.priced.event.id: None for d in batch if d.priced.event.id in self.recent}
        ask = [d for d in batch if d.priced.event.id not in known]
        for start in range(0, len(ask), LOOKUP_CHUNK):
            chunk = ask[start : start + LOOKUP_CHUNK]
            customers = sorted({d.priced.event.customer_id for d in chunk})
            ids = [d.priced.event.id for d in chunk]
            rows = await self.history.query(schema.known_ids(customers, ids))
            self.ledger_lookups += 1
            known.update((row["id"], (int(row["p"]), int(row["o"]))) for row in rows)
        return known
