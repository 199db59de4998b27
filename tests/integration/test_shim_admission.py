"""The admission and settle scripts against a real redis-server, with time passed in (no sleeping)."""

from __future__ import annotations

import redis
import redis.asyncio as aioredis

from gateway_shim.admission import Admitter, Estimate, Reason
from gateway_shim.keystore import KeyRecord, create_key, revoke_key
from quotameter.config import Tier
from quotameter.policy import resolve
from quotameter.redis_keys import RedisKeys

END = 4_000_000_000_000
NONE = Estimate(0, 0, 0, "0")


async def test_gcra_sliding_window_quota_and_expiry_with_injected_time(redis_url: str, unique: str) -> None:
    names = RedisKeys(f"gcra{unique}")
    sync = redis.Redis.from_url(redis_url)
    new = create_key(sync, names, "clock", "free")
    key = KeyRecord(new.key_id, "clock", "free", revoked=False)
    client = aioredis.Redis.from_url(redis_url)
    try:
        admitter = Admitter(client, names)
        t0 = 1_700_000_000_000
        gcra = resolve("free", Tier(requests_per_minute=3), None)

        async def admit(policy, now, estimate=NONE, event="e", period="p"):  # noqa: ANN001, ANN202
            return await admitter.admit(key, policy, period, END, event, now, estimate, 1000)

        results = [await admit(gcra, t0 + i) for i in range(4)]
        assert [(r.admitted, r.rates[0][0]) for r in results] == [(True, 2), (True, 1), (True, 0), (False, 0)]
        assert results[3].reason is Reason.REQUESTS and results[3].retry_after_ms == 20_000 - 3
        assert not (await admit(gcra, t0 + 19_999)).admitted
        assert (await admit(gcra, t0 + 20_000)).admitted
        after_idle = await admit(gcra, t0 + 10 * 60_000)
        assert after_idle.admitted and after_idle.rates[0][0] == 2  # a full bucket again

        # Sliding window: the previous minute counts by its overlap, no 2x at the boundary.
        sliding = resolve("s", Tier(requests_per_minute=2, rate_algorithm="sliding_window"), None)
        base = (t0 // 60_000 + 100) * 60_000
        assert [(await admit(sliding, base + 59_000 + i)).admitted for i in range(3)] == [True, True, False]
        at_boundary = await admit(sliding, base + 60_001)
        # The previous minute's two weigh 2 x (1 - elapsed / 60 s): a third fits once that is 1, 30 s in.
        assert not at_boundary.admitted and at_boundary.retry_after_ms == 90_000 - 60_001
        assert not (await admit(sliding, base + 89_999)).admitted
        assert (await admit(sliding, base + 90_000)).admitted

        # Quota: totals + reservations; an expired reservation stops counting.
        quota = resolve("q", Tier(monthly_tokens=100), None)
        first = await admit(quota, t0, Estimate(10, 50, 0, "0"), "r1", "2030-01")
        assert first.admitted and first.tokens_used == 60
        refused = await admit(quota, t0 + 1, Estimate(10, 50, 0, "0"), "r2", "2030-01")
        assert refused.reason is Reason.QUOTA_TOKENS and refused.retry_after_ms == END - t0 - 1
        assert (await admit(quota, t0 + 1001, Estimate(10, 50, 0, "0"), "r3", "2030-01")).admitted
        await admitter.settle(key, quota, "2030-01", "r3", t0 + 1002, reserved=(10, 50), used=(10, 5),
                              used_micro_usd=0, settled_ttl_ms=60_000)
        assert await client.hget(names.reserved("clock", "2030-01"), "tokens") == b"15"
        assert await client.hget(names.pending("clock", "2030-01"), "r3") == b"15:0"

        revoke_key(sync, names, new.key_id)
        assert (await admit(gcra, t0 + 20 * 60_000)).revoked
    finally:
        sync.close()
        await client.aclose()
