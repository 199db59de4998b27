"""Enforcement of one request: the policy that applies, admission (Redis, or
the fail modes while it is away: fail_modes.py), degradation (fallback model,
batch queue), and settlement after the response. The worst-case estimate and
prices are in estimates.py, the refusal texts in refusal_text.py.

The hot path costs one Redis round trip to admit and, only when the request
holds something (a reservation, a concurrency slot, a tokens/min charge),
one more to settle; a customer remembered as refused costs none.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime

from gateway_shim import refusal_text
from gateway_shim.admission import Admission, Admitter, Estimate, Reason
from gateway_shim.batch_queue import BatchQueue
from gateway_shim.end_users import day_of, end_user_limits
from gateway_shim.errors import (
    BackendBusy,
    BackendUnavailable,
    InvalidApiKey,
    QueueRefused,
    Refusal,
)
from gateway_shim.estimates import Estimator
from gateway_shim.fail_modes import REDIS_DOWN, FailModes
from gateway_shim.keystore import KeyRecord
from gateway_shim.metering import RequestMeter
from gateway_shim.ratelimit_headers import ratelimit_headers
from gateway_shim.refusals import RefusalMemory, request_scopes
from gateway_shim.routes import ProxiedRequest
from gateway_shim.shared_queue import SharedQueue
from quotameter.config import Config
from quotameter.events import Decision
from quotameter.policy import EndUser, Policy, resolve
from quotameter.redis_pool import RedisPoolExhausted

log = logging.getLogger("gateway_shim.enforcement")

# Refusals a batch request may wait out: rate and concurrency limits free up with
# time; a period quota or budget only while requests of the customer are in flight
# (on this shim, or on any shim sharing its Redis: shared_queue.py), whose worst-case
# reservations settle to the true usage, usually lower.
_TRANSIENT = (Reason.REQUESTS, Reason.TOKENS, Reason.CONCURRENCY, Reason.USER_REQUESTS, Reason.USER_TOKENS)
_QUOTA = (Reason.QUOTA_TOKENS, Reason.QUOTA_BUDGET, Reason.USER_QUOTA_TOKENS)


class KeyRevoked(InvalidApiKey):
    """The key was revoked after its record was cached."""


@dataclass(slots=True)
class Ticket:
    """An admitted request: what it holds until it is settled."""

    key: KeyRecord
    policy: Policy
    period: str
    event_id: str
    admission: Admission
    reserved: tuple[int, int]  # (input, output) tokens reserved
    model: str | None  # the model sent upstream (the fallback's, when degraded)
    user: EndUser | None = None  # the end user held to per-user limits
    day: str = ""  # the day the end user's day quota counted it in
    running: bool = False  # marked running in Redis, for batch waiters on other shims


class Enforcer:
    def __init__(self, config: Config, admitter: Admitter) -> None:
        self.config = config
        self.admitter = admitter
        self.estimator = Estimator(config)
        self.fail_modes = FailModes()
        self.refusals = RefusalMemory()
        self.queue = BatchQueue()
        self._policies: dict[tuple[str, str, str, str | None], Policy] = {}
        self._period: tuple[str, int, int, int] = ("", 0, 0, 0)  # name, start, end ms, length s
        self._day: tuple[str, int, int] = ("", 0, 0)  # name, start, end ms
        self._in_flight: Counter[str] = Counter()  # admitted, not yet settled, per customer
        self.replicas: SharedQueue | None = None  # the queue's state shared with other shims

    def status(self) -> dict[str, object]:
        return {
            "redis": "down" if self.fail_modes.redis_down else "up",
            "fail_mode_decisions": dict(self.fail_modes.decisions),
            "busy_refusals": self.fail_modes.busy_refusals,
            "remembered_refusals_served": self.refusals.hits,
            "queue": self.queue.status(),
        }

    # -- what applies -------------------------------------------------------

    def policy(self, key: KeyRecord, model: str | None) -> Policy:
        cache_key = (key.tier, key.customer, key.key_id if key.limits else "", model)
        policy = self._policies.get(cache_key)
        if policy is None:
            tier = self.config.tiers.get(key.tier)
            if tier is None:
                log.error("key %s has tier %r, which the config does not define", key.key_id, key.tier)
                raise BackendUnavailable(f"Your key's tier {key.tier!r} is not configured on this gateway.")
            customer = self.config.customers.get(key.customer)
            policy = resolve(key.tier, tier, model, customer, key.key_id, key.limits)
            if len(self._policies) > 50_000:
                self._policies.clear()
            self._policies[cache_key] = policy
        return policy

    def period(self, now_ms: int) -> tuple[str, int, int, int]:
        if not (self._period[1] <= now_ms < self._period[2]):
            calendar = self.config.billing.calendar
            name = calendar.period_of(datetime.fromtimestamp(now_ms / 1000, UTC))
            start_ms, end_ms = calendar.bounds_ms(name)
            self._period = (name, start_ms, end_ms, (end_ms - start_ms) // 1000)
        return self._period

    def day(self, now_ms: int) -> tuple[str, int, int]:
        """The day an end user's day quota counts (billing.timezone): name, start, end ms."""
        if not (self._day[1] <= now_ms < self._day[2]):
            self._day = day_of(self.config.billing.timezone, now_ms)
        return self._day

    def estimate(self, policy: Policy, proxied: ProxiedRequest, streams: bool) -> tuple[Estimate, bool]:
        """The request's worst case, and whether it named its own max_tokens."""
        return self.estimator.estimate(policy, proxied, streams)

    # -- admission ----------------------------------------------------------

    async def admit(
        self,
        key: KeyRecord,
        policy: Policy,
        proxied: ProxiedRequest,
        estimate: Estimate,
        meter: RequestMeter,
        headers: dict[str, str],
        end_user: str | None = None,
    ) -> Ticket:
        """Admit the request or raise the refusal; ``headers`` gets the rate-limit headers.
        ``end_user``: who the request is for (attribution.py), held to the tier's per_user limits."""
        if proxied.body is not None and proxied.model is not None and not policy.model_allowed(proxied.model):
            meter.decision, meter.reason = Decision.REFUSED, "model_not_allowed"
            raise refusal_text.model_not_allowed(policy, proxied.model)
        # A request without a body (malformed, or a route that takes none) names no end user to require.
        user = end_user_limits(policy, end_user, meter) if proxied.body is not None or end_user else None
        queued = key.batch and policy.queue is not None
        if not queued and self.refusals:
            recalled = self.refusals.recall(key.customer, request_scopes(_request_rule_scopes(policy)))
            if recalled is not None:
                admission, wait_ms = recalled
                if estimate.bounded:  # the refusal names what the request needs
                    estimate = self.estimator.counted(estimate, policy, proxied)
                headers.update(self._headers(admission, int(time.time() * 1000)))
                raise self._refusal(admission, wait_ms, estimate, meter)
        admission = await self._decide(key, policy, meter.event_id, estimate, meter, batch=queued, user=user)
        if admission.revoked:
            raise KeyRevoked("revoked")
        if estimate.bounded and (admission.reason in _TOKEN_REASONS or admission.fallback
                                 or admission.output_tokens < estimate.output_tokens):
            # The prompt's size did not fit (estimates.py): count it, and ask with the count.
            if admission.admitted:
                await self._release(key, policy, meter.event_id, estimate, admission, user)
            estimate = self.estimator.counted(estimate, policy, proxied)
            admission = await self._decide(key, policy, meter.event_id, estimate, meter, batch=queued, user=user)
            if admission.revoked:
                raise KeyRevoked("revoked")
        if not admission.admitted and queued and await self._may_free(key, admission):
            admission = await self._wait_in_queue(key, policy, estimate, meter, admission, user)
        headers.update(self._headers(admission, int(time.time() * 1000)))
        if not admission.admitted:
            if not queued and not admission.local:
                self.refusals.remember(key.customer, admission)
            raise self._refusal(admission, admission.retry_after_ms, estimate, meter)
        model = proxied.model
        if admission.fallback and policy.fallback is not None:
            model = policy.fallback.model
            meter.reason = "fallback"
        elif admission.output_tokens < estimate.output_tokens:
            meter.reason = "budget_cut"
        self._in_flight[key.customer] += 1
        now_ms = int(time.time() * 1000)
        return Ticket(key, policy, self.period(now_ms)[0], meter.event_id, admission,
                      (estimate.input_tokens, admission.output_tokens), model, user, self.day(now_ms)[0],
                      self._marks_running(policy, admission))

    async def _release(self, key: KeyRecord, policy: Policy, event_id: str, estimate: Estimate,
                       admission: Admission, user: EndUser | None) -> None:
        """Give back all that ``admission`` reserved, before the same request asks again."""
        if admission.local:
            self.fail_modes.local.release(key, policy, event_id)
            if policy.reserves:
                self.fail_modes.local.settle(event_id, 0, 0)
            return
        now_ms = int(time.time() * 1000)
        period = self.period(now_ms)[0]
        if not self.admitter.needs_settle(key, policy, period, user):
            return
        try:
            await self.admitter.settle(
                key, policy, period, event_id, now_ms, reserved=(estimate.input_tokens, admission.output_tokens),
                used=(0, 0), used_micro_usd=0, settled_ttl_ms=int(policy.tier.settled_ttl_s * 1000), user=user,
                day=self.day(now_ms)[0],
            )
        except (RedisPoolExhausted, *REDIS_DOWN) as exc:
            log.error("cannot release %s's bound (%s): its reservation expires after its TTL", event_id, exc)

    def _marks_running(self, policy: Policy, admission: Admission) -> bool:
        return self.replicas is not None and policy.queue is not None and policy.reserves and not admission.local

    async def _may_free(self, key: KeyRecord, admission: Admission) -> bool:
        """Whether waiting can help: a rate or concurrency limit, or a quota held by
        requests of the customer still running here or on another shim (see _QUOTA)."""
        if admission.retry_after_ms < 0:  # larger than a limit could ever admit
            return False
        if admission.reason in _TRANSIENT:
            return True
        if admission.reason not in _QUOTA:
            return False
        if self._in_flight[key.customer] > 0:
            return True
        if self.replicas is None or admission.local:
            return False
        return bool(await self.replicas.running(key.customer, int(time.time() * 1000)))

    async def _decide(
        self, key: KeyRecord, policy: Policy, event_id: str, estimate: Estimate, meter: RequestMeter, batch: bool,
        user: EndUser | None = None,
    ) -> Admission:
        now_ms = int(time.time() * 1000)
        period, _, end_ms, _ = self.period(now_ms)
        if not self.fail_modes.redis_down:
            limits = None
            if batch and policy.concurrency and policy.queue and policy.queue.interactive_reserved_concurrency:
                keep = policy.queue.interactive_reserved_concurrency
                limits = [max(rule.limit - keep, 1) if not rule.scope else rule.limit for rule in policy.concurrency]
            try:
                day, _, day_end_ms = self.day(now_ms)
                admission = await self.admitter.admit(
                    key, policy, period, end_ms, event_id, now_ms, estimate,
                    int(policy.tier.reservation_ttl_s * 1000), limits, user, (day, day_end_ms),
                )
                self.fail_modes.saw(key.customer, period, admission)  # where a local count would start
                if admission.admitted and self._marks_running(policy, admission):
                    # Before it leaves the queue's line: the next in line then sees it running.
                    assert self.replicas is not None
                    ttl_ms = int(policy.tier.reservation_ttl_s * 1000)
                    await self.replicas.mark_running(key.customer, event_id, now_ms + ttl_ms)
                return admission
            except RedisPoolExhausted as exc:
                meter.decision, meter.reason = Decision.REFUSED, "redis_busy"
                raise self.busy(exc) from None
            except REDIS_DOWN as exc:
                self.fail_modes.redis_failed()
                log.error("Redis unreachable during admission (%s): following each tier's fail modes", exc)
        return self.fail_modes.admit(key, policy, event_id, now_ms, estimate, meter, user, (period, end_ms))

    def busy(self, exc: RedisPoolExhausted) -> BackendBusy:
        """The answer while Redis is up but no pooled connection freed up in time."""
        return self.fail_modes.busy(exc)

    async def _wait_in_queue(
        self, key: KeyRecord, policy: Policy, estimate: Estimate, meter: RequestMeter, admission: Admission,
        user: EndUser | None = None,
    ) -> Admission:
        assert policy.queue is not None
        try:
            ticket = self.queue.enter(key.customer, policy.queue.max_depth)
        except QueueRefused:
            if admission.reason in _QUOTA:
                return admission  # no room to wait: the quota's own refusal
            meter.decision, meter.reason = Decision.REFUSED, "queue_full"
            raise
        deadline = time.monotonic() + policy.queue.max_wait_s
        # The customer's line across shims: an earlier batch request waiting elsewhere goes first.
        replicas = self.replicas
        place = None if replicas is None else await replicas.join(key.customer, policy.queue.max_wait_s)
        try:
            while not admission.admitted:
                if not await self._may_free(key, admission):
                    meter.queued_ms = ticket.waited_ms
                    return admission  # the quota is spent, nothing here can free it: refuse as such
                if not await ticket.next_try(admission.retry_after_ms, deadline):
                    if admission.reason in _QUOTA:
                        self.queue.timed_out += 1
                        meter.queued_ms = ticket.waited_ms
                        return admission  # refused as the quota it waited on
                    self.queue.timed_out += 1
                    meter.decision, meter.reason = Decision.REFUSED, "queue_timeout"
                    meter.queued_ms = ticket.waited_ms
                    raise QueueRefused(
                        "queue_timeout",
                        f"Waited {policy.queue.max_wait_s:g}s in the batch queue without capacity freeing up "
                        f"({refusal_text.describe(admission, estimate)}). Please retry later.",
                        max(admission.retry_after_ms, 1) / 1000,
                    )
                if replicas is not None and place is not None and not await replicas.is_head(key.customer, place):
                    continue  # woken when the one ahead leaves the line, or asks again at the poll cap
                admission = await self._decide(key, policy, meter.event_id, estimate, meter, batch=True, user=user)
        finally:
            ticket.leave(admission.admitted)
            if replicas is not None and place is not None:
                await replicas.leave(key.customer, place)
        meter.queued_ms = ticket.waited_ms
        meter.reason = "queued"
        return admission

    def _headers(self, admission: Admission, now_ms: int) -> dict[str, str]:
        _, _, end_ms, length_s = self.period(now_ms)
        return ratelimit_headers(admission, length_s, end_ms - now_ms, self.day(now_ms)[2] - now_ms)

    def _refusal(self, admission: Admission, wait_ms: int, estimate: Estimate, meter: RequestMeter) -> Refusal:
        meter.decision, meter.reason = Decision.REFUSED, admission.reason.code
        now_ms = int(time.time() * 1000)
        end_ms = self.period(now_ms)[2] if admission.reason is not Reason.USER_QUOTA_TOKENS else self.day(now_ms)[2]
        return refusal_text.refusal(admission, wait_ms, estimate, end_ms)

    # -- settlement ---------------------------------------------------------

    def hand_off(self, ticket: Ticket) -> None:
        """An admission of the check endpoint: the request runs behind another proxy,
        so nothing of it stays in flight here. Its Redis reservation is settled by its
        usage report (gateway_shim/check_tickets.py) or expires; a fail-open admission
        by the in-process limiter frees its slot now, as no report can reach it."""
        key = ticket.key
        if ticket.admission.local:
            self.fail_modes.local.release(key, ticket.policy, ticket.event_id)
        self._in_flight[key.customer] -= 1
        if not self._in_flight[key.customer]:
            del self._in_flight[key.customer]
        self.queue.released(key.customer)
        if ticket.running:  # runs elsewhere now, unseen: stop holding other shims' waiters
            assert self.replicas is not None
            self.replicas.settled_later(key.customer, ticket.event_id)

    async def settle(self, ticket: Ticket, meter: RequestMeter) -> None:
        """Replace the reservation with the true usage. Runs before the event is emitted."""
        key, policy = ticket.key, ticket.policy
        try:
            if ticket.admission.local:
                self.fail_modes.local.release(key, policy, ticket.event_id)
                if policy.reserves:  # the local quota count takes the true usage
                    usage = meter.usage
                    cost = self.estimator.cost_micro_usd(meter.model_served or ticket.model,
                                                         meter.started_at.date(), usage)
                    self.fail_modes.local.settle(ticket.event_id, usage.input_tokens + usage.output_tokens, cost)
                return
            if self.fail_modes.redis_down:
                return  # the reservation expires after its TTL instead
            if not self.admitter.needs_settle(key, policy, ticket.period, ticket.user):
                return  # nothing held (no quota, concurrency or token rate): no call, no pricing
            usage = meter.usage
            used = (usage.input_tokens, usage.output_tokens)
            cost = self.estimator.cost_micro_usd(meter.model_served or ticket.model, meter.started_at.date(), usage)
            try:
                await self.admitter.settle(
                    key, policy, ticket.period, ticket.event_id, int(time.time() * 1000),
                    reserved=ticket.reserved, used=used, used_micro_usd=cost,
                    settled_ttl_ms=int(policy.tier.settled_ttl_s * 1000), user=ticket.user, day=ticket.day,
                )
            except RedisPoolExhausted as exc:
                log.error("cannot settle %s (%s): its reservation expires after its TTL", ticket.event_id, exc)
            except REDIS_DOWN as exc:
                self.fail_modes.redis_failed()
                log.error("cannot settle %s (%s): its reservation expires after its TTL", ticket.event_id, exc)
        finally:
            self._in_flight[key.customer] -= 1
            if not self._in_flight[key.customer]:
                del self._in_flight[key.customer]
            self.queue.released(key.customer)
            if ticket.running:  # after the settle: wakes the customer's waiters on every shim
                assert self.replicas is not None
                await self.replicas.settled(key.customer, ticket.event_id)


# Refusals that a prompt's size (instead of its count) can cause.
_TOKEN_REASONS = frozenset((Reason.TOKENS, Reason.TOO_LARGE, Reason.QUOTA_TOKENS, Reason.QUOTA_BUDGET,
                            Reason.USER_QUOTA_TOKENS, Reason.USER_TOKENS))


def _request_rule_scopes(policy: Policy) -> tuple[str, ...]:
    return tuple(rule.scope for rule in policy.rates if rule.unit.value == "requests")
