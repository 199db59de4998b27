"""The quota-state script against a real redis-server: versioned absolute
totals, reservations released in the same step, retries after an outage."""

from __future__ import annotations

from decimal import Decimal

import redis
from redis.asyncio import Redis

from pipeline.redis_writer import UsageWriter
from quotameter.aggregate import Totals
from quotameter.redis_keys import RedisKeys


async def test_totals_are_versioned_and_release_the_reservations_they_include(redis_url: str, unique: str) -> None:
    keys = RedisKeys(f"qm{unique}")
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    pending, expiry, reserved = keys.pending("acme", "2025-01"), keys.pending_expiry("acme", "2025-01"), keys.reserved("acme", "2025-01")
    sync.hset(pending, mapping={"e1": "100:250", "e2": "40:90", "e9": "7:7"})
    sync.zadd(expiry, {"e1": 1, "e2": 1, "e9": 1})
    sync.hset(reserved, mapping={"tokens": 147, "micro_usd": 347})
    writer = UsageWriter(Redis.from_url(redis_url), keys, clock_ms=lambda: 7)
    newer = Totals(requests=2, input_tokens=140, cost_usd=Decimal("0.00034"), events=2)
    assert await writer.write({("acme", "2025-01"): newer}, {("acme", "2025-01"): ["e1", "e2"]})
    stored = sync.hgetall(keys.usage("acme", "2025-01"))
    assert (stored["requests"], stored["version"], stored["cost_micro_usd"]) == ("2", "2", "340")
    assert sync.hgetall(pending) == {"e9": "7:7"} and sync.zrange(expiry, 0, -1) == ["e9"]
    assert sync.hgetall(reserved) == {"tokens": "7", "micro_usd": "7"}
    # An older state (fewer events) never overwrites a newer one; the same state again is harmless.
    assert await writer.write({("acme", "2025-01"): Totals(requests=1, events=1)})
    assert await writer.write({("acme", "2025-01"): newer}, {("acme", "2025-01"): ["e1"]})
    assert sync.hget(keys.usage("acme", "2025-01"), "requests") == "2"
    assert sync.hgetall(reserved) == {"tokens": "7", "micro_usd": "7"}
    # force (rebuild-state --force) overwrites.
    assert await writer.write({("acme", "2025-01"): Totals(requests=1, events=1)}, force=True)
    assert sync.hget(keys.usage("acme", "2025-01"), "requests") == "1"
    await writer.close()


async def test_a_failed_write_is_retried_with_the_next_batch(redis_url: str, unique: str) -> None:
    keys = RedisKeys(f"qm{unique}")
    writer = UsageWriter(Redis.from_url("redis://127.0.0.1:1/0"), keys, clock_ms=lambda: 7)
    assert not await writer.write({("acme", "2025-01"): Totals(requests=1, events=1)})
    assert writer.pending == 1
    writer.client = Redis.from_url(redis_url)
    writer._script = writer.client.register_script(writer._script.script)
    assert await writer.write({("zeta", "2025-01"): Totals(requests=5, events=5)})
    assert writer.pending == 0
    sync = redis.Redis.from_url(redis_url, decode_responses=True)
    assert sync.hget(keys.usage("acme", "2025-01"), "requests") == "1"
    assert sync.hget(keys.usage("zeta", "2025-01"), "requests") == "5"
    await writer.close()
