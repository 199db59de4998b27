"""The in-process limiter's period quota and budget while Redis is away:
from the last usage Redis reported, plus what this process admitted since."""

from __future__ import annotations

from gateway_shim.admission import Estimate, Reason
from gateway_shim.keystore import KeyRecord
from gateway_shim.local_limiter import LocalLimiter
from quotameter.config import Tier
from quotameter.policy import resolve

PERIOD, END_MS, NOW_MS = ("2026-12", 2_000_000_000_000, 1_000_000_000_000)
KEY = KeyRecord("k1", "acme", "t", False)


def policy(**limits: object):
    return resolve("t", Tier(**limits), "mock-small", None, "k1", None)


def ask(limiter: LocalLimiter, p, n: int, tokens: tuple[int, int] = (10, 5), micro: tuple[int, str] = (3, "2")):
    return limiter.admit(KEY, p, f"e{n}", NOW_MS, Estimate(*tokens, *micro), None, (PERIOD, END_MS))


def test_tokens_count_from_the_last_view_and_settle_to_the_true_usage() -> None:
    limiter, p = LocalLimiter(), policy(monthly_tokens=100)
    limiter.saw("acme", PERIOD, 60, 0)
    first = ask(limiter, p, 1)
    assert first.admitted and first.tokens_used == 75
    second = ask(limiter, p, 2)
    assert second.admitted and second.tokens_used == 90
    refused = ask(limiter, p, 3)  # 90 + 15 > 100
    assert not refused.admitted and refused.reason is Reason.QUOTA_TOKENS
    assert refused.retry_after_ms == END_MS - NOW_MS and refused.tokens_used == 90
    limiter.settle("e1", 5, 0)  # the first used 5 of its 15: 60 + 5 + 15 = 80
    assert ask(limiter, p, 4).tokens_used == 95
    assert not ask(limiter, p, 5).admitted


def test_the_budget_counts_micro_usd_rounded_up() -> None:
    limiter, p = LocalLimiter(), policy(monthly_budget_usd="0.000020")
    limiter.saw("acme", PERIOD, 0, 4)
    admitted = 0
    while ask(limiter, p, admitted).admitted:  # 3 + 5 × 2 = 13 micro-USD each
        admitted += 1
    assert admitted == 1  # 4 + 13 = 17; 17 + 13 > 20


def test_recovery_drops_the_local_counts_and_another_period_starts_from_zero() -> None:
    limiter, p = LocalLimiter(), policy(monthly_tokens=30)
    limiter.saw("acme", PERIOD, 15, 0)
    assert ask(limiter, p, 1).admitted and not ask(limiter, p, 2).admitted
    limiter.recovered()
    limiter.settle("e1", 15, 0)  # ended after Redis came back: nothing left to correct
    assert ask(limiter, p, 3).admitted  # from the last view again
    other = limiter.admit(KEY, p, "e4", NOW_MS, Estimate(10, 5, 3, "2"), None, ("2027-01", END_MS))
    assert other.admitted and other.tokens_used == 15
