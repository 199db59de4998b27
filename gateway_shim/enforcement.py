"""Enforcement of one request: the policy, the worst-case estimate, admission
(Redis, or the fail mode while it is away), degradation (fallback model,
batch queue), the refusal answers, and settlement after the response.

The hot path costs one Redis round trip to admit and, only when the request
holds something (a reservation, a concurrency slot, a tokens/min charge),
one more to settle; a customer remembered as refused costs none.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal

import redis.exceptions

from gateway_shim.admission import Admission, Admitter, Estimate, Reason
from gateway_shim.batch_queue import BatchQueue
from gateway_shim.errors import (
    BackendBusy,
    BackendUnavailable,
    InvalidApiKey,
    ModelNotAllowed,
    QueueRefused,
    QuotaExceeded,
    RateLimited,
    Refusal,
)
from gateway_shim.keystore import KeyRecord
from gateway_shim.local_limiter import LocalLimiter
from gateway_shim.metering import RequestMeter
from gateway_shim.ratelimit_headers import ratelimit_headers
from gateway_shim.refusals import RefusalMemory, request_scopes
from gateway_shim.routes import ProxiedRequest
from quotameter.config import Config
from quotameter.events import Decision
from quotameter.policy import Policy, micro_usd, resolve
from quotameter.pricing import PriceTable
from quotameter.redis_pool import RedisPoolExhausted
from quotameter.tokens import count_prompt

log = logging.getLogger("gateway_shim.enforcement")

REDIS_RETRY_S = 1.0  # after a failure, skip Redis (fail mode) this long before trying again
# Refusals a batch request may wait out: rate and concurrency limits free up with
# time; a period quota or budget only while this shim has requests of the customer
# in flight, whose worst-case reservations settle to the true usage, usually lower.
_TRANSIENT = (Reason.REQUESTS, Reason.TOKENS, Reason.CONCURRENCY)
_QUOTA = (Reason.QUOTA_TOKENS, Reason.QUOTA_BUDGET)
# Redis unreachable (not a script error, which is a bug and answered 500). A pool
# whose connections all stayed busy (RedisPoolExhausted) is not among them: Redis is up.
_REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


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


class Enforcer:
    def __init__(self, config: Config, admitter: Admitter) -> None:
        self.config = config
        self.admitter = admitter
        self.prices = PriceTable(config.prices, config.default_price)
        self.local = LocalLimiter()
        self.refusals = RefusalMemory()
        self.queue = BatchQueue()
        self.fail_mode_decisions: Counter[str] = Counter()
        self._policies: dict[tuple[str, str, str, str | None], Policy] = {}
        self._rates: dict[tuple[str | None, date], tuple[Decimal, Decimal, str]] = {}
        self._period: tuple[str, int, int, int] = ("", 0, 0, 0)  # name, start, end ms, length s
        self._redis_down_until = 0.0
        self._last_fail_log = 0.0
        self.busy_refusals = 0
        self._in_flight: Counter[str] = Counter()  # admitted, not yet settled, per customer
        self._last_busy_log = 0.0

    def status(self) -> dict[str, object]:
        return {
            "redis": "down" if time.monotonic() < self._redis_down_until else "up",
            "fail_mode_decisions": dict(self.fail_mode_decisions),
            "busy_refusals": self.busy_refusals,
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

    def _model_rates(self, model: str | None, today: date) -> tuple[Decimal, Decimal, str]:
        """(input, output) micro-USD per token (= USD per 1M tokens) for the model today,
        and the output rate as exact decimal text (what the admission script reads)."""
        rates = self._rates.get((model, today))
        if rates is None:
            price = self.prices.lookup(model, today) or self.config.default_price
            in_rate, out_rate = (price.input_per_million_usd, price.output_per_million_usd) if price else (Decimal(0), Decimal(0))
            rates = (in_rate, out_rate, format(out_rate, "f"))
            if len(self._rates) > 50_000:
                self._rates.clear()
            self._rates[(model, today)] = rates
        return rates

    def estimate(self, policy: Policy, proxied: ProxiedRequest, streams: bool) -> tuple[Estimate, bool]:
        """The request's worst case, and whether it named its own max_tokens."""
        body = proxied.body
        if body is None:
            return Estimate(0, 0, 0, "0"), False
        explicit = body.get("max_completion_tokens") or body.get("max_tokens")
        explicit = explicit if isinstance(explicit, int) and not isinstance(explicit, bool) and explicit > 0 else None
        choices = body.get("n") if isinstance(body.get("n"), int) and body.get("n", 0) > 0 else 1
        output = (explicit or policy.default_max_tokens) * choices if streams or "messages" in body else 0
        counts_tokens = policy.reserves or any(rule.unit.value == "tokens" for rule in policy.rates)
        input_tokens = count_prompt(body, proxied.model) if counts_tokens else 0
        today = datetime.now(UTC).date()
        in_rate, _, out_rate_text = self._model_rates(proxied.model, today)
        fallback = policy.fallback
        fb_budget, fb_in, fb_rate = -1, 0, "0"
        if fallback is not None and policy.period_budget_micro_usd is not None:
            fb_in_rate, _, fb_rate = self._model_rates(fallback.model, today)
            fb_budget = policy.period_budget_micro_usd + micro_usd(fallback.extra_budget_usd)
            fb_in = math.ceil(input_tokens * fb_in_rate)
        cuttable = policy.tier.cut_streams and explicit is None and choices == 1 and output > 0
        return (
            Estimate(
                input_tokens=input_tokens,
                output_tokens=output,
                input_micro_usd=math.ceil(input_tokens * in_rate),
                output_rate=out_rate_text,
                cuttable=cuttable,
                fallback_budget_micro_usd=fb_budget,
                fallback_input_micro_usd=fb_in,
                fallback_output_rate=fb_rate,
            ),
            explicit is not None,
        )

    # -- admission ----------------------------------------------------------

    async def admit(
        self,
        key: KeyRecord,
        policy: Policy,
        proxied: ProxiedRequest,
        estimate: Estimate,
        meter: RequestMeter,
        headers: dict[str, str],
    ) -> Ticket:
        """Admit the request or raise the refusal; ``headers`` gets the rate-limit headers."""
        if proxied.body is not None and proxied.model is not None and not policy.model_allowed(proxied.model):
            meter.decision, meter.reason = Decision.REFUSED, "model_not_allowed"
            allowed = ", ".join(sorted(policy.allowed_models or ()))
            raise ModelNotAllowed(
                f"The model '{proxied.model}' is not available on the {policy.tier_name.capitalize()} tier "
                f"(allowed: {allowed}).{_hint(policy)}"
            )
        queued = key.batch and policy.queue is not None
        if not queued and self.refusals:
            recalled = self.refusals.recall(key.customer, request_scopes(_request_rule_scopes(policy)))
            if recalled is not None:
                admission, wait_ms = recalled
                headers.update(self._headers(admission, int(time.time() * 1000)))
                raise self._refusal(admission, wait_ms, estimate, meter)
        admission = await self._decide(key, policy, meter.event_id, estimate, meter, batch=queued)
        if admission.revoked:
            raise KeyRevoked("revoked")
        if not admission.admitted and queued and self._may_free(key, admission):
            admission = await self._wait_in_queue(key, policy, estimate, meter, admission)
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
        return Ticket(key, policy, self.period(int(time.time() * 1000))[0], meter.event_id, admission,
                      (estimate.input_tokens, admission.output_tokens), model)

    def _may_free(self, key: KeyRecord, admission: Admission) -> bool:
        """Whether waiting can help: a rate or concurrency limit, or a quota held by
        requests of the customer still running here (see _QUOTA)."""
        return admission.reason in _TRANSIENT or (admission.reason in _QUOTA and self._in_flight[key.customer] > 0)

    async def _decide(
        self, key: KeyRecord, policy: Policy, event_id: str, estimate: Estimate, meter: RequestMeter, batch: bool
    ) -> Admission:
        now_ms = int(time.time() * 1000)
        if time.monotonic() >= self._redis_down_until:
            period, _, end_ms, _ = self.period(now_ms)
            limits = None
            if batch and policy.concurrency and policy.queue and policy.queue.interactive_reserved_concurrency:
                keep = policy.queue.interactive_reserved_concurrency
                limits = [max(rule.limit - keep, 1) if not rule.scope else rule.limit for rule in policy.concurrency]
            try:
                return await self.admitter.admit(
                    key, policy, period, end_ms, event_id, now_ms, estimate,
                    int(policy.tier.reservation_ttl_s * 1000), limits,
                )
            except RedisPoolExhausted as exc:
                meter.decision, meter.reason = Decision.REFUSED, "redis_busy"
                raise self.busy(exc) from None
            except _REDIS_ERRORS as exc:
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
                log.error("Redis unreachable during admission (%s): following each tier's fail modes", exc)
        return self._fail_mode(key, policy, event_id, now_ms, estimate, meter)

    def _fail_mode(
        self, key: KeyRecord, policy: Policy, event_id: str, now_ms: int, estimate: Estimate, meter: RequestMeter
    ) -> Admission:
        closed = policy.fail_closed_kinds()
        if closed:
            outcome = "closed_refused"
            self._count_fail_mode(outcome, key, policy)
            meter.decision, meter.reason = Decision.REFUSED, "redis_unavailable"
            raise BackendUnavailable(
                f"The quota service is unreachable and the {policy.tier_name.capitalize()} tier's "
                f"{', '.join(k.value for k in closed)} limits fail closed. Please retry shortly."
            )
        admission = self.local.admit(key, policy, event_id, now_ms, estimate)
        self._count_fail_mode("open_admitted" if admission.admitted else "open_refused", key, policy)
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

    def _count_fail_mode(self, outcome: str, key: KeyRecord, policy: Policy) -> None:
        self.fail_mode_decisions[outcome] += 1
        now = time.monotonic()
        if now - self._last_fail_log >= 1.0 or self.fail_mode_decisions[outcome] == 1:
            self._last_fail_log = now
            log.warning(
                "Redis unreachable: fail-%s decision for customer %s (tier %s); so far %s",
                outcome.replace("_", " "), key.customer, policy.tier_name, dict(self.fail_mode_decisions),
            )

    async def _wait_in_queue(
        self, key: KeyRecord, policy: Policy, estimate: Estimate, meter: RequestMeter, admission: Admission
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
        try:
            while not admission.admitted:
                if not self._may_free(key, admission):
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
                        f"({_describe(admission, estimate)}). Please retry later.",
                        max(admission.retry_after_ms, 1) / 1000,
                    )
                admission = await self._decide(key, policy, meter.event_id, estimate, meter, batch=True)
        finally:
            ticket.leave(admission.admitted)
        meter.queued_ms = ticket.waited_ms
        meter.reason = "queued"
        return admission

    def _headers(self, admission: Admission, now_ms: int) -> dict[str, str]:
        _, _, end_ms, length_s = self.period(now_ms)
        return ratelimit_headers(admission, length_s, end_ms - now_ms)

    def _refusal(self, admission: Admission, wait_ms: int, estimate: Estimate, meter: RequestMeter) -> Refusal:
        policy = admission.policy
        meter.decision, meter.reason = Decision.REFUSED, admission.reason.code
        tier = f"{policy.tier_name.capitalize()} tier"
        what = _describe(admission, estimate)
        if admission.reason in (Reason.QUOTA_TOKENS, Reason.QUOTA_BUDGET):
            _, _, end_ms, _ = self.period(int(time.time() * 1000))
            resets = datetime.fromtimestamp(end_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
            return QuotaExceeded(
                f"{tier} limit exceeded: {what}. Your quota resets at {resets}.{_hint(policy)}",
                wait_ms / 1000,
                admission.reason.code,
                status=policy.tier.quota_status,
            )
        if admission.reason is Reason.TOO_LARGE:
            return RateLimited(
                f"{tier} limit exceeded: {what}, more than the limit can ever admit. "
                f"Lower max_tokens or shorten the prompt.{_hint(policy)}",
                None,
                "rate_limit_tokens",
                unit="tokens",
            )
        retry_s = max(1, math.ceil(wait_ms / 1000))
        unit = "tokens" if admission.reason is Reason.TOKENS else "requests"
        return RateLimited(
            f"{tier} limit exceeded: {what}. Please retry after {retry_s}s.{_hint(policy)}",
            wait_ms / 1000,
            admission.reason.code,
            unit=unit,
        )

    # -- settlement ---------------------------------------------------------

    def hand_off(self, ticket: Ticket) -> None:
        """An admission of the check endpoint: the request runs behind another proxy,
        so nothing of it stays in flight here. Its Redis reservation is settled by its
        usage report (gateway_shim/check_tickets.py) or expires; a fail-open admission
        by the in-process limiter frees its slot now, as no report can reach it."""
        key = ticket.key
        if ticket.admission.local:
            self.local.release(key, ticket.policy, ticket.event_id)
        self._in_flight[key.customer] -= 1
        if not self._in_flight[key.customer]:
            del self._in_flight[key.customer]
        self.queue.released(key.customer)


    async def settle(self, ticket: Ticket, meter: RequestMeter) -> None:
        """Replace the reservation with the true usage. Runs before the event is emitted."""
        key, policy = ticket.key, ticket.policy
        try:
            if ticket.admission.local:
                self.local.release(key, policy, ticket.event_id)
                return
            if time.monotonic() < self._redis_down_until:
                return  # the reservation expires after its TTL instead
            if not self.admitter.needs_settle(key, policy, ticket.period):
                return  # nothing held (no quota, concurrency or token rate): no call, no pricing
            usage = meter.usage
            used = (usage.input_tokens, usage.output_tokens)
            model = meter.model_served or ticket.model
            cost = self.prices.cost(
                model, meter.started_at.date(), input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
                cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
            )
            try:
                await self.admitter.settle(
                    key, policy, ticket.period, ticket.event_id, int(time.time() * 1000),
                    reserved=ticket.reserved, used=used, used_micro_usd=micro_usd(cost.usd),
                    settled_ttl_ms=int(policy.tier.settled_ttl_s * 1000),
                )
            except RedisPoolExhausted as exc:
                log.error("cannot settle %s (%s): its reservation expires after its TTL", ticket.event_id, exc)
            except _REDIS_ERRORS as exc:
                self._redis_down_until = time.monotonic() + REDIS_RETRY_S
                log.error("cannot settle %s (%s): its reservation expires after its TTL", ticket.event_id, exc)
        finally:
            self._in_flight[key.customer] -= 1
            if not self._in_flight[key.customer]:
                del self._in_flight[key.customer]
            self.queue.released(key.customer)


def _request_rule_scopes(policy: Policy) -> tuple[str, ...]:
    return tuple(rule.scope for rule in policy.rates if rule.unit.value == "requests")


def _hint(policy: Policy) -> str:
    return f" {policy.upgrade_hint}" if policy.upgrade_hint else ""


def _usd(micro: int) -> str:
    text = f"{Decimal(micro) / 1_000_000:.6f}".rstrip("0")
    return "$" + (text + "0" * (2 - len(text.split(".")[1])))


def _describe(admission: Admission, estimate: Estimate) -> str:
    """The limit, what was used, and what this request needs."""
    policy, reason = admission.policy, admission.reason
    needs = estimate.input_tokens + estimate.output_tokens
    if reason in (Reason.REQUESTS, Reason.TOKENS, Reason.TOO_LARGE):
        rule = admission.refused_rule()
        assert rule is not None
        remaining = admission.rates[admission.rule - 1][0]
        where = {"": ""}.get(rule.scope, f" for {rule.scope.replace(':', ' ')}")
        if rule.unit.value == "requests":
            return f"{rule.limit} requests per minute{where} (used {rule.limit - remaining})"
        return (f"{rule.limit} tokens per minute{where} (used {rule.limit - remaining}, "
                f"this request needs up to {needs})")
    if reason is Reason.CONCURRENCY:
        rule = policy.concurrency[admission.rule - 1]
        return f"{rule.limit} concurrent requests (in flight: {admission.in_flight[admission.rule - 1]})"
    if reason is Reason.QUOTA_TOKENS:
        return (f"{policy.period_tokens} tokens per billing period (used {admission.tokens_used}, "
                f"this request needs up to {needs})")
    budget = policy.period_budget_micro_usd or 0
    return f"budget of {_usd(budget)} per billing period (spent {_usd(admission.micro_usd_used)})"
