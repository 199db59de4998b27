"""Rate-limit headers on every answer once admission ran.

OpenAI's ``x-ratelimit-{limit,remaining,reset}-{requests,tokens}`` (for each
unit, the rule with the least left), and the IETF fields of
draft-ietf-httpapi-ratelimit-headers-10: ``RateLimit-Policy`` (a list of
quota policies: a quoted name with ``q`` quota, ``w`` window seconds and
``qu`` quota unit) and ``RateLimit`` (the same names with ``r`` remaining
and ``t`` seconds until the quota resets). Token policies carry
``qu="tokens"``; concurrency ``qu="concurrent-requests"`` (a registered
unit); the period budget ``qu="usd-micros"``.

A request held to per-user limits (a tier's ``per_user``, for the end user
it names) is answered with the tighter of the customer and the end user: the
OpenAI headers take, per unit, the rule with the least left among both
(``user-requests``, ``user-tokens`` are rules like the others), and the IETF
fields list the end user's policies too, with its day quota as
``"user-day-tokens"`` (``w=86400``, ``t`` until the day's end). A request
without an end user sees the customer's alone.
"""

from __future__ import annotations

import math
from functools import lru_cache

from gateway_shim.admission import Admission, format_duration
from quotameter.policy import Policy, Unit


@lru_cache(maxsize=4096)
def policy_field(policy: Policy, period_s: int, user: bool = False) -> str:
    """The ``RateLimit-Policy`` value: constant for a policy (with or without
    the end user's), so built once."""
    items = []
    for rule in (*policy.rates, *(policy.user_rates if user else ())):
        unit = ';qu="tokens"' if rule.unit is Unit.TOKENS else ""
        items.append(f'"{rule.name}";q={rule.limit};w={rule.window_ms // 1000}{unit}')
    for rule in policy.concurrency:
        name = "concurrency" if not rule.scope else "key-concurrency"
        items.append(f'"{name}";q={rule.limit};qu="concurrent-requests"')
    if policy.period_tokens is not None:
        items.append(f'"period-tokens";q={policy.period_tokens};w={period_s};qu="tokens"')
    if policy.period_budget_micro_usd is not None:
        items.append(f'"period-budget";q={policy.period_budget_micro_usd};w={period_s};qu="usd-micros"')
    if user and policy.user_day_tokens is not None:
        items.append(f'"user-day-tokens";q={policy.user_day_tokens};w=86400;qu="tokens"')
    return ", ".join(items)


def ratelimit_headers(admission: Admission, period_s: int, period_left_ms: int, day_left_ms: int = 0) -> dict[str, str]:
    policy, user = admission.policy, admission.user
    headers: dict[str, str] = {}
    live: list[str] = []
    tightest: dict[Unit, tuple[int, int, int]] = {}
    for rule, (remaining, reset_ms) in zip(admission.rules, admission.rates, strict=True):
        live.append(f'"{rule.name}";r={remaining};t={math.ceil(max(reset_ms, 0) / 1000)}')
        best = tightest.get(rule.unit)
        if best is None or remaining < best[1]:
            tightest[rule.unit] = (rule.limit, remaining, reset_ms)
    for unit, (limit, remaining, reset_ms) in tightest.items():
        headers[f"x-ratelimit-limit-{unit.value}"] = str(limit)
        headers[f"x-ratelimit-remaining-{unit.value}"] = str(remaining)
        headers[f"x-ratelimit-reset-{unit.value}"] = format_duration(reset_ms)
    for rule, in_flight in zip(policy.concurrency, admission.in_flight, strict=False):
        name = "concurrency" if not rule.scope else "key-concurrency"
        live.append(f'"{name}";r={max(rule.limit - in_flight, 0)};t=1')
    period_t = math.ceil(max(period_left_ms, 0) / 1000)
    if policy.period_tokens is not None:
        live.append(f'"period-tokens";r={max(policy.period_tokens - admission.tokens_used, 0)};t={period_t}')
    if policy.period_budget_micro_usd is not None:
        left = max(policy.period_budget_micro_usd - admission.micro_usd_used, 0)
        live.append(f'"period-budget";r={left};t={period_t}')
    if user is not None and user.day_tokens is not None:
        left = max(user.day_tokens - admission.user_tokens_used, 0)
        live.append(f'"user-day-tokens";r={left};t={math.ceil(max(day_left_ms, 0) / 1000)}')
    if live:
        headers["RateLimit-Policy"] = policy_field(policy, period_s, user is not None)
        headers["RateLimit"] = ", ".join(live)
    return headers
