"""Usage alerts: which thresholds a customer's period totals have crossed,
and the alert each one fires. Pure: no I/O, time is passed in.

A threshold ``pct`` of a limit is crossed once ``used * 100 >= limit * pct``
(exact: integers for tokens, Decimal for money). Each (customer, period,
kind, pct) fires at most once; its id is a hash of exactly those four, so a
retried or duplicated delivery carries the same id.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from enum import StrEnum
from typing import Any

from quotameter.aggregate import format_usd
from quotameter.config import Config

ALERT_TYPE_V1 = "quotameter.alert.v1"
ALERT_SOURCE = "quotameter.pipeline"


class AlertKind(StrEnum):
    TOKENS = "tokens"  # of the tier's monthly_tokens (input + output)
    BUDGET = "budget"  # of the tier's monthly_budget_usd


@dataclass(frozen=True, slots=True)
class AlertLimits:
    """The limits and thresholds that apply to one customer; None = unlimited."""

    monthly_tokens: int | None
    monthly_budget_usd: Decimal | None
    thresholds_pct: tuple[int, ...]

    @property
    def silent(self) -> bool:
        return not self.thresholds_pct or (self.monthly_tokens is None and self.monthly_budget_usd is None)


NO_ALERTS = AlertLimits(None, None, ())


def limits_for(config: Config, tier: str | None, customer: str) -> AlertLimits:
    """Tier limits, replaced by the customer's overrides where set (as the
    shim's admission does); thresholds from the tier, else ``alerts``."""
    if not config.alerts.enabled:
        return NO_ALERTS
    tier_cfg = config.tiers.get(tier) if tier else None
    override = config.customers.get(customer)

    def pick(field: str) -> Any:
        value = getattr(override, field, None) if override is not None else None
        return getattr(tier_cfg, field, None) if value is None else value

    thresholds = config.alerts.thresholds_pct
    if tier_cfg is not None and tier_cfg.alert_thresholds_pct is not None:
        thresholds = tier_cfg.alert_thresholds_pct
    return AlertLimits(pick("monthly_tokens"), pick("monthly_budget_usd"), tuple(sorted(set(thresholds))))


def crossed(limits: AlertLimits, tokens: int, cost_usd: Decimal) -> list[tuple[AlertKind, int]]:
    """Every (kind, pct) reached by these totals, lowest pct first."""
    reached: list[tuple[AlertKind, int]] = []
    if limits.monthly_tokens is not None:
        used = tokens * 100
        reached += [(AlertKind.TOKENS, pct) for pct in limits.thresholds_pct if used >= limits.monthly_tokens * pct]
    if limits.monthly_budget_usd is not None:
        spent = cost_usd * 100
        reached += [(AlertKind.BUDGET, pct) for pct in limits.thresholds_pct if spent >= limits.monthly_budget_usd * pct]
    return reached


def alert_id(customer: str, period: str, kind: AlertKind | str, threshold_pct: int) -> str:
    """Deterministic: the idempotency key of the webhook and the Kafka event id."""
    material = "\x1f".join((customer, period, str(kind), str(threshold_pct)))
    return hashlib.sha256(material.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class Alert:
    customer: str
    period: str
    tier: str | None
    kind: AlertKind
    threshold_pct: int
    limit: int | Decimal  # tokens, or USD
    used: int | Decimal
    fired_at: datetime

    @property
    def id(self) -> str:
        return alert_id(self.customer, self.period, self.kind, self.threshold_pct)

    def data(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "customer": self.customer,
            "period": self.period,
            "tier": self.tier,
            "kind": self.kind.value,
            "threshold_pct": self.threshold_pct,
        }
        if self.kind is AlertKind.TOKENS:
            data |= {"monthly_tokens": int(self.limit), "used_tokens": int(self.used)}
        else:
            # Money as exact strings, never floats.
            data |= {"monthly_budget_usd": format_usd(Decimal(self.limit)), "spent_usd": format_usd(Decimal(self.used))}
        return data

    def envelope(self) -> dict[str, Any]:
        """A CloudEvents 1.0 envelope, like the usage events."""
        return {
            "specversion": "1.0",
            "id": self.id,
            "source": ALERT_SOURCE,
            "type": ALERT_TYPE_V1,
            "subject": self.customer,
            "time": self.fired_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "datacontenttype": "application/json",
            "data": self.data(),
        }

    def to_json(self) -> bytes:
        return json.dumps(self.envelope(), separators=(",", ":"), sort_keys=True).encode()


def build_alerts(
    customer: str,
    period: str,
    tier: str | None,
    limits: AlertLimits,
    fired: Sequence[tuple[AlertKind, int]],
    tokens: int,
    cost_usd: Decimal,
    now: datetime,
) -> list[Alert]:
    alerts = []
    for kind, pct in fired:
        if kind is AlertKind.TOKENS:
            assert limits.monthly_tokens is not None
            alerts.append(Alert(customer, period, tier, kind, pct, limits.monthly_tokens, tokens, now))
        else:
            assert limits.monthly_budget_usd is not None
            alerts.append(Alert(customer, period, tier, kind, pct, limits.monthly_budget_usd, cost_usd, now))
    return alerts


def sort_listing(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Alert records (as stored) in the order ``quotameter alerts`` lists them."""

    def key(record: dict[str, Any]) -> tuple[str, str, str, str, int]:
        data = record["alert"]["data"]
        return (data["period"], data["customer"], record["alert"]["time"], data["kind"], data["threshold_pct"])

    return sorted(records, key=key)
