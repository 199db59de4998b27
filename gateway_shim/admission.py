"""Admission: every check and the reservation in one Lua script, one Redis
round trip per request; settlement in one more, after the response.

Redis Cluster: every key a script touches carries the ``{customer}`` hash
tag, so each script runs on the primary owning that customer's slot. The key's
revoked flag is read from its mirror in the customer's slot
(``{p}:revoked:{customer}``), not from the key's own hash (another slot).
A key created before that mirror existed has no entry in it: the script says
so (status -2), the admitter copies the flag of the key's record over (HSETNX:
a revocation written meanwhile wins) and asks again, once per such key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING

import redis.asyncio as aioredis

from gateway_shim.keystore import KeyRecord
from gateway_shim.resp import Script, ScriptPipe, encode_args
from quotameter.config import RateAlgorithm, TokenCount
from quotameter.policy import EndUser, LimitKind, Policy, RateRule, Unit
from quotameter.redis_keys import RedisKeys

if TYPE_CHECKING:
    from gateway_shim.cluster_pipe import ClusterScriptPipe

WINDOW_MS = 60_000
_ADMIT = (Path(__file__).parent / "admission.lua").read_text()
_SETTLE = (Path(__file__).parent / "settle.lua").read_text()
_COUNTS = {TokenCount.INPUT: 1, TokenCount.OUTPUT: 2, TokenCount.TOTAL: 3}
MIN_OUTPUT_TOKENS = 1  # a request cut to fit is admitted with at least this many


class Reason(IntEnum):
    NONE = 0
    REQUESTS = 1
    TOKENS = 2
    CONCURRENCY = 3
    QUOTA_TOKENS = 4
    QUOTA_BUDGET = 5
    TOO_LARGE = 6
    USER_QUOTA_TOKENS = 7  # the end user's tokens of the day (per_user.tokens_per_day)
    USER_REQUESTS = 8
    USER_TOKENS = 9

    @property
    def code(self) -> str:
        return _REASON_CODES[self]

    @property
    def kind(self) -> LimitKind:
        return _REASON_KINDS[self]


_REASON_CODES = {
    Reason.NONE: "",
    Reason.REQUESTS: "rate_limit_requests",
    Reason.TOKENS: "rate_limit_tokens",
    Reason.CONCURRENCY: "concurrency",
    Reason.QUOTA_TOKENS: "quota_tokens",
    Reason.QUOTA_BUDGET: "quota_budget",
    Reason.TOO_LARGE: "rate_limit_tokens",
    Reason.USER_QUOTA_TOKENS: "user_quota_tokens",
    Reason.USER_REQUESTS: "user_rate_limit_requests",
    Reason.USER_TOKENS: "user_rate_limit_tokens",
}
_REASON_KINDS = {
    Reason.NONE: LimitKind.REQUESTS_PER_MINUTE,
    Reason.REQUESTS: LimitKind.REQUESTS_PER_MINUTE,
    Reason.TOKENS: LimitKind.TOKENS_PER_MINUTE,
    Reason.CONCURRENCY: LimitKind.CONCURRENT_REQUESTS,
    Reason.QUOTA_TOKENS: LimitKind.MONTHLY_TOKENS,
    Reason.QUOTA_BUDGET: LimitKind.MONTHLY_BUDGET_USD,
    Reason.TOO_LARGE: LimitKind.TOKENS_PER_MINUTE,
    Reason.USER_QUOTA_TOKENS: LimitKind.MONTHLY_TOKENS,
    Reason.USER_REQUESTS: LimitKind.REQUESTS_PER_MINUTE,
    Reason.USER_TOKENS: LimitKind.TOKENS_PER_MINUTE,
}
_RATE_REASONS = (Reason.REQUESTS, Reason.TOKENS, Reason.TOO_LARGE, Reason.USER_REQUESTS, Reason.USER_TOKENS)


@dataclass(frozen=True, slots=True)
class Estimate:
    """The worst case of one request, as admission reserves it."""

    input_tokens: int
    output_tokens: int
    input_micro_usd: int  # the input's cost, rounded up
    output_rate: str  # micro-USD per output token (= USD per 1M tokens), exact decimal text
    cuttable: bool = False  # no explicit max_tokens and the tier cuts: may shrink to fit
    # The fallback model's input cost and output rate, with its budget (budget + extra).
    fallback_budget_micro_usd: int = -1
    fallback_input_micro_usd: int = 0
    fallback_output_rate: str = "0"
    # input_tokens is the body's size, not its count (a bound: see estimates.py)
    bounded: bool = False


@dataclass(frozen=True, slots=True)
class Admission:
    admitted: bool
    revoked: bool
    reason: Reason
    retry_after_ms: int  # refused: the true time until admission; -1 never
    fallback: bool  # served by the tier's fallback model
    output_tokens: int  # the output reserved (less than asked when cut to fit)
    rule: int  # 1-based index of the refusing rate rule or concurrency set
    tokens_used: int  # period tokens: totals + reservations (this one too, if admitted)
    micro_usd_used: int
    in_flight: tuple[int, ...]
    rates: tuple[tuple[int, int], ...]  # per rule of ``rules``: (remaining, reset_ms)
    policy: Policy
    local: bool = False  # decided by the in-process limiter (Redis unreachable)
    user: EndUser | None = None  # the end user held to the policy's per-user limits
    user_tokens_used: int = 0  # the end user's tokens of the day (this one too, if admitted)

    @property
    def rules(self) -> tuple[RateRule, ...]:
        """The rate rules checked: the policy's, then the end user's."""
        return self.policy.rates if self.user is None else (*self.policy.rates, *self.user.rates)

    def refused_rule(self) -> RateRule | None:
        if self.reason in _RATE_REASONS and self.rule:
            return self.rules[self.rule - 1]
        return None


def format_duration(ms: int) -> str:
    """A duration as OpenAI writes it in x-ratelimit-reset-*: ``20ms``, ``8.571s``, ``1m0s``."""
    if ms < 1000:
        return f"{max(ms, 0)}ms"
    minutes, rest_ms = divmod(ms, 60_000)
    seconds = f"{rest_ms / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


def rule_cost(rule: RateRule, input_tokens: int, output_tokens: int) -> int:
    if rule.unit is Unit.REQUESTS:
        return 1
    if rule.counts is TokenCount.INPUT:
        return input_tokens
    if rule.counts is TokenCount.OUTPUT:
        return output_tokens
    return input_tokens + output_tokens


@dataclass(slots=True)
class _Layout:
    """The keys and the constant arguments of one (customer, key, policy): built once."""

    keys: list[str]
    limits_argv: list[int | str]
    settle_keys: list[str]
    settle_rules: list[tuple[int, RateRule]]  # token rules: (algorithm code, rule)
    user_settle_rules: list[tuple[int, RateRule]]  # the end user's token rules (scope "user")
    reserving: bool
    needs_settle: bool = field(default=False)
    # The same, RESP-encoded once for the pipelined path (gateway_shim/resp.py).
    keys_resp: bytes = b""
    limits_resp: bytes = b""
    settle_keys_resp: bytes = b""


class Admitter:
    """``pipe``: run the two scripts over one auto-pipelined connection
    (gateway_shim/resp.py) instead of redis-py's pool; same scripts, same
    replies, same exceptions."""

    def __init__(self, client: aioredis.Redis, names: RedisKeys, pipe: ScriptPipe | ClusterScriptPipe | None = None) -> None:
        self._names = names
        self._client = client
        # register_script: EVALSHA, loading the script again after a Redis restart.
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._pipe = pipe
        self._admit_script = Script(_ADMIT)
        self._settle_script = Script(_SETTLE)
        self._layouts: dict[tuple[str, str, str, int, bool], _Layout] = {}

    def _layout(self, key: KeyRecord, policy: Policy, period: str, user: bool = False) -> _Layout:
        """``user``: with the policy's per-user rules, whose keys each call adds (_user_keys)."""
        cache_key = (key.customer, key.key_id, period, id(policy), user)
        layout = self._layouts.get(cache_key)
        if layout is not None:
            return layout
        n, c = self._names, key.customer
        head = [n.usage(c, period), n.pending(c, period), n.pending_expiry(c, period), n.reserved(c, period)]
        flights = [n.in_flight(c, rule.scope) for rule in policy.concurrency]
        rates = [n.rate(c, r.unit.value, r.scope, r.algorithm is RateAlgorithm.SLIDING_WINDOW) for r in policy.rates]
        user_rules = policy.user_rates if user else ()
        argv: list[int | str] = [
            len(policy.concurrency), *(rule.limit for rule in policy.concurrency), len(policy.rates) + len(user_rules)
        ]
        for rule in (*policy.rates, *user_rules):
            algorithm = 0 if rule.algorithm is RateAlgorithm.GCRA else 1
            counts = 0 if rule.unit is Unit.REQUESTS else _COUNTS[rule.counts]
            argv += [algorithm, rule.limit, rule.window_ms, counts]
        day_quota = policy.user_day_tokens if user and policy.user_day_tokens is not None else -1
        argv += [len(user_rules), day_quota]
        user_token_rules = [(0 if r.algorithm is RateAlgorithm.GCRA else 1, r) for r in user_rules if r.unit is Unit.TOKENS]
        token_rules = [(0 if r.algorithm is RateAlgorithm.GCRA else 1, r) for r in policy.rates if r.unit is Unit.TOKENS]
        token_keys = [n.rate(c, r.unit.value, r.scope, a == 1) for a, r in token_rules]
        layout = _Layout(
            keys=[n.revoked(c), *head, *flights, *rates],
            limits_argv=argv,
            settle_keys=[head[1], head[2], head[3], *flights, *token_keys],
            settle_rules=token_rules,
            user_settle_rules=user_token_rules,
            reserving=policy.reserves,
        )
        layout.needs_settle = (layout.reserving or bool(flights) or bool(token_rules) or bool(user_token_rules)
                               or day_quota >= 0)
        layout.keys_resp = encode_args(layout.keys)
        layout.limits_resp = encode_args(layout.limits_argv)
        layout.settle_keys_resp = encode_args(layout.settle_keys)
        if len(self._layouts) > 50_000:
            self._layouts.clear()
        self._layouts[cache_key] = layout
        return layout

    def _user_keys(self, customer: str, user: EndUser, day: str) -> tuple[list[str], list[str]]:
        """The end user's keys: for admission (its rate state, then its day's tokens),
        and for the settle (its token rates, then its day's tokens)."""
        n = self._names
        rates = [n.rate(customer, r.unit.value, r.scope, r.algorithm is RateAlgorithm.SLIDING_WINDOW)
                 for r in user.rates]
        tokens = [k for k, r in zip(rates, user.rates, strict=True) if r.unit is Unit.TOKENS]
        if user.day_tokens is not None:
            day_key = n.user_day_tokens(customer, user.digest, day)
            return [*rates, day_key], [*tokens, day_key]
        return rates, tokens

    def _settle_plan(
        self, key: KeyRecord, policy: Policy, period: str, user: EndUser | None, day: str
    ) -> tuple[_Layout, list[str], list[tuple[int, int, int, int]]]:
        """The settle's keys and token rules (algorithm, limit, window ms, counts code),
        the end user's included; the day's token counter is a rule of algorithm 2."""
        layout = self._layout(key, policy, period, user is not None)
        rules = [(a, r.limit, r.window_ms, _counts(r)) for a, r in (*layout.settle_rules, *layout.user_settle_rules)]
        if user is None:
            return layout, layout.settle_keys, rules
        _, user_keys = self._user_keys(key.customer, user, day)
        if user.day_tokens is not None:
            rules.append((2, user.day_tokens, 0, 3))
        return layout, [*layout.settle_keys, *user_keys], rules

    async def admit(
        self,
        key: KeyRecord,
        policy: Policy,
        period: str,
        period_end_ms: int,
        event_id: str,
        now_ms: int,
        estimate: Estimate,
        reservation_ttl_ms: int,
        concurrency_limits: list[int] | None = None,
        user: EndUser | None = None,
        day: tuple[str, int] = ("", 0),
    ) -> Admission:
        """``user``: the request's end user, held to the policy's per-user limits;
        ``day``: the name and end (ms) of the day its day quota counts."""
        request = (key, policy, period, period_end_ms, event_id, now_ms, estimate, reservation_ttl_ms,
                   concurrency_limits, user, day)
        reply = await self._admit_once(*request)
        if int(reply[0]) == -2:  # a key from before the per-customer flags: copy its flag, ask again
            await self._client.hsetnx(self._names.revoked(key.customer), key.key_id, 1 if key.revoked else 0)
            reply = await self._admit_once(*request)
        return self._admission(reply, policy, user)

    async def _admit_once(
        self,
        key: KeyRecord,
        policy: Policy,
        period: str,
        period_end_ms: int,
        event_id: str,
        now_ms: int,
        estimate: Estimate,
        reservation_ttl_ms: int,
        concurrency_limits: list[int] | None,
        user: EndUser | None,
        day: tuple[str, int],
    ) -> list:
        layout = self._layout(key, policy, period, user is not None)
        keys, keys_resp = layout.keys, layout.keys_resp
        if user is not None:
            user_keys, _ = self._user_keys(key.customer, user, day[0])
            keys, keys_resp = [*keys, *user_keys], keys_resp + encode_args(user_keys)
        argv = layout.limits_argv
        if concurrency_limits is not None:  # batch traffic: fewer slots than interactive
            argv = [argv[0], *concurrency_limits, *argv[1 + len(concurrency_limits):]]
        args = [
            now_ms,
            event_id,
            now_ms + reservation_ttl_ms,
            period_end_ms,
            -1 if policy.period_tokens is None else policy.period_tokens,
            -1 if policy.period_budget_micro_usd is None else policy.period_budget_micro_usd,
            estimate.input_tokens,
            estimate.output_tokens,
            estimate.input_micro_usd,
            estimate.output_rate,
            1 if estimate.cuttable else 0,
            MIN_OUTPUT_TOKENS,
            estimate.fallback_budget_micro_usd,
            estimate.fallback_input_micro_usd,
            estimate.fallback_output_rate,
        ]
        if self._pipe is not None:
            limits = layout.limits_resp if concurrency_limits is None else encode_args(argv)
            return await self._pipe.evalsha(
                self._admit_script, len(keys), keys_resp,
                encode_args(args) + limits + encode_args([day[1], key.key_id]),
                len(keys) + len(args) + len(argv) + 2, slot_key=keys[0],
            )
        return await self._admit(keys=keys, args=[*args, *argv, day[1], key.key_id])

    @staticmethod
    def _admission(reply: list, policy: Policy, user: EndUser | None) -> Admission:
        status = int(reply[0])
        nc = len(policy.concurrency)
        rest = list(map(int, reply[8 + nc:-1]))
        return Admission(
            admitted=status == 1,
            revoked=status < 0,
            reason=Reason(int(reply[1])),
            retry_after_ms=int(reply[2]),
            fallback=int(reply[3]) == 1,
            output_tokens=int(reply[4]),
            rule=int(reply[5]),
            tokens_used=int(reply[6]),
            micro_usd_used=int(reply[7]),
            in_flight=tuple(map(int, reply[8:8 + nc])),
            rates=tuple(zip(rest[::2], rest[1::2], strict=True)) if rest else (),
            policy=policy,
            user=user,
            user_tokens_used=int(reply[-1]),
        )

    def needs_settle(self, key: KeyRecord, policy: Policy, period: str, user: EndUser | None = None) -> bool:
        return self._layout(key, policy, period, user is not None).needs_settle

    async def settle(
        self,
        key: KeyRecord,
        policy: Policy,
        period: str,
        event_id: str,
        now_ms: int,
        *,
        reserved: tuple[int, int],
        used: tuple[int, int],
        used_micro_usd: int,
        settled_ttl_ms: int,
        user: EndUser | None = None,
        day: str = "",
    ) -> None:
        """Replace the reservation with the true usage; free the request's slots;
        give token rates (and the end user's day) back what the worst case
        over-charged. ``reserved`` and ``used`` are (input, output) tokens."""
        layout, keys, rules = self._settle_plan(key, policy, period, user, day)
        if not layout.needs_settle:
            return
        keys_resp = layout.settle_keys_resp if user is None else encode_args(keys)
        await self._run_settle(keys, keys_resp, [
            event_id,
            sum(used),
            used_micro_usd,
            now_ms + settled_ttl_ms,
            1 if layout.reserving else 0,
            now_ms,
            len(policy.concurrency),
            len(rules),
            *_give_backs(rules, reserved, used),
        ])

    def settle_context(
        self, key: KeyRecord, policy: Policy, period: str, reserved: tuple[int, int],
        user: EndUser | None = None, day: str = "",
    ) -> SettleContext | None:
        """What a settle of this admission needs, for a process without its ticket
        (gateway_shim/check_tickets.py); None when it holds nothing to settle."""
        layout, keys, rules = self._settle_plan(key, policy, period, user, day)
        if not layout.needs_settle:
            return None
        return SettleContext(list(keys), layout.reserving, len(policy.concurrency), rules, reserved)

    async def settle_reported(
        self, context: SettleContext, event_id: str, now_ms: int, *, used: tuple[int, int], used_micro_usd: int,
        settled_ttl_ms: int,
    ) -> None:
        """Settle from a usage report: as ``settle``, except that an entry already
        gone (expired, or released by the pipeline) is left gone."""
        await self._run_settle(context.keys, encode_args(context.keys), [
            event_id,
            sum(used),
            used_micro_usd,
            now_ms + settled_ttl_ms,
            2 if context.reserving else 0,
            now_ms,
            context.concurrency,
            len(context.rules),
            *_give_backs(context.rules, context.reserved, used),
        ])

    async def _run_settle(self, keys: list[str], keys_resp: bytes, argv: list[int | str]) -> None:
        if self._pipe is not None:
            await self._pipe.evalsha(
                self._settle_script, len(keys), keys_resp, encode_args(argv), len(keys) + len(argv), slot_key=keys[0],
            )
        else:
            await self._settle(keys=keys, args=argv)


@dataclass(frozen=True, slots=True)
class SettleContext:
    """The settle script's keys and constants of one admission, kept in Redis by
    the check endpoint: the report that settles it may reach another process."""

    keys: list[str]
    reserving: bool
    concurrency: int  # how many of ``keys`` after the first three are concurrency sets
    rules: list[tuple[int, int, int, int]]  # token rules and counters: (algorithm, limit, window ms, counts code)
    reserved: tuple[int, int]  # (input, output) tokens reserved


def _counts(rule: RateRule) -> int:
    return _COUNTS[rule.counts]


def _give_backs(
    rules: list[tuple[int, int, int, int]], reserved: tuple[int, int], used: tuple[int, int]
) -> list[int | str]:
    """Per token rule: algorithm, limit, window, and what the worst case over-charged."""
    argv: list[int | str] = []
    for algorithm, limit, window_ms, counts in rules:
        argv += [algorithm, limit, window_ms, _count(counts, *reserved) - _count(counts, *used)]
    return argv


def _count(counts: int, input_tokens: int, output_tokens: int) -> int:
    return input_tokens if counts == 1 else output_tokens if counts == 2 else input_tokens + output_tokens
