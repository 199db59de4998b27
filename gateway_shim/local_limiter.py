"""The in-process limiter that stands in while Redis is unreachable (fail open).

It enforces what one process can: requests/min and tokens/min (GCRA, the same
arithmetic as the Lua script) and requests in flight, per customer and scope,
counted by this process alone; an end user's per-minute limits too, with
state per (customer, end user digest). Period token quotas and budgets are
judged from the last usage Redis reported to this process (per customer and
period: totals + reservations, as the admission script returned them) plus
what this process admitted since Redis went away, reserved at the worst case
and settled to the true usage. Other replicas admit from their own views
meanwhile, so the customer can go over by up to what each replica had left
(README, "Fail modes"). A customer this process never saw starts from zero.
An end user's day quota is not checked meanwhile. When Redis answers again
the local counts are dropped: the events of those requests reach the
pipeline, whose totals then hold them. Every decision made here is counted
by the caller and logged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from decimal import Decimal

from gateway_shim.admission import Admission, Estimate, Reason, rule_cost
from gateway_shim.keystore import KeyRecord
from quotameter.policy import EndUser, Policy

_MAX_STATES = 100_000


class LocalLimiter:
    def __init__(self) -> None:
        self._tat: dict[tuple[str, str, str], float] = {}
        self._in_flight: dict[tuple[str, str], set[str]] = defaultdict(set)
        # (customer, period) -> [tokens, micro-USD]: the last usage Redis reported,
        # and what this process admitted (reservations, then true usage) since.
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}
        self._local: dict[tuple[str, str], list[int]] = {}
        self._held: dict[str, tuple[tuple[str, str], int, int]] = {}  # event id -> (state, tokens, micro)

    def saw(self, customer: str, period: str, tokens_used: int, micro_usd_used: int) -> None:
        """The customer's period usage as Redis reported it with an admission."""
        if len(self._seen) > _MAX_STATES:
            self._seen.clear()
        self._seen[(customer, period)] = (tokens_used, micro_usd_used)

    def recovered(self) -> None:
        """Redis answers again: its totals (through the pipeline) take over the local counts."""
        self._local.clear()
        self._held.clear()

    def admit(
        self, key: KeyRecord, policy: Policy, event_id: str, now_ms: int, estimate: Estimate,
        user: EndUser | None = None, period: tuple[str, int] = ("", 0),
    ) -> Admission:
        """``period``: the billing period's name and end (ms), for its quota and budget."""
        status, reason, retry, rule_index = True, Reason.NONE, 0, 0
        in_period = (key.customer, period[0])
        seen, local = self._seen.get(in_period, (0, 0)), self._local.get(in_period, (0, 0))
        used_tokens, used_micro = seen[0] + local[0], seen[1] + local[1]
        tokens = estimate.input_tokens + estimate.output_tokens
        micro = estimate.input_micro_usd + math.ceil(estimate.output_tokens * Decimal(estimate.output_rate))
        if policy.period_tokens is not None and used_tokens + tokens > policy.period_tokens:
            status, reason, retry = False, Reason.QUOTA_TOKENS, period[1] - now_ms
        elif policy.period_budget_micro_usd is not None and used_micro + micro > policy.period_budget_micro_usd:
            status, reason, retry = False, Reason.QUOTA_BUDGET, period[1] - now_ms
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
            if policy.reserves:
                counted = self._local.setdefault(in_period, [0, 0])
                counted[0] += tokens
                counted[1] += micro
                self._held[event_id] = (in_period, tokens, micro)
                used_tokens, used_micro = used_tokens + tokens, used_micro + micro
        return Admission(
            admitted=status,
            revoked=False,
            reason=reason,
            retry_after_ms=retry,
            fallback=False,
            output_tokens=estimate.output_tokens,
            rule=rule_index,
            tokens_used=used_tokens,
            micro_usd_used=used_micro,
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

    def settle(self, event_id: str, tokens: int, micro_usd: int) -> None:
        """A request admitted here ended: its reservation becomes its true usage."""
        held = self._held.pop(event_id, None)
        if held is None:
            return  # Redis came back meanwhile: the pipeline counts it
        in_period, reserved_tokens, reserved_micro = held
        counted = self._local.get(in_period)
        if counted is not None:
            counted[0] += tokens - reserved_tokens
            counted[1] += micro_usd - reserved_micro
