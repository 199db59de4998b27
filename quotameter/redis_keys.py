"""Names of everything quotameter keeps in Redis, in one place.

    {p}:key:{key_id}              hash  customer, tier, salt, hash, created_at, revoked
    {p}:customer:{customer}       hash  tier
    {p}:rl:rpm:{customer}         str   GCRA theoretical arrival time (ms) for requests/min
    {p}:usage:{customer}:{period} hash  the pipeline's period totals (authoritative):
                                        requests, input_tokens, output_tokens,
                                        cached_tokens, reasoning_tokens, cost_usd,
                                        events, updated_ms

Customer ids are wrapped in braces ({…}) so one customer's keys share a
Redis Cluster hash slot and a Lua script may touch them together.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "qm"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}:key:{key_id}"

    def customer(self, customer: str) -> str:
        return f"{self.prefix}:customer:{{{customer}}}"

    def requests_per_minute(self, customer: str) -> str:
        return f"{self.prefix}:rl:rpm:{{{customer}}}"

    def usage(self, customer: str, period: str) -> str:
        return f"{self.prefix}:usage:{{{customer}}}:{period}"

    def usage_pattern(self, period: str) -> str:
        return f"{self.prefix}:usage:*:{period}"


USAGE_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "events",
)
