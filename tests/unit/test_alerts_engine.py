"""The engine's cheap path: no Redis round trip unless a new threshold may fire."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pipeline.alerts import AlertEngine
from quotameter.alert_rules import AlertLimits
from quotameter.redis_keys import RedisKeys

async def _done() -> bool:
    return True


LIMITS = AlertLimits(1000, Decimal("2"), (50, 100))


class RecordingRedis:
    """Counts round trips; every SET NX wins unless its key was set before."""

    def __init__(self) -> None:
        self.round_trips = 0
        self.keys: dict[str, Any] = {}

    def pipeline(self, transaction: bool = True) -> RecordingRedis:
        self._queued: list[tuple[str, Any]] = []
        return self

    def set(self, key: str, value: Any, nx: bool = False, ex: int | None = None, **kwargs: Any) -> Any:
        if not nx:  # the delivery state written back (awaited directly)
            self.keys[key] = value
            return _done()
        self._queued.append((key, value))
        return None

    async def execute(self) -> list[bool]:
        self.round_trips += 1
        results = []
        for key, value in self._queued:
            results.append(key not in self.keys)
            self.keys.setdefault(key, value)
        return results


async def test_observe_touches_redis_only_when_a_new_threshold_may_fire() -> None:
    client = RecordingRedis()
    engine = AlertEngine(client, RedisKeys("t"), lambda tier, customer: LIMITS)  # type: ignore[arg-type]
    await engine.observe("a", "2025-03", "pro", 499, Decimal(0))
    assert client.round_trips == 0
    await engine.observe("a", "2025-03", "pro", 500, Decimal(0))
    assert client.round_trips == 1 and engine.claimed == 1
    for tokens in (500, 700, 999):
        await engine.observe("a", "2025-03", "pro", tokens, Decimal("0.5"))
    assert client.round_trips == 1  # remembered in-process
    await engine.observe("a", "2025-03", "pro", 1000, Decimal("1"))  # tokens 100 % and budget 50 % at once
    assert client.round_trips == 2 and engine.claimed == 3
    await engine.close()


async def test_a_restarted_engine_asks_redis_once_and_wins_nothing() -> None:
    client = RecordingRedis()
    first = AlertEngine(client, RedisKeys("t"), lambda tier, customer: LIMITS)  # type: ignore[arg-type]
    await first.observe("a", "2025-03", "pro", 1000, Decimal(0))
    await first.close()
    second = AlertEngine(client, RedisKeys("t"), lambda tier, customer: LIMITS)  # type: ignore[arg-type]
    await second.observe("a", "2025-03", "pro", 1000, Decimal(0))
    await second.observe("a", "2025-03", "pro", 1000, Decimal(0))
    assert second.claimed == 0 and client.round_trips == 2
    await second.close()


async def test_silent_limits_never_touch_redis() -> None:
    client = RecordingRedis()
    engine = AlertEngine(client, RedisKeys("t"), lambda tier, customer: AlertLimits(None, None, (50,)))  # type: ignore[arg-type]
    await engine.observe("a", "2025-03", None, 10**9, Decimal(10**6))
    assert client.round_trips == 0
    await engine.close()
