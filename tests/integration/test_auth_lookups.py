"""The authenticator against a real Redis: a burst on keys not cached yet
reads each key's record once, however many requests carry it."""

from __future__ import annotations

import asyncio

import pytest
import redis

from gateway_shim.auth import Authenticator
from gateway_shim.errors import InvalidApiKey
from gateway_shim.keystore import create_key
from quotameter.config import Services
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import redis_client


def _hgetall_calls(client: redis.Redis) -> int:
    return int(client.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


async def test_concurrent_misses_of_a_key_share_one_lookup(redis_url: str, unique: str) -> None:
    names = RedisKeys(f"qm{unique}")
    sync = redis.Redis.from_url(redis_url)
    keys = [create_key(sync, names, "crowd", "pro").plaintext for _ in range(2)]
    client = redis_client(Services(redis_url=redis_url))
    auth = Authenticator(client, names)
    try:
        before = _hgetall_calls(sync)
        records = await asyncio.gather(*(auth.authenticate(f"Bearer {keys[i % 2]}") for i in range(200)))
        assert _hgetall_calls(sync) - before == 2
        assert {r.key_id for r in records} == {k.split("_")[1] for k in keys}
        with pytest.raises(InvalidApiKey):  # a wrong secret is refused, not taken from the shared lookup
            await auth.authenticate(f"Bearer {keys[0][:-2]}xx")
    finally:
        await client.aclose()
        sync.close()
