"""Limit resolution, billing periods with an anchor, and the rate-limit headers: pure, no services."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

import pytest

from gateway_shim.admission import Admission, Reason
from gateway_shim.ratelimit_headers import ratelimit_headers
from quotameter.config import Customer, KeyOverrides, Tier, parse_config
from quotameter.errors import ConfigError
from quotameter.periods import BillingCalendar
from quotameter.policy import LimitKind, Unit, micro_usd, resolve

TIER = Tier(
    requests_per_minute=60,
    tokens_per_minute=1000,
    monthly_tokens=5000,
    monthly_budget_usd=Decimal("1.5"),
    allowed_models=["a", "b"],
    models={"b": {"requests_per_minute": 2, "default_max_tokens": 64}},
    fail_modes={"monthly_budget_usd": "closed"},
)


def test_tier_then_customer_then_key_then_model() -> None:
    policy = resolve("pro", TIER, "b", Customer(requests_per_minute=120, monthly_tokens=9000), "k1",
                     KeyOverrides(requests_per_minute=5, allowed_models=["b", "c"]))
    assert [(r.name, r.scope, r.limit) for r in policy.rates] == [
        ("requests", "", 120), ("tokens", "", 1000), ("key-requests", "key:k1", 5), ("b-requests", "model:b", 2),
    ]
    assert policy.period_tokens == 9000 and policy.period_budget_micro_usd == 1_500_000
    assert policy.allowed_models == frozenset({"b"})  # a key only narrows
    assert policy.default_max_tokens == 64 and policy.rates[1].unit is Unit.TOKENS
    assert policy.fail_closed_kinds() == [LimitKind.MONTHLY_BUDGET_USD]
    assert not resolve("pro", TIER, "c").model_allowed("c") and resolve("pro", Tier(), "c").model_allowed("c")
    assert micro_usd(Decimal("0.0000001")) == 1  # rounded up, never in the customer's favour


def test_billing_periods_follow_the_anchor_and_zone() -> None:
    assert BillingCalendar("UTC", 15).period_of(datetime(2025, 3, 14, 23, tzinfo=UTC)) == "2025-02"
    assert BillingCalendar("UTC", 15).period_of(datetime(2025, 3, 15, 0, tzinfo=UTC)) == "2025-03"
    assert BillingCalendar("Europe/Paris", 1).period_of(datetime(2025, 3, 31, 23, 30, tzinfo=UTC)) == "2025-04"
    start, end = BillingCalendar("UTC", 31).bounds("2025-01")
    assert (start.day, end.month, end.day) == (31, 2, 28)  # anchor past February's end: its last day
    assert BillingCalendar("UTC", 1).bounds("2025-03") == (datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 4, 1, tzinfo=UTC))


def test_bad_billing_and_tier_settings_are_rejected() -> None:
    base = {"tiers": {"t": {}}}
    for bad, path in (
        ({"billing": {"anchor_day": 32}}, "billing.anchor_day"),
        ({"billing": {"timezone": "Mars/Olympus"}}, "billing.timezone"),
        ({"tiers": {"t": {"rate_algorithm": "fixed"}}}, "tiers.t.rate_algorithm"),
        ({"tiers": {"t": {"quota_status": 403}}}, "tiers.t.quota_status"),
        ({"tiers": {"t": {"fail_modes": {"monthly_tokens": "maybe"}}}}, "tiers.t.fail_modes.monthly_tokens"),
        ({"customers": {"c": {"requests_per_minute": 0}}}, "customers.c.requests_per_minute"),
    ):
        with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
            parse_config({**base, **bad})


def test_openai_and_ietf_headers() -> None:
    policy = resolve("pro", TIER, "a")
    admission = Admission(True, False, Reason.NONE, 0, False, 100, 0, 1200, 400_000, (), ((59, 1000), (880, 7200)), policy)
    headers = ratelimit_headers(admission, period_s=2_592_000, period_left_ms=86_400_000)
    assert headers["x-ratelimit-limit-requests"] == "60" and headers["x-ratelimit-remaining-requests"] == "59"
    assert headers["x-ratelimit-reset-requests"] == "1s" and headers["x-ratelimit-reset-tokens"] == "7.2s"
    assert headers["x-ratelimit-limit-tokens"] == "1000" and headers["x-ratelimit-remaining-tokens"] == "880"
    assert headers["RateLimit-Policy"] == (
        '"requests";q=60;w=60, "tokens";q=1000;w=60;qu="tokens", '
        '"period-tokens";q=5000;w=2592000;qu="tokens", "period-budget";q=1500000;w=2592000;qu="usd-micros"'
    )
    assert headers["RateLimit"] == (
        '"requests";r=59;t=1, "tokens";r=880;t=8, "period-tokens";r=3800;t=86400, "period-budget";r=1100000;t=86400'
    )
