"""Deduplication by event id: a bounded window in memory, the ledger beyond it.

An id is *known* once its event was applied (or skipped as applied) by this
worker: from then on it sits in the window, unconfirmed until its ledger row
is written, then for ``window_s`` more. Ids not in the window are looked up
in the ledger (a primary-key lookup on ``(customer, id)``), so a duplicate
the shim re-sends days later is still caught: the window only saves queries.

Unconfirmed ids are never evicted: they are not in the ledger yet, so the
window is the only place that knows them.

The ledger lookup is skipped for an event the window is sure to know if it
was applied before. An event is delivered after it was made, so had it been
applied, that was at or after its time T (less ``CLOCK_SKEW_S`` between the
shim's clock and ours); the window holds every id applied since it was last
emptied (``complete_since``) for ``window_s`` after its ledger row was
written. So when T - skew >= complete_since and now < T - skew + window_s,
the window's answer is the whole answer. A re-send hours later, or any event
after a restart or a rebalance, is still looked up.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from pipeline.history.store import AsyncHistory
from quotameter.windows import Delivered

LOOKUP_CHUNK = 5000  # ids per ledger query (the store returns at most 10k rows)
CLOCK_SKEW_S = 60.0  # how far a shim's clock may run ahead of the worker's


class RecentIds:
    def __init__(
        self, window_s: float, max_ids: int, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self.window_s = window_s
        self.max_ids = max_ids
        self.clock = clock
        self.wall = wall
        self._ids: OrderedDict[str, float | None] = OrderedDict()  # id -> confirmed at (None: not yet)
        self.complete_since = wall()  # wall-clock s: every id applied since is here

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, event_id: str) -> bool:
        return event_id in self._ids

    def clear(self) -> None:
        self._ids.clear()
        self.complete_since = self.wall()

    def answers_for(self, event_ms: int) -> bool:
        """True when this window knows the event if it was ever applied (see above)."""
        made = event_ms / 1000 - CLOCK_SKEW_S
        return made >= self.complete_since and self.wall() < made + self.window_s

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
            if now - confirmed < self.window_s:
                self.complete_since = self.wall()  # evicted young for room: no longer complete
            del self._ids[event_id]


class Deduplicator:
    def __init__(self, recent: RecentIds, history: AsyncHistory) -> None:
        self.recent = recent
        self.history = history
        self.ledger_lookups = 0
        self.lookups_skipped = 0  # events the window answered for alone

    async def known(self, batch: Sequence[Delivered]) -> dict[str, tuple[int, int] | None]:
        """The ids of ``batch`` already seen: in the window (None), or in the
        ledger (the Kafka partition and offset its row was written from)."""
        recent = self.recent
        known: dict[str, tuple[int, int] | None] = {d.priced.event.id: None for d in batch if d.priced.event.id in recent}
        ask = [d for d in batch if d.priced.event.id not in known and not recent.answers_for(d.time_ms)]
        self.lookups_skipped += len(batch) - len(known) - len(ask)
        for start in range(0, len(ask), LOOKUP_CHUNK):
            chunk = ask[start : start + LOOKUP_CHUNK]
            customers = sorted({d.priced.event.customer_id for d in chunk})
            ids = [d.priced.event.id for d in chunk]
            known.update(await self.history.known_ids(customers, ids))
            self.ledger_lookups += 1
        return known
