"""A bounded, fair wait for batch-priority keys, instead of a 429.

Only batch requests ever enter it; interactive requests go straight to
admission and never wait behind one (and a tier can keep concurrency slots
that batch traffic may not take at all). Each customer waits in its own FIFO
line: only the head of a line asks Redis again, when its limit says it could
pass, or sooner when one of the customer's requests ends (in this process, or
on another shim: shared_queue.py, which also keeps the line's order across
shims).
Limits are per customer, so one customer's backlog never delays another's;
the depth is shared, and no customer may hold more than an equal share of it
while others are waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

from gateway_shim.errors import QueueRefused

POLL_CAP_S = 0.25  # a head re-asks at least this often (slots freed by other shims)


class _Line:
    def __init__(self) -> None:
        self.waiting: deque[object] = deque()
        self.turn = asyncio.Event()  # the head may try again
        self.changed = asyncio.Event()  # a request of the customer ended here


class BatchQueue:
    def __init__(self) -> None:
        self._lines: dict[str, _Line] = {}
        self.depth = 0
        self.admitted = 0
        self.refused_full = 0
        self.timed_out = 0

    def status(self) -> dict[str, int]:
        return {"depth": self.depth, "admitted": self.admitted, "full": self.refused_full, "timed_out": self.timed_out}

    def enter(self, customer: str, max_depth: int) -> Ticket:
        line = self._lines.get(customer)
        held = len(line.waiting) if line else 0
        others = sum(1 for c, l in self._lines.items() if c != customer and l.waiting)
        fair_share = max(1, max_depth // (others + 1))
        if self.depth >= max_depth or held >= fair_share:
            self.refused_full += 1
            raise QueueRefused("queue_full", f"The batch queue is full ({max_depth} waiting).")
        if line is None:
            line = self._lines[customer] = _Line()
        ticket = Ticket(self, customer, line)
        line.waiting.append(ticket)
        self.depth += 1
        if len(line.waiting) == 1:
            line.turn.set()
        return ticket

    def released(self, customer: str) -> None:
        """A request of ``customer`` ended in this process: its head may pass now."""
        line = self._lines.get(customer)
        if line is not None and line.waiting:
            line.changed.set()

    def _leave(self, ticket: Ticket) -> None:
        line = ticket.line
        try:
            line.waiting.remove(ticket)
            self.depth -= 1
        except ValueError:
            return
        if line.waiting:
            line.turn.set()  # the next in line
        elif self._lines.get(ticket.customer) is line:
            del self._lines[ticket.customer]


class Ticket:
    def __init__(self, queue: BatchQueue, customer: str, line: _Line) -> None:
        self.queue = queue
        self.customer = customer
        self.line = line
        self.entered = time.monotonic()

    @property
    def waited_ms(self) -> float:
        return (time.monotonic() - self.entered) * 1000

    async def next_try(self, retry_after_ms: int, deadline: float) -> bool:
        """Wait until this ticket may ask again; False once past the deadline."""
        while self.line.waiting and self.line.waiting[0] is not self:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.line.turn.clear()
            try:
                await asyncio.wait_for(self.line.turn.wait(), left)
            except TimeoutError:
                return False
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        pause = min(max(retry_after_ms, 1) / 1000, POLL_CAP_S, left)
        self.line.changed.clear()
        try:
            await asyncio.wait_for(self.line.changed.wait(), pause)
        except TimeoutError:
            pass
        return True

    def leave(self, admitted: bool) -> None:
        if admitted:
            self.queue.admitted += 1
        self.queue._leave(self)
