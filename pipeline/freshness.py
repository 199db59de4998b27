"""How fresh the worker's outputs are: event time → written, per sink.

A bounded sample of the latest delays (ms) per sink, for p50 / p99 in
``GET /stats`` and the benchmark.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

SAMPLES = 200_000


class Freshness:
    def __init__(self, clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000) -> None:
        self.clock_ms = clock_ms
        self.delays: dict[str, deque[int]] = {}

    def observe(self, sink: str, event_times_ms: Iterable[int], now: int | None = None) -> None:
        now = self.clock_ms() if now is None else now
        delays = self.delays.setdefault(sink, deque(maxlen=SAMPLES))
        delays.extend(now - t for t in event_times_ms)

    def reset(self) -> None:
        self.delays.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        out = {}
        for sink, delays in self.delays.items():
            ordered = sorted(delays)
            if ordered:
                out[sink] = {
                    "n": len(ordered),
                    "p50_ms": ordered[len(ordered) // 2],
                    "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                }
        return out
