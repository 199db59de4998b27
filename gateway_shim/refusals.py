"""Customers already refused, remembered in-process until their reset, so a
blocked customer's retries cost no Redis call.

Only refusals that do not depend on the size of the next request are kept:
a requests/min rule (every request costs one), and a period quota or budget
with nothing left at all. A quota refusal is re-checked against Redis after
at most ``QUOTA_RECHECK_S`` (reservations settle lower than their worst
case, an operator may raise a limit), while its Retry-After still says when
the period resets.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

from gateway_shim.admission import Admission, Reason

QUOTA_RECHECK_S = 10.0
_MAX_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Remembered:
    admission: Admission
    until: float  # monotonic seconds: ask Redis again from then on
    retry_at: float  # monotonic seconds: when the customer would be admitted


class RefusalMemory:
    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Remembered] = {}
        self.hits = 0

    def __bool__(self) -> bool:
        """Whether any refusal is remembered (nothing to look up otherwise)."""
        return bool(self._entries)

    @staticmethod
    def scopes(customer: str, admission_policy_scopes: tuple[str, ...]) -> list[tuple[str, str]]:
        return [(customer, scope) for scope in admission_policy_scopes]

    def recall(self, customer: str, scopes: tuple[str, ...]) -> tuple[Admission, int] | None:
        """A remembered refusal for any of the request's scopes, with the ms left to wait."""
        if not self._entries:
            return None
        now = time.monotonic()
        for scope in scopes:
            entry = self._entries.get((customer, scope))
            if entry is None:
                continue
            if entry.until <= now:
                del self._entries[(customer, scope)]
                continue
            self.hits += 1
            return entry.admission, max(int((entry.retry_at - now) * 1000), 1)
        return None

    def remember(self, customer: str, admission: Admission) -> None:
        scope = memory_scope(admission)
        if scope is None or admission.retry_after_ms <= 0:
            return
        now = time.monotonic()
        retry_at = now + admission.retry_after_ms / 1000
        until = retry_at if admission.reason is Reason.REQUESTS else min(retry_at, now + QUOTA_RECHECK_S)
        if len(self._entries) >= _MAX_ENTRIES:
            self._entries.clear()
        if admission.user is not None:  # answered to every end user of the customer: the customer's state only
            admission = replace(admission, user=None, rates=admission.rates[:len(admission.policy.rates)],
                                user_tokens_used=0)
        self._entries[(customer, scope)] = Remembered(admission, until, retry_at)


def memory_scope(admission: Admission) -> str | None:
    """The scope a refusal holds for every request of the customer, or None."""
    policy = admission.policy
    if admission.reason is Reason.REQUESTS:
        rule = admission.refused_rule()
        return None if rule is None else f"rate:{rule.scope}"
    if admission.reason is Reason.QUOTA_TOKENS and policy.period_tokens is not None:
        return "quota" if admission.tokens_used >= policy.period_tokens else None
    if admission.reason is Reason.QUOTA_BUDGET and policy.period_budget_micro_usd is not None:
        exhausted = admission.micro_usd_used >= policy.period_budget_micro_usd
        return "quota" if exhausted and policy.fallback is None else None
    return None


def request_scopes(policy_rate_scopes: tuple[str, ...]) -> tuple[str, ...]:
    """The scopes to look up for a request: its requests/min rules and the quota."""
    return (*(f"rate:{scope}" for scope in policy_rate_scopes), "quota")
