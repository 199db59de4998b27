"""The admission script against a real redis-server, with time passed in (no sleeping)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from gateway_shim.admission import Admitter
from gateway_shim.keystore import KeyRecord, create_key, revoke_key
from quotameter.redis_keys import RedisKeys


async def test_gcra_admission_with_injected_time(redis_url: str, unique: str) -> None:
    names = RedisKeys(f"gcra{unique}")
    sync = redis.Redis.from_url(redis_url)
    new = create_key(sync, names, "clock", "free")
    key = KeyRecord(new.key_id, "clock", "free", revoked=False)
    client = aioredis.Redis.from_url(redis_url)
    try:
        admitter = Admitter(client, names)
        t0 = 1_700_000_000_000
        results = [await admitter.admit(key, 3, t0 + i) for i in range(4)]
        assert [(r.admitted, r.remaining) for r in results] == [(True, 2), (True, 1), (True, 0), (False, 0)]
        assert results[3].retry_after_ms == 20_000 - 3  # one slot per 20 s, from the first request
        assert not (await admitter.admit(key, 3, t0 + 19_999)).admitted
        assert (await admitter.admit(key, 3, t0 + 20_000)).admitted
        after_idle = await admitter.admit(key, 3, t0 + 10 * 60_000)
        assert after_idle.admitted and after_idle.remaining == 2  # a full bucket again
        unlimited = await admitter.admit(key, None, t0)
        assert unlimited.admitted and unlimited.headers() == {}
        revoke_key(sync, names, new.key_id)
        assert (await admitter.admit(key, 3, t0 + 20 * 60_000)).revoked
    finally:
        sync.close()
        await client.aclose()
