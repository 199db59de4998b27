"""What a refused client reads: the refusal for an admission's outcome, with
the limit, what was used, what this request needs, and when it frees up.

An end user's limit (a tier's ``per_user``) is named as such ("per end
user"), never with the end user's id. Its day quota is refused as a rate
limit (429, ``rate_limit_exceeded``, until the day's end), not as the
customer's ``insufficient_quota``: the customer's account is in order, and
its other end users are still served."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from decimal import Decimal

from gateway_shim.admission import Admission, Estimate, Reason
from gateway_shim.errors import ModelNotAllowed, QuotaExceeded, RateLimited, Refusal
from quotameter.policy import Policy


def refusal(admission: Admission, wait_ms: int, estimate: Estimate, period_end_ms: int) -> Refusal:
    """The refusal for a refused admission, its client retrying after ``wait_ms``."""
    policy = admission.policy
    tier = f"{policy.tier_name.capitalize()} tier"
    what = describe(admission, estimate)
    if admission.reason is Reason.USER_QUOTA_TOKENS:
        resets = datetime.fromtimestamp(period_end_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
        return RateLimited(
            f"{tier} per-user limit exceeded: {what}. The end user's quota resets at {resets}.{hint(policy)}",
            wait_ms / 1000,
            admission.reason.code,
            unit="tokens",
        )
    if admission.reason in (Reason.QUOTA_TOKENS, Reason.QUOTA_BUDGET):
        resets = datetime.fromtimestamp(period_end_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M UTC")
        return QuotaExceeded(
            f"{tier} limit exceeded: {what}. Your quota resets at {resets}.{hint(policy)}",
            wait_ms / 1000,
            admission.reason.code,
            status=policy.tier.quota_status,
        )
    if admission.reason is Reason.TOO_LARGE or (admission.reason is Reason.USER_TOKENS and wait_ms < 0):
        return RateLimited(
            f"{tier}{' per-user' if admission.reason is Reason.USER_TOKENS else ''} limit exceeded: {what}, more than the limit can ever admit. "
            f"Lower max_tokens or shorten the prompt.{hint(policy)}",
            None,
            admission.reason.code,
            unit="tokens",
        )
    retry_s = max(1, math.ceil(wait_ms / 1000))
    unit = "tokens" if admission.reason in (Reason.TOKENS, Reason.USER_TOKENS) else "requests"
    if admission.reason in (Reason.USER_REQUESTS, Reason.USER_TOKENS):
        tier += " per-user"
    return RateLimited(
        f"{tier} limit exceeded: {what}. Please retry after {retry_s}s.{hint(policy)}",
        wait_ms / 1000,
        admission.reason.code,
        unit=unit,
    )


def model_not_allowed(policy: Policy, model: str) -> ModelNotAllowed:
    allowed = ", ".join(sorted(policy.allowed_models or ()))
    return ModelNotAllowed(
        f"The model '{model}' is not available on the {policy.tier_name.capitalize()} tier "
        f"(allowed: {allowed}).{hint(policy)}"
    )


def stream_cut(policy: Policy, cut_at: int) -> str:
    """The message of the error event that ends a stream cut at its reservation."""
    return (f"{policy.tier_name.capitalize()} tier budget reached: the response was cut at "
            f"{cut_at} output tokens.{hint(policy)}")


def hint(policy: Policy) -> str:
    return f" {policy.upgrade_hint}" if policy.upgrade_hint else ""


def _usd(micro: int) -> str:
    text = f"{Decimal(micro) / 1_000_000:.6f}".rstrip("0")
    return "$" + (text + "0" * (2 - len(text.split(".")[1])))


def describe(admission: Admission, estimate: Estimate) -> str:
    """The limit, what was used, and what this request needs."""
    policy, reason = admission.policy, admission.reason
    needs = estimate.input_tokens + estimate.output_tokens
    if reason in (Reason.REQUESTS, Reason.TOKENS, Reason.TOO_LARGE, Reason.USER_REQUESTS, Reason.USER_TOKENS):
        rule = admission.refused_rule()
        assert rule is not None
        remaining = admission.rates[admission.rule - 1][0]
        if rule.scope.startswith("user:"):
            where = " per end user"
        else:
            where = {"": ""}.get(rule.scope, f" for {rule.scope.replace(':', ' ')}")
        if rule.unit.value == "requests":
            return f"{rule.limit} requests per minute{where} (used {rule.limit - remaining})"
        return (f"{rule.limit} tokens per minute{where} (used {rule.limit - remaining}, "
                f"this request needs up to {needs})")
    if reason is Reason.CONCURRENCY:
        rule = policy.concurrency[admission.rule - 1]
        return f"{rule.limit} concurrent requests (in flight: {admission.in_flight[admission.rule - 1]})"
    if reason is Reason.USER_QUOTA_TOKENS:
        day_tokens = admission.user.day_tokens if admission.user is not None else 0
        return (f"{day_tokens} tokens per day per end user (used {admission.user_tokens_used}, "
                f"this request needs up to {needs})")
    if reason is Reason.QUOTA_TOKENS:
        return (f"{policy.period_tokens} tokens per billing period (used {admission.tokens_used}, "
                f"this request needs up to {needs})")
    budget = policy.period_budget_micro_usd or 0
    return f"budget of {_usd(budget)} per billing period (spent {_usd(admission.micro_usd_used)})"
