"""The quota race bench/admission_bench.py reports, asserted: 100 callers
racing through the real admission script on a real Redis never reserve a
token past the quota, and stop only when the rest would not fit."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from bench.admission_race import quota_race
from gateway_shim.keystore import KeyRecord, create_key
from quotameter.redis_keys import RedisKeys


async def test_hundred_callers_fill_the_quota_and_never_pass_it(redis_url: str, unique: str) -> None:
    names = RedisKeys(f"race-{unique}")
    with redis.Redis.from_url(redis_url) as setup:
        new = create_key(setup, names, f"racer-{unique}", "race")
    key = KeyRecord(new.key_id, f"racer-{unique}", "race", False)
    client = aioredis.Redis.from_url(redis_url, max_connections=128)
    try:
        race = await quota_race(client, names, key, quota=100_000, callers=100, attempts=30)
    finally:
        await client.aclose()

    # 3,000 requests asking ~650k tokens for a 100k quota: the race is real.
    assert race.admitted + race.refused == 3000
    assert race.admitted > 100 and race.refused > 100, race.summary()
    assert race.other_refusals == 0, race.summary()
    # Zero overshoot, and Redis holds exactly what was admitted.
    assert race.reserved_tokens == race.admitted_tokens, race.summary()
    assert race.reserved_tokens <= race.quota, race.summary()
    # Reservations only grow, so what is left now was left at every refusal:
    # no request was refused that would have fitted.
    assert race.quota - race.reserved_tokens < race.smallest_refused, race.summary()
