"""The in-process limiter that stands in while Redis is unreachable (fail open).

It enforces what one process can: requests/min and tokens/min (GCRA, the same
arithmetic as the Lua script) and requests in flight, per customer and scope,
counted by this process alone; an end user's per-minute limits too, with
state per (customer, end user digest). Period quotas and budgets cannot be
judged without the totals, nor an end user's day quota without its counter:
when their mode is open they are not checked meanwhile (and the usage still
reaches the pipeline). Every decision made here is
counted by the caller and logged.
"""

from __future__ import annotations

from collections import defaultdict

from gateway_shim.admission import Admission, Estimate, Reason, rule_cost
from gateway_shim.keystore import KeyRecord
from quotameter.policy import EndUser, Policy

_MAX_STATES = 100_000


class LocalLimiter:
    def __init__(self) -> None:
        self._tat: dict[tuple[str, str, str], float] = {}
        self._in_flight: dict[tuple[str, str], set[str]] = defaultdict(set)

    def admit(
        self, key: KeyRecord, policy: Policy, event_id: str, now_ms: int, estimate: Estimate,
        user: EndUser | None = None,
    ) -> Admission:
        status, reason, retry, rule_index = True, Reason.NONE, 0, 0
        in_flight = []
        for i, rule in enumerate(policy.concurrency, 1):
            count = len(self._in_flight[(key.customer, rule.scope)])
            in_flight.append(count)
            if count >= rule.limit and status:
                status, reason, retry, rule_index = False, Reason.CONCURRENCY, 1000, i
        rates: list[tuple[int, int]] = []
        writes: list[tuple[tuple[str, str, str], float]] = []
        rules = policy.rates if user is None else (*policy.rates, *user.rates)
        for i, rule in enumerate(rules, 1):
            cost = rule_cost(rule, estimate.input_tokens, estimate.output_tokens)
            interval = rule.window_ms / rule.limit
            state = (key.customer, rule.unit.value, rule.scope)
            tat = max(self._tat.get(state, now_ms), now_ms)
            new_tat = tat + cost * interval
            allow_at = new_tat - rule.window_ms
            if cost > rule.limit or now_ms < allow_at:
                wait = -1 if cost > rule.limit else int(allow_at - now_ms) + 1
                if status or wait > retry:
                    reason = Reason.TOO_LARGE if wait < 0 else (Reason.REQUESTS if cost == 1 and rule.unit.value == "requests" else Reason.TOKENS)
                    if i > len(policy.rates):  # the end user's
                        reason = Reason.USER_REQUESTS if reason is Reason.REQUESTS else Reason.USER_TOKENS
                    retry, rule_index = wait, i
                status = False
                rates.append((int((now_ms - (tat - rule.window_ms)) // interval), int(tat - now_ms)))
            else:
                writes.append((state, new_tat))
                rates.append((int((now_ms - allow_at) // interval), int(new_tat - now_ms)))
        if status:
            if len(self._tat) > _MAX_STATES:
                self._tat.clear()
            for state, value in writes:
                self._tat[state] = value
            for rule in policy.concurrency:
                self._in_flight[(key.customer, rule.scope)].add(event_id)
            in_flight = [c + 1 for c in in_flight]
        return Admission(
            admitted=status,
            revoked=False,
            reason=reason,
            retry_after_ms=retry,
            fallback=False,
            output_tokens=estimate.output_tokens,
            rule=rule_index,
            tokens_used=0,
            micro_usd_used=0,
            in_flight=tuple(in_flight),
            rates=tuple(rates),
            policy=policy,
            local=True,
            user=user,
        )

    def release(self, key: KeyRecord, policy: Policy, event_id: str) -> None:
        for rule in policy.concurrency:
            slots = self._in_flight.get((key.customer, rule.scope))
            if slots is not None:
                slots.discard(event_id)
