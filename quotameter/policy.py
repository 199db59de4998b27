"""Which limits apply to one request: tier → customer override → key override
→ per-model limits. Pure: no I/O, the shim caches the result per combination.

Customer overrides replace the tier's values (the state they apply to is the
customer's anyway). A tier's ``per_user`` limits become rules with the scope
"user" here, made concrete per request for one end user (``Policy.end_user``). Key overrides and per-model limits add checks of their
own, with state of their own, on top of the customer's: a key or a model can
be held tighter than the customer, never looser. Period quotas and budgets
are per customer only (the pipeline totals usage per customer).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, replace
from decimal import Decimal
from enum import StrEnum

from quotameter.config import (
    Config,
    Customer,
    FailMode,
    Fallback,
    BatchQueue,
    KeyOverrides,
    RateAlgorithm,
    Tier,
    TokenCount,
)

WINDOW_MS = 60_000
MICRO = Decimal(1_000_000)


class Unit(StrEnum):
    REQUESTS = "requests"
    TOKENS = "tokens"


class LimitKind(StrEnum):
    """The limit kinds, as named in config (fail modes) and refusal reasons."""

    REQUESTS_PER_MINUTE = "requests_per_minute"
    TOKENS_PER_MINUTE = "tokens_per_minute"
    CONCURRENT_REQUESTS = "concurrent_requests"
    MONTHLY_TOKENS = "monthly_tokens"
    MONTHLY_BUDGET_USD = "monthly_budget_usd"


@dataclass(frozen=True, slots=True)
class RateRule:
    name: str  # the IETF policy name, e.g. "requests", "key-tokens", "gpt-4o-requests"
    unit: Unit
    scope: str  # "" (the customer), "key:<id>", "model:<name>" or "user:<digest>": part of the state key
    limit: int
    window_ms: int
    algorithm: RateAlgorithm
    counts: TokenCount = TokenCount.TOTAL  # tokens only

    @property
    def kind(self) -> LimitKind:
        return LimitKind.REQUESTS_PER_MINUTE if self.unit is Unit.REQUESTS else LimitKind.TOKENS_PER_MINUTE


@dataclass(frozen=True, slots=True)
class ConcurrencyRule:
    scope: str  # "" (the customer) or "key:<id>"
    limit: int


@dataclass(frozen=True, slots=True)
class EndUser:
    """The per-user limits of one request's end user, known by a digest of its id."""

    digest: str
    rates: tuple[RateRule, ...]  # scope "user:<digest>"
    day_tokens: int | None


def end_user_digest(end_user: str) -> str:
    """A fixed-length name for a customer-supplied end-user id: what Redis keys
    and in-process state carry, so the id itself never shapes a key."""
    return hashlib.blake2b(end_user.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)  # by identity: the shim caches one per combination
class Policy:
    tier_name: str
    tier: Tier
    rates: tuple[RateRule, ...]
    concurrency: tuple[ConcurrencyRule, ...]
    period_tokens: int | None
    period_budget_micro_usd: int | None
    allowed_models: frozenset[str] | None
    default_max_tokens: int
    user_rates: tuple[RateRule, ...] = ()  # the tier's per_user rates, scope "user"
    user_day_tokens: int | None = None
    require_user: bool = False

    @property
    def per_user(self) -> bool:
        """Whether a request naming an end user is held to per-user limits."""
        return bool(self.user_rates) or self.user_day_tokens is not None

    def end_user(self, digest: str) -> EndUser:
        scope = f"user:{digest}"
        return EndUser(digest, tuple(replace(rule, scope=scope) for rule in self.user_rates), self.user_day_tokens)

    @property
    def upgrade_hint(self) -> str:
        return self.tier.upgrade_hint

    @property
    def fallback(self) -> Fallback | None:
        return self.tier.fallback

    @property
    def queue(self) -> BatchQueue | None:
        return self.tier.queue

    @property
    def reserves(self) -> bool:
        """Whether requests hold a reservation against a period quota or budget."""
        return self.period_tokens is not None or self.period_budget_micro_usd is not None

    def configured_kinds(self) -> set[LimitKind]:
        # Per-user limits follow the fail mode of their kind (the day quota: monthly_tokens).
        kinds = {rule.kind for rule in (*self.rates, *self.user_rates)}
        if self.user_day_tokens is not None:
            kinds.add(LimitKind.MONTHLY_TOKENS)
        if self.concurrency:
            kinds.add(LimitKind.CONCURRENT_REQUESTS)
        if self.period_tokens is not None:
            kinds.add(LimitKind.MONTHLY_TOKENS)
        if self.period_budget_micro_usd is not None:
            kinds.add(LimitKind.MONTHLY_BUDGET_USD)
        return kinds

    def fail_closed_kinds(self) -> list[LimitKind]:
        """The configured limit kinds that must refuse while Redis is away."""
        modes = self.tier.fail_modes
        return sorted(k for k in self.configured_kinds() if getattr(modes, k.value) is FailMode.CLOSED)

    def model_allowed(self, model: str | None) -> bool:
        return self.allowed_models is None or (model is not None and model in self.allowed_models)


