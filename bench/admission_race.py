"""Callers racing for one customer's token quota through the real admission
script: what bench/admission_bench.py reports, and what
tests/integration/test_admission_race_bench.py asserts (zero overshoot, and a
quota filled as far as the refused requests allow).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from gateway_shim.admission import Admitter, Estimate, Reason
from gateway_shim.keystore import KeyRecord
from quotameter.config import Tier
from quotameter.policy import resolve
from quotameter.redis_keys import RedisKeys

PERIOD = "2031-01"
PERIOD_END_MS = 4_000_000_000_000


@dataclass(frozen=True)
class RaceResult:
    quota: int
    callers: int
    admitted: int
    refused: int
    admitted_tokens: int  # the sum of the admitted requests' reserved worst cases
    reserved_tokens: int  # what Redis holds reserved for the period at the end
    smallest_refused: int  # the smallest worst case refused (0 when none was)
    other_refusals: int  # refusals for anything but the token quota

    @property
    def overshoot(self) -> int:
        return self.reserved_tokens - self.quota

    def summary(self) -> str:
        return (f"quota race: {self.callers} callers, quota {self.quota:,} tokens: {self.admitted} admitted, "
                f"{self.refused} refused; reserved {self.reserved_tokens:,} ({self.quota - self.reserved_tokens} "
                f"short of the quota, smallest refused request {self.smallest_refused}; {self.overshoot:+d} past it)")


def _estimate(caller: int, attempt: int) -> Estimate:
    """Worst cases that vary per caller and attempt, 6 to 420 tokens: small ones
    keep coming when the quota is nearly full, so a check that lets a request
    through past it gets its chance."""
    return Estimate(5 + caller % 17, 1 + (attempt * 37) % 400, 0, "0")


async def quota_race(client: aioredis.Redis, names: RedisKeys, key: KeyRecord, quota: int = 100_000,
                     callers: int = 100, attempts: int = 100) -> RaceResult:
    """``callers`` concurrent callers, ``attempts`` requests each, against a fresh
    ``quota``-token period of ``key``'s customer."""
    admitter = Admitter(client, names)
    policy = resolve("race", Tier(monthly_tokens=quota), "mock-small")
    admitted_tokens = admitted = refused = other = 0
    smallest_refused = 0

    async def caller(c: int) -> None:
        nonlocal admitted_tokens, admitted, refused, other, smallest_refused
        for i in range(attempts):
            estimate = _estimate(c, i)
            need = estimate.input_tokens + estimate.output_tokens
            result = await admitter.admit(key, policy, PERIOD, PERIOD_END_MS, f"race-{c}-{i}",
                                          int(time.time() * 1000), estimate, 600_000)
            if result.admitted:
                admitted += 1
                admitted_tokens += estimate.input_tokens + result.output_tokens
            else:
                refused += 1
                other += result.reason != Reason.QUOTA_TOKENS
                smallest_refused = need if not smallest_refused else min(smallest_refused, need)

    await asyncio.gather(*(caller(c) for c in range(callers)))
    reserved = int(await client.hget(names.reserved(key.customer, PERIOD), "tokens") or 0)
    return RaceResult(quota, callers, admitted, refused, admitted_tokens, reserved, smallest_refused, other)
