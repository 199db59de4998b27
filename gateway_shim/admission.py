"""Admission: one Lua script, one Redis round trip per request.

Today it enforces the tier's requests/min (GCRA, burst = the limit) and key
revocation. Tokens/min, concurrency and period quotas join the same script
later, each as one more key and argument, still one round trip.

Note for Redis Cluster: the script touches the key's hash and the customer's
limiter state, which live in different hash slots; it runs as is on a single
Redis (or a primary with replicas).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import redis.asyncio as aioredis

from gateway_shim.keystore import KeyRecord
from quotameter.redis_keys import RedisKeys

WINDOW_MS = 60_000
_SCRIPT = (Path(__file__).parent / "admission.lua").read_text()


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    revoked: bool
    limit: int | None  # None: the tier has no requests/min limit
    remaining: int
    retry_after_ms: int  # refused: the true time until a request would be admitted
    reset_ms: int  # time until the bucket is full again

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for requests (none when unlimited)."""
        if self.limit is None:
            return {}
        return {
            "x-ratelimit-limit-requests": str(self.limit),
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": format_duration(self.reset_ms),
        }


def format_duration(ms: int) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: ``20ms``, ``8.571s``, ``1m0s``."""
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


class Admitter:
    def __init__(self, client: aioredis.Redis, names: RedisKeys) -> None:
        self._names = names
        # register_script: EVALSHA, loading the script again after a Redis restart.
        self._script = client.register_script(_SCRIPT)

    async def admit(self, key: KeyRecord, requests_per_minute: int | None, now_ms: int) -> Admission:
        keys = [self._names.api_key(key.key_id), self._names.requests_per_minute(key.customer)]
        status, remaining, retry_after_ms, reset_ms = await self._script(
            keys=keys, args=[now_ms, requests_per_minute or 0, WINDOW_MS]
        )
        return Admission(
            admitted=status == 1,
            revoked=status == -1,
            limit=requests_per_minute,
            remaining=max(int(remaining), 0),
            retry_after_ms=int(retry_after_ms),
            reset_ms=int(reset_ms),
        )