def micro_usd(usd: Decimal) -> int:
    """USD as integer micro-USD, rounded up (a budget check never rounds in the customer's favour)."""
    return math.ceil(usd * MICRO)


def resolve(
    tier_name: str,
    tier: Tier,
    model: str | None,
    customer: Customer | None = None,
    key_id: str = "",
    key: KeyOverrides | None = None,
) -> Policy:
    def pick(field: str):  # noqa: ANN202 - the field's own type
        value = getattr(customer, field, None) if customer is not None else None
        return getattr(tier, field) if value is None else value

    algorithm, counts = tier.rate_algorithm, tier.tokens_per_minute_counts
    rates: list[RateRule] = []
    concurrency: list[ConcurrencyRule] = []

    def add_rates(prefix: str, scope: str, rpm: int | None, tpm: int | None) -> None:
        if rpm is not None:
            rates.append(RateRule(prefix + "requests", Unit.REQUESTS, scope, rpm, WINDOW_MS, algorithm))
        if tpm is not None:
            rates.append(RateRule(prefix + "tokens", Unit.TOKENS, scope, tpm, WINDOW_MS, algorithm, counts))

    add_rates("", "", pick("requests_per_minute"), pick("tokens_per_minute"))
    if pick("concurrent_requests") is not None:
        concurrency.append(ConcurrencyRule("", pick("concurrent_requests")))
    allowed = pick("allowed_models")
    if key is not None and key_id:
        add_rates("key-", f"key:{key_id}", key.requests_per_minute, key.tokens_per_minute)
        if key.concurrent_requests is not None:
            concurrency.append(ConcurrencyRule(f"key:{key_id}", key.concurrent_requests))
        if key.allowed_models is not None:
            allowed = key.allowed_models if allowed is None else [m for m in allowed if m in key.allowed_models]
    default_max_tokens = tier.default_max_tokens
    per_model = tier.models.get(model or "")
    if per_model is not None:
        add_rates(f"{model}-", f"model:{model}", per_model.requests_per_minute, per_model.tokens_per_minute)
        default_max_tokens = per_model.default_max_tokens or default_max_tokens
    budget = pick("monthly_budget_usd")
    per_user = tier.per_user
    user_rates: list[RateRule] = []
    if per_user is not None:
        user_start = len(rates)
        add_rates("user-", "user", per_user.requests_per_minute, per_user.tokens_per_minute)
        user_rates, rates[user_start:] = rates[user_start:], []
    return Policy(
        tier_name=tier_name,
        tier=tier,
        rates=tuple(rates),
        concurrency=tuple(concurrency),
        period_tokens=pick("monthly_tokens"),
        period_budget_micro_usd=None if budget is None else micro_usd(budget),
        allowed_models=None if allowed is None else frozenset(allowed),
        default_max_tokens=default_max_tokens,
        user_rates=tuple(user_rates),
        user_day_tokens=None if per_user is None else per_user.tokens_per_day,
        require_user=per_user is not None and per_user.require_user,
    )


def resolve_for(config: Config, tier_name: str, customer: str, model: str | None,
                key_id: str = "", key: KeyOverrides | None = None) -> Policy:
    return resolve(tier_name, config.tier(tier_name), model, config.customers.get(customer), key_id, key)
