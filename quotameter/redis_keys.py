"""Names of everything quotameter keeps in Redis, in one place.

    {p}:key:{key_id}              hash  customer, tier, salt, hash, created_at, revoked
    {p}:customer:{customer}       hash  tier
    {p}:revoked:{customer}        hash  key id -> "1" revoked, "0" live: the keys' revoked
                                        flags again, in the customer's slot, where the
                                        admission script reads them (see below)
    {p}:rl:rpm:{customer}         str   GCRA theoretical arrival time (ms) for requests/min
    {p}:rl:{rpm|tpm}[:sw]:{customer}[:{scope}]  rate state of one rule: GCRA TAT (str), or a
                                        sliding-window hash (s window start ms,
                                        c current count, p previous count); scope
                                        "key:<id>", "model:<name>" or "user:<digest>"
                                        for key, per-model and per-user limits
    {p}:inflight:{customer}[:{scope}] zset  event id -> expiry ms: requests in flight
    {p}:user_tokens:{customer}:{digest}:{day}  str  one end user's tokens of a day
                                        (per_user.tokens_per_day): reservations and
                                        settled usage; expires at the day's end (or
                                        when its last reservation would)
    {p}:usage:{customer}:{period} hash  the pipeline's period totals (authoritative):
                                        requests, input_tokens, output_tokens,
                                        cached_tokens, reasoning_tokens, cost_usd
                                        (exact Decimal text), cost_micro_usd (the
                                        same, rounded up to an integer, for Lua),
                                        events, refused, updated_ms

    {p}:ledgered:{spool}:{block}  bitmap  which events of one shim's spool the ledger
                                        holds (quotameter/delivery.py); set by the
                                        worker, read and trimmed by that shim

    {p}:alert:{customer}:{period}:{kind}:{pct}  str  one fired usage alert (JSON: the
                                        alert and its delivery state); SET NX
                                        claims the firing, so it happens once
                                        across workers and restarts

    {p}:running:{customer}        zset  event id -> reservation expiry ms: requests of a
                                        tier with a batch queue still running on any
                                        shim (their reservations may settle lower)
    {p}:batchq:{customer}         zset  the customer's batch requests waiting on every
                                        shim, in arrival order ("deadline ms:shim:n"
                                        scored by {p}:batchq_seq:{customer})
    {p}:batchq_wake               channel  a customer id, published when one of its
                                        requests settles or leaves the batch queue

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

    {p}:check:{customer}:{event id}  str  an admission of the check endpoint not
                                           settled yet: what its settle needs (JSON,
                                           gateway_shim/check_tickets.py), taken by
                                           the usage report of that id; expires
                                           with the reservation

The shim reserves (adds an entry), settles (replaces it with the true usage,
before it emits the event), and the pipeline, in the same atomic step that
writes a customer's totals, removes the entries of the event ids those totals
now include. Admission compares totals + reserved with the quota and budget.

End users never name a key: only the digest of their id does (its 32 hex
characters, quotameter.policy.end_user_digest), so a customer-supplied string
cannot shape a key, and every per-user key expires by itself.

Customer ids are wrapped in braces ({…}) so one customer's keys share a
Redis Cluster hash slot and a Lua script may touch them together. The API
key's own hash is found by key id alone (the presented key names no
customer), so it lives in a slot of its own; its revoked flag is mirrored
into ``{p}:revoked:{customer}`` by ``keys create`` and ``keys revoke``.
A key created before the mirror existed has no entry there: the first
admission of it copies the flag over (gateway_shim/admission.py).

Redis Cluster spreads customers over its primaries, so listings (``keys
list``, exports, alerts) scan every primary (redis-py's cluster SCAN).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RedisKeys:
    prefix: str = "qm"

    def api_key(self, key_id: str) -> str:
        return f"{self.prefix}:key:{key_id}"

    def revoked(self, customer: str) -> str:
        return f"{self.prefix}:revoked:{{{customer}}}"

    def customer(self, customer: str) -> str:
        return f"{self.prefix}:customer:{{{customer}}}"

    def requests_per_minute(self, customer: str) -> str:
        return f"{self.prefix}:rl:rpm:{{{customer}}}"

    def rate(self, customer: str, unit: str, scope: str = "", sliding: bool = False) -> str:
        # A sliding window's state is a hash, GCRA's a string: separate names,
        # so changing a tier's algorithm never meets the other's state.
        if unit == "requests" and not scope and not sliding:
            return self.requests_per_minute(customer)
        short = ("rpm" if unit == "requests" else "tpm") + (":sw" if sliding else "")
        return f"{self.prefix}:rl:{short}:{{{customer}}}" + (f":{scope}" if scope else "")

    def in_flight(self, customer: str, scope: str = "") -> str:
        return f"{self.prefix}:inflight:{{{customer}}}" + (f":{scope}" if scope else "")

    def user_day_tokens(self, customer: str, digest: str, day: str) -> str:
        return f"{self.prefix}:user_tokens:{{{customer}}}:{digest}:{day}"

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

    def check_ticket(self, customer: str, event_id: str) -> str:
        return f"{self.prefix}:check:{{{customer}}}:{event_id}"

    def ledgered(self, spool_id: str, block: int) -> str:
        return f"{self.prefix}:ledgered:{spool_id}:{block}"

    def alert(self, customer: str, period: str, kind: str, threshold_pct: int) -> str:
        return f"{self.prefix}:alert:{{{customer}}}:{period}:{kind}:{threshold_pct}"

    def alert_pattern(self, customer: str | None = None, period: str | None = None) -> str:
        """A SCAN pattern of the alert keys of one customer and/or period (None = any)."""
        who = "*" if customer is None else "{" + _glob_escape(customer) + "}"
        return f"{self.prefix}:alert:{who}:{'*' if period is None else _glob_escape(period)}:*"

    def running(self, customer: str) -> str:
        return f"{self.prefix}:running:{{{customer}}}"

    def batch_line(self, customer: str) -> str:
        return f"{self.prefix}:batchq:{{{customer}}}"

    def batch_seq(self, customer: str) -> str:
        return f"{self.prefix}:batchq_seq:{{{customer}}}"

    def batch_wake(self) -> str:
        return f"{self.prefix}:batchq_wake"


def _glob_escape(text: str) -> str:
    return "".join("\\" + char if char in "*?[]\\" else char for char in text)


USAGE_FIELDS = (
    "requests",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
    "cost_micro_usd",
    "events",
)
