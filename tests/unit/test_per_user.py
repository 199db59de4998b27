"""Per-user limits without services: policy, attribution, the day, headers,
refusal texts and the in-process limiter that stands in while Redis is away."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from gateway_shim.admission import Admission, Estimate, Reason
from gateway_shim.attribution import NO_ATTRIBUTION, attribution_of
from gateway_shim.end_users import MAX_END_USER_CHARS, day_of, end_user_limits
from gateway_shim.errors import BackendUnavailable, InvalidParameter
from gateway_shim.fail_modes import FailModes
from gateway_shim.keystore import KeyRecord
from gateway_shim.local_limiter import LocalLimiter
from gateway_shim.metering import RequestMeter
from gateway_shim.ratelimit_headers import ratelimit_headers
from gateway_shim.refusal_text import refusal
from gateway_shim.refusals import RefusalMemory
from quotameter.config import Tier, parse_config
from quotameter.errors import ConfigError
from quotameter.policy import LimitKind, end_user_digest, resolve

TIER = Tier(
    requests_per_minute=600, tokens_per_minute=100_000, upgrade_hint="Upgrade to Enterprise.",
    per_user={"requests_per_minute": 2, "tokens_per_minute": 1000, "tokens_per_day": 5000},
)
BASE = {"tiers": {"t": {}}}


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


def test_per_user_rules_are_kept_apart_and_made_concrete_per_end_user() -> None:
    policy = resolve("pro", TIER, "m")
    assert [r.name for r in policy.rates] == ["requests", "tokens"]
    assert [(r.name, r.scope, r.limit) for r in policy.user_rates] == [
        ("user-requests", "user", 2), ("user-tokens", "user", 1000)]
    digest = end_user_digest("alice@example.com")
    assert len(digest) == 32 and digest == end_user_digest("alice@example.com") != end_user_digest("bob")
    user = policy.end_user(digest)
    assert {r.scope for r in user.rates} == {f"user:{digest}"} and user.day_tokens == 5000
    assert policy.per_user and not resolve("free", Tier(), "m").per_user
    # Its kinds follow the tier's fail modes: the day quota as monthly_tokens.
    assert LimitKind.MONTHLY_TOKENS in resolve("x", Tier(per_user={"tokens_per_day": 1}), "m").configured_kinds()


def test_bad_per_user_config_names_its_path() -> None:
    for bad, path in (
        ({"per_user": {"requests_per_minute": 0}}, "tiers.t.per_user.requests_per_minute"),
        ({"per_user": {"tokens_per_month": 5}}, "tiers.t.per_user.tokens_per_month"),
        ({"per_user": {"require_user": "perhaps"}}, "tiers.t.per_user.require_user"),
    ):
        with pytest.raises(ConfigError, match=path.replace(".", r"\.")):
            parse_config({"tiers": {"t": bad}})


def test_the_end_user_comes_from_the_body_then_the_header() -> None:
    config = parse_config(BASE)
    assert attribution_of({}, {"user": "a", "safety_identifier": "b"}, config).end_user == "a"
    assert attribution_of({}, {"safety_identifier": "b"}, config).end_user == "b"
    assert attribution_of({"X-Quotameter-User": "h"}, {"user": 7}, config).end_user == "h"
    assert attribution_of({}, {"user": ""}, config) is NO_ATTRIBUTION
    assert attribution_of({}, None, config) is NO_ATTRIBUTION


def test_which_requests_are_held_to_per_user_limits() -> None:
    policy = resolve("pro", TIER, "m")
    meter = RequestMeter(route="/v1/chat/completions", upstream=None)
    assert end_user_limits(policy, None, meter) is None  # the customer's limits only
    assert end_user_limits(resolve("free", Tier(), "m"), "alice", meter) is None
    assert end_user_limits(policy, "u" * MAX_END_USER_CHARS, meter) is not None
    with pytest.raises(InvalidParameter) as too_long:
        end_user_limits(policy, "u" * (MAX_END_USER_CHARS + 1), meter)
    assert too_long.value.param == "user" and meter.reason == "user_too_long"
    strict = resolve("strict", Tier(per_user={"require_user": True}), "m")
    with pytest.raises(InvalidParameter) as anonymous:
        end_user_limits(strict, None, meter)
    assert anonymous.value.code == "missing_required_parameter" and meter.reason == "user_required"


def test_a_day_is_a_calendar_day_in_the_billing_zone() -> None:
    assert day_of("UTC", _ms("2026-03-08T23:59:59+00:00")) == (
        "2026-03-08", _ms("2026-03-08T00:00:00+00:00"), _ms("2026-03-09T00:00:00+00:00"))
    # Daylight saving starts in New York on March 8, 2026: a day of 23 hours.
    name, start, end = day_of("America/New_York", _ms("2026-03-08T12:00:00-04:00"))
    assert name == "2026-03-08" and end - start == 23 * 3_600_000
    assert end == _ms("2026-03-09T00:00:00-04:00")
    name, start, end = day_of("America/New_York", _ms("2026-11-01T23:30:00-05:00"))
    assert name == "2026-11-01" and end - start == 25 * 3_600_000


def _admission(reason: Reason, rule: int, rates: tuple, tokens_used: int = 0, retry_ms: int = 3000) -> Admission:
    policy = resolve("pro", TIER, "m")
    return Admission(reason is Reason.NONE, False, reason, retry_ms, False, 100, rule, 0, 0, (), rates, policy,
                     user=policy.end_user(end_user_digest("alice")), user_tokens_used=tokens_used)


def test_headers_are_the_tighter_of_customer_and_end_user() -> None:
    admission = _admission(Reason.NONE, 0, ((590, 100), (99_000, 600), (1, 30_000), (880, 7200)), 1200)
    headers = ratelimit_headers(admission, period_s=2_592_000, period_left_ms=86_400_000, day_left_ms=3_600_000)
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("2", "1")
    assert headers["x-ratelimit-reset-requests"] == "30s"
    assert (headers["x-ratelimit-limit-tokens"], headers["x-ratelimit-remaining-tokens"]) == ("1000", "880")
    assert headers["RateLimit-Policy"] == (
        '"requests";q=600;w=60, "tokens";q=100000;w=60;qu="tokens", "user-requests";q=2;w=60, '
        '"user-tokens";q=1000;w=60;qu="tokens", "user-day-tokens";q=5000;w=86400;qu="tokens"')
    assert headers["RateLimit"].endswith('"user-tokens";r=880;t=8, "user-day-tokens";r=3800;t=3600')
    # The customer tighter than the end user: the customer's numbers.
    admission = _admission(Reason.NONE, 0, ((0, 100), (99_000, 600), (1, 30_000), (880, 7200)))
    assert ratelimit_headers(admission, 1, 1)["x-ratelimit-limit-requests"] == "600"


def test_refusals_name_the_end_user_limit_never_the_end_user() -> None:
    estimate = Estimate(11, 100, 0, "0")
    rates = ((590, 100), (99_000, 600), (0, 30_000), (880, 7200))
    text = refusal(_admission(Reason.USER_REQUESTS, 3, rates), 3000, estimate, 0)
    assert text.message == ("Pro tier per-user limit exceeded: 2 requests per minute per end user (used 2). "
                            "Please retry after 3s. Upgrade to Enterprise.")
    assert (text.status, text.code, text.reason, text.error_type) == (429, "rate_limit_exceeded",
                                                                      "user_rate_limit_requests", "requests")
    day_end = _ms("2026-12-02T00:00:00+00:00")
    quota = refusal(_admission(Reason.USER_QUOTA_TOKENS, 0, rates, tokens_used=4950), 60_000, estimate, day_end)
    assert quota.message == ("Pro tier per-user limit exceeded: 5000 tokens per day per end user (used 4950, this "
                             "request needs up to 111). The end user's quota resets at 2026-12-02 00:00 UTC. "
                             "Upgrade to Enterprise.")
    assert (quota.status, quota.code, quota.reason, quota.retry_after_s) == (429, "rate_limit_exceeded",
                                                                             "user_quota_tokens", 60)
    never = refusal(_admission(Reason.USER_TOKENS, 4, rates, retry_ms=-1), -1, Estimate(11, 2000, 0, "0"), 0)
    assert "per-user limit exceeded: 1000 tokens per minute per end user" in never.message
    assert "can ever admit" in never.message and never.retry_after_s is None
    assert never.reason == "user_rate_limit_tokens" and "alice" not in never.message + quota.message + text.message


def test_the_local_limiter_holds_each_end_user_to_its_rates_while_redis_is_away() -> None:
    policy = resolve("pro", TIER, "m")
    key = KeyRecord("k1", "app", "pro", False)
    alice, bob = (policy.end_user(end_user_digest(name)) for name in ("alice", "bob"))
    limiter, estimate, now = LocalLimiter(), Estimate(10, 10, 0, "0"), 1_000_000
    assert [limiter.admit(key, policy, f"a{i}", now, estimate, alice).admitted for i in range(3)] == [True, True, False]
    refused = limiter.admit(key, policy, "a3", now, estimate, alice)
    assert refused.reason is Reason.USER_REQUESTS and refused.refused_rule().name == "user-requests"
    assert limiter.admit(key, policy, "b0", now, estimate, bob).admitted
    assert limiter.admit(key, policy, "c0", now, estimate).admitted  # no end user: the customer's rates only
    assert limiter.admit(key, policy, "a4", now + 30_000, estimate, alice).admitted  # one frees every 30 s


def test_a_remembered_customer_refusal_carries_no_end_user_state() -> None:
    """Answered from memory to every end user of the customer: never another's numbers."""
    memory = RefusalMemory()
    refused = _admission(Reason.REQUESTS, 1, ((0, 100), (99_000, 600), (1, 30_000), (880, 7200)), 1200)
    memory.remember("app", refused)
    recalled, _ = memory.recall("app", ("rate:",))
    assert recalled.user is None and recalled.rates == ((0, 100), (99_000, 600))
    assert "user-" not in ratelimit_headers(recalled, 1, 1)["RateLimit"]


def test_while_redis_is_away_per_user_limits_follow_their_kinds_fail_mode() -> None:
    key, estimate = KeyRecord("k1", "app", "pro", False), Estimate(10, 10, 0, "0")
    modes, meter = FailModes(), RequestMeter(route="/v1/chat/completions", upstream=None)
    policy = resolve("pro", TIER, "m")
    alice = policy.end_user(end_user_digest("alice"))
    decisions = [modes.admit(key, policy, f"e{i}", 1_000_000, estimate, meter, alice) for i in range(3)]
    assert [d.admitted for d in decisions] == [True, True, False] and decisions[2].reason is Reason.USER_REQUESTS
    # The day quota fails as monthly_tokens does: closed refuses while Redis is away.
    closed = resolve("c", Tier(per_user={"tokens_per_day": 5}, fail_modes={"monthly_tokens": "closed"}), "m")
    with pytest.raises(BackendUnavailable, match="monthly_tokens"):
        modes.admit(key, closed, "e9", 1_000_000, estimate, meter, closed.end_user(end_user_digest("alice")))
