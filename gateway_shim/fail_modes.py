"""Admission while Redis is away: each tier's fail modes.

After a failed call, Redis is skipped for ``REDIS_RETRY_S`` (no request waits
on a dead connection); meanwhile a tier whose limits fail closed refuses, and
one that fails open is held to the in-process limiter (local_limiter.py),
whose period quotas start from the last usage Redis reported here (``saw``).
Decisions are counted for /healthz and logged at most once a second.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import redis.exceptions

from gateway_shim import telemetry
from gateway_shim.admission import Admission, Estimate
from gateway_shim.errors import BackendBusy, BackendUnavailable
from gateway_shim.keystore import KeyRecord
from gateway_shim.local_limiter import LocalLimiter
from gateway_shim.metering import RequestMeter
from quotameter.events import Decision
from quotameter.policy import EndUser, Policy
from quotameter.redis_pool import RedisPoolExhausted

log = logging.getLogger("gateway_shim.fail_modes")

REDIS_RETRY_S = 1.0  # after a failure, skip Redis (fail mode) this long before trying again
# Redis unreachable (not a script error, which is a bug and answered 500). A pool
# whose connections all stayed busy (RedisPoolExhausted) is not among them: Redis is up.
REDIS_DOWN = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class FailModes:
    def __init__(self) -> None:
        self.local = LocalLimiter()
        self.decisions: Counter[str] = Counter()
        self.busy_refusals = 0
        self._down_until = 0.0
        self._outage = False  # Redis failed since it last answered
        self._last_log = 0.0
        self._last_busy_log = 0.0

    @property
    def redis_down(self) -> bool:
        return time.monotonic() < self._down_until

    def redis_failed(self) -> None:
        self._down_until = time.monotonic() + REDIS_RETRY_S
        self._outage = True

    def saw(self, customer: str, period: str, admission: Admission) -> None:
        """Redis answered an admission: keep the usage it reported, the start of
        the local count should Redis go away."""
        if self._outage:
            self._outage = False
            self.local.recovered()
        if admission.policy.reserves and not admission.revoked:
            self.local.saw(customer, period, admission.tokens_used, admission.micro_usd_used)

    def admit(
        self, key: KeyRecord, policy: Policy, event_id: str, now_ms: int, estimate: Estimate, meter: RequestMeter,
        user: EndUser | None = None, period: tuple[str, int] = ("", 0),
    ) -> Admission:
        """The decision without Redis: BackendUnavailable if a limit fails closed.
        ``period``: the billing period's name and end (ms)."""
        closed = policy.fail_closed_kinds()
        if closed:
            telemetry.fail_mode("closed", ",".join(sorted(k.value for k in closed)))
            self._count("closed_refused", key, policy)
            meter.decision, meter.reason = Decision.REFUSED, "redis_unavailable"
            raise BackendUnavailable(
                f"The quota service is unreachable and the {policy.tier_name.capitalize()} tier's "
                f"{', '.join(k.value for k in closed)} limits fail closed. Please retry shortly."
            )
        admission = self.local.admit(key, policy, event_id, now_ms, estimate, user, period)
        telemetry.fail_mode("open", "" if admission.admitted else admission.reason.kind.value)
        self._count("open_admitted" if admission.admitted else "open_refused", key, policy)
        if admission.admitted:
            meter.reason = "fail_open"
        return admission

    def busy(self, exc: RedisPoolExhausted) -> BackendBusy:
        """The answer while Redis is up but no pooled connection freed up in time."""
        self.busy_refusals += 1
        now = time.monotonic()
        if now - self._last_busy_log >= 1.0:
            self._last_busy_log = now
            log.warning("Redis pool exhausted (%s; %d refused so far): raise services.redis_max_connections",
                        exc, self.busy_refusals)
        return BackendBusy("The quota service is busy. Please retry shortly.")

    def _count(self, outcome: str, key: KeyRecord, policy: Policy) -> None:
        self.decisions[outcome] += 1
        now = time.monotonic()
        if now - self._last_log >= 1.0 or self.decisions[outcome] == 1:
            self._last_log = now
            log.warning(
                "Redis unreachable: fail-%s decision for customer %s (tier %s); so far %s",
                outcome.replace("_", " "), key.customer, policy.tier_name, dict(self.decisions),
            )
