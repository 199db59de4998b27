"""Threshold logic, alert ids and payloads: pure, no services."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from quotameter.alert_rules import (
    ALERT_TYPE_V1,
    Alert,
    AlertKind,
    AlertLimits,
    alert_id,
    build_alerts,
    crossed,
    limits_for,
)
from quotameter.config import parse_config
from quotameter.errors import ConfigError

NOW = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)
LIMITS = AlertLimits(monthly_tokens=1000, monthly_budget_usd=Decimal("2.00"), thresholds_pct=(50, 80, 90, 100))


def config(**extra):
    document = {"tiers": {"pro": {"monthly_tokens": 1000, "monthly_budget_usd": "2.00"}, "open": {}}}
    for key, value in extra.items():
        document[key] = value
    return parse_config(document)


def test_nothing_crossed_below_the_first_threshold() -> None:
    assert crossed(LIMITS, 499, Decimal("0.999999999999")) == []


def test_a_threshold_is_crossed_exactly_at_its_value() -> None:
    assert crossed(LIMITS, 500, Decimal(0)) == [(AlertKind.TOKENS, 50)]
    assert crossed(LIMITS, 0, Decimal("1.00")) == [(AlertKind.BUDGET, 50)]


def test_every_threshold_below_the_totals_is_reported_lowest_first() -> None:
    assert crossed(LIMITS, 905, Decimal("2.5")) == [
        (AlertKind.TOKENS, 50),
        (AlertKind.TOKENS, 80),
        (AlertKind.TOKENS, 90),
        (AlertKind.BUDGET, 50),
        (AlertKind.BUDGET, 80),
        (AlertKind.BUDGET, 90),
        (AlertKind.BUDGET, 100),
    ]


def test_money_is_compared_exactly() -> None:
    limits = AlertLimits(None, Decimal("0.3"), (100,))
    assert crossed(limits, 0, Decimal("0.1") + Decimal("0.1") + Decimal("0.1")) == [(AlertKind.BUDGET, 100)]
    assert crossed(limits, 0, Decimal("0.299999999999")) == []


def test_thresholds_above_100_pct_report_overage() -> None:
    assert crossed(AlertLimits(1000, None, (100, 150)), 1500, Decimal(0)) == [(AlertKind.TOKENS, 100), (AlertKind.TOKENS, 150)]


def test_unlimited_kinds_never_fire() -> None:
    assert crossed(AlertLimits(None, None, (50,)), 10**12, Decimal(10**9)) == []
    assert AlertLimits(None, None, (50,)).silent
    assert AlertLimits(10, None, ()).silent


def test_limits_come_from_the_tier_and_the_default_thresholds() -> None:
    limits = limits_for(config(), "pro", "acme")
    assert limits == AlertLimits(1000, Decimal("2.00"), (50, 80, 90, 100))
    assert limits_for(config(), "open", "acme").silent
    assert limits_for(config(), None, "acme").silent
    assert limits_for(config(), "no-such-tier", "acme").silent


def test_customer_overrides_replace_the_tier_limits() -> None:
    cfg = config(customers={"acme": {"monthly_tokens": 5000}})
    assert limits_for(cfg, "pro", "acme") == AlertLimits(5000, Decimal("2.00"), (50, 80, 90, 100))
    assert limits_for(cfg, "pro", "other").monthly_tokens == 1000


def test_a_tier_sets_its_own_thresholds_or_none() -> None:
    cfg = parse_config({"tiers": {
        "pro": {"monthly_tokens": 1000, "alert_thresholds_pct": [100, 75, 75]},
        "quiet": {"monthly_tokens": 1000, "alert_thresholds_pct": []},
    }, "alerts": {"thresholds_pct": [10]}})
    assert limits_for(cfg, "pro", "a").thresholds_pct == (75, 100)
    assert limits_for(cfg, "quiet", "a").silent


def test_alerts_can_be_disabled() -> None:
    assert limits_for(config(alerts={"enabled": False}), "pro", "acme").silent


def test_a_webhook_must_be_signed() -> None:
    with pytest.raises(ConfigError, match="webhook_secret"):
        config(alerts={"webhook_url": "https://hooks.example.com/x"})
    with pytest.raises(ConfigError, match="http"):
        config(alerts={"webhook_url": "ftp://x", "webhook_secret": "s"})
    cfg = config(alerts={"webhook_url": "https://hooks.example.com/x", "webhook_secret": "s3cret"})
    assert "s3cret" not in repr(cfg.alerts)


def test_threshold_bounds_are_checked() -> None:
    with pytest.raises(ConfigError, match="alerts.thresholds_pct"):
        config(alerts={"thresholds_pct": [0]})


def test_the_alert_id_is_a_stable_hash_of_customer_period_kind_and_threshold() -> None:
    first = alert_id("acme", "2025-03", AlertKind.TOKENS, 80)
    assert first == alert_id("acme", "2025-03", "tokens", 80)
    assert len(first) == 32
    others = {
        alert_id("acme", "2025-04", "tokens", 80),
        alert_id("acme", "2025-03", "budget", 80),
        alert_id("acme", "2025-03", "tokens", 90),
        alert_id("acme2", "2025-03", "tokens", 80),
    }
    assert first not in others and len(others) == 4
    # Field boundaries are part of the hash: no ambiguity from concatenation.
    assert alert_id("a", "b2025-03", "tokens", 80) != alert_id("ab", "2025-03", "tokens", 80)


def test_the_payload_is_a_cloudevent_with_exact_money() -> None:
    [tokens, budget] = build_alerts("acme", "2025-03", "pro", LIMITS, [(AlertKind.TOKENS, 80), (AlertKind.BUDGET, 50)],
                                    812, Decimal("1.1"), NOW)
    envelope = json.loads(budget.to_json())
    assert envelope["type"] == ALERT_TYPE_V1 and envelope["specversion"] == "1.0"
    assert envelope["id"] == alert_id("acme", "2025-03", "budget", 50)
    assert envelope["subject"] == "acme" and envelope["time"] == "2025-03-10T12:00:00Z"
    assert envelope["data"] == {
        "customer": "acme", "period": "2025-03", "tier": "pro", "kind": "budget", "threshold_pct": 50,
        "monthly_budget_usd": "2.000000000000", "spent_usd": "1.100000000000",
    }
    assert json.loads(tokens.to_json())["data"] == {
        "customer": "acme", "period": "2025-03", "tier": "pro", "kind": "tokens", "threshold_pct": 80,
        "monthly_tokens": 1000, "used_tokens": 812,
    }
    # Deterministic bytes: the same alert always serialises the same.
    again = Alert("acme", "2025-03", "pro", AlertKind.BUDGET, 50, Decimal("2.00"), Decimal("1.1"), NOW)
    assert again.to_json() == budget.to_json()
