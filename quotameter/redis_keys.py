"""Names of everything quotameter keeps in Redis, in one place.

    {p}:key:{key_id}              hash  customer, tier, salt, hash, created_at, revoked
    {p}:customer:{customer}       hash  tier
    {p}:rl:rpm:{customer}         str   GCRA theoretical arrival time (ms) for requests/min
    {p}:usage:{customer}:{period} hash  the pipeline's period totals (authoritative):
                                        requests, input_tokens, output_tokens,
                                        cached_tokens, reasoning_tokens, cost_usd
                                        (exact Decimal text), cost_micro_usd (the
                                        same, rounded up to an integer, for Lua),
                                        events, refused, updated_ms

Reservations cover the lag between the shim's admission and the pipeline's
totals. Per customer and period:

    {p}:pending:{customer}:{period}  hash  event id -> "tokens:micro_usd" still
                                           outside the pipeline's totals: the
                                           worst-case estimate while the request
                                           runs, the true usage once settled
    {p}:pending_exp:{customer}:{period} zset  event id scored by expiry (ms); an
                                           expired entry (a request that never
                                           finished) is dropped by the next
                                           admission
    {p}:reserved:{customer}:{period} hash  tokens, micro_usd: the running sum of
                                           the pending entries

The shim reserves (adds an entry), settles (replaces it with the true usage,
before it emits the event), and the pipeline, in the same atomic step that
writes a customer's totals, removes the entries of the event ids those totals
now include. Admission compares totals + reserved with the quota and budget.

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

    def pending(self, customer: str, period: str) -> str:
        return f"{self.prefix}:pending:{{{customer}}}:{period}"

    def pending_expiry(self, customer: str, period: str) -> str:
        return f"{self.prefix}:pending_exp:{{{customer}}}:{period}"

    def reserved(self, customer: str, period: str) -> str:
        return f"{self.prefix}:reserved:{{{customer}}}:{period}"


USAGE_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "events",
)
