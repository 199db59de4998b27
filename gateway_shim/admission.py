"""Admission: every check and the reservation in one Lua script, one Redis
round trip per request; settlement in one more, after the response.

Redis Cluster: all the customer's keys carry the ``{customer}`` hash tag and
share a slot; the API key's hash (read for revocation) does not, so on a
cluster the key's ``revoked`` flag must be mirrored under the customer's tag
(not needed on a single Redis or a primary with replicas, as deployed today).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import redis.asyncio as aioredis

from gateway_shim.keystore import KeyRecord
from gateway_shim.resp import Script, ScriptPipe, encode_args
from quotameter.config import RateAlgorithm, TokenCount
from quotameter.policy import LimitKind, Policy, RateRule, Unit
from quotameter.redis_keys import RedisKeys

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
}
_REASON_KINDS = {
    Reason.NONE: LimitKind.REQUESTS_PER_MINUTE,
    Reason.REQUESTS: LimitKind.REQUESTS_PER_MINUTE,
    Reason.TOKENS: LimitKind.TOKENS_PER_MINUTE,
    Reason.CONCURRENCY: LimitKind.CONCURRENT_REQUESTS,
    Reason.QUOTA_TOKENS: LimitKind.MONTHLY_TOKENS,
    Reason.QUOTA_BUDGET: LimitKind.MONTHLY_BUDGET_USD,
    Reason.TOO_LARGE: LimitKind.TOKENS_PER_MINUTE,
}


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
    rates: tuple[tuple[int, int], ...]  # per rate rule: (remaining, reset_ms)
    policy: Policy
    local: bool = False  # decided by the in-process limiter (Redis unreachable)

    def refused_rule(self) -> RateRule | None:
        if self.reason in (Reason.REQUESTS, Reason.TOKENS, Reason.TOO_LARGE) and self.rule:
            return self.policy.rates[self.rule - 1]
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

    def __init__(self, client: aioredis.Redis, names: RedisKeys, pipe: ScriptPipe | None = None) -> None:
        self._names = names
        # register_script: EVALSHA, loading the script again after a Redis restart.
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)
        self._pipe = pipe
        self._admit_script = Script(_ADMIT)
        self._settle_script = Script(_SETTLE)
        self._layouts: dict[tuple[str, str, str, int], _Layout] = {}

    def _layout(self, key: KeyRecord, policy: Policy, period: str) -> _Layout:
        cache_key = (key.customer, key.key_id, period, id(policy))
        layout = self._layouts.get(cache_key)
        if layout is not None:
            return layout
        n, c = self._names, key.customer
        head = [n.usage(c, period), n.pending(c, period), n.pending_expiry(c, period), n.reserved(c, period)]
        flights = [n.in_flight(c, rule.scope) for rule in policy.concurrency]
        rates = [n.rate(c, r.unit.value, r.scope, r.algorithm is RateAlgorithm.SLIDING_WINDOW) for r in policy.rates]
        argv: list[int | str] = [len(policy.concurrency), *(rule.limit for rule in policy.concurrency), len(policy.rates)]
        for rule in policy.rates:
            algorithm = 0 if rule.algorithm is RateAlgorithm.GCRA else 1
            counts = 0 if rule.unit is Unit.REQUESTS else _COUNTS[rule.counts]
            argv += [algorithm, rule.limit, rule.window_ms, counts]
        token_rules = [(0 if r.algorithm is RateAlgorithm.GCRA else 1, r) for r in policy.rates if r.unit is Unit.TOKENS]
        token_keys = [n.rate(c, r.unit.value, r.scope, a == 1) for a, r in token_rules]
        layout = _Layout(
            keys=[n.api_key(key.key_id), *head, *flights, *rates],
            limits_argv=argv,
            settle_keys=[head[1], head[2], head[3], *flights, *token_keys],
            settle_rules=token_rules,
            reserving=policy.reserves,
        )
        layout.needs_settle = layout.reserving or bool(flights) or bool(token_rules)
        layout.keys_resp = encode_args(layout.keys)
        layout.limits_resp = encode_args(layout.limits_argv)
        layout.settle_keys_resp = encode_args(layout.settle_keys)
        if len(self._layouts) > 50_000:
            self._layouts.clear()
        self._layouts[cache_key] = layout
        return layout

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
    ) -> Admission:
        layout = self._layout(key, policy, period)
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
            reply = await self._pipe.evalsha(
                self._admit_script, len(layout.keys), layout.keys_resp, encode_args(args) + limits,
                len(layout.keys) + len(args) + len(argv),
            )
        else:
            reply = await self._admit(keys=layout.keys, args=[*args, *argv])
        status = int(reply[0])
        nc = len(policy.concurrency)
        rest = list(map(int, reply[8 + nc:]))
        return Admission(
            admitted=status == 1,
            revoked=status == -1,
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
        )

    def needs_settle(self, key: KeyRecord, policy: Policy, period: str) -> bool:
        return self._layout(key, policy, period).needs_settle

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
    ) -> None:
        """Replace the reservation with the true usage; free the request's slots;
        give token rates back what the worst case over-charged. ``reserved`` and
        ``used`` are (input, output) tokens."""
        layout = self._layout(key, policy, period)
        if not layout.needs_settle:
            return
        await self._run_settle(layout.settle_keys, layout.settle_keys_resp, [
            event_id,
            sum(used),
            used_micro_usd,
            now_ms + settled_ttl_ms,
            1 if layout.reserving else 0,
            now_ms,
            len(policy.concurrency),
            len(layout.settle_rules),
            *_give_backs([(a, r.limit, r.window_ms, _counts(r)) for a, r in layout.settle_rules], reserved, used),
        ])

    def settle_context(self, key: KeyRecord, policy: Policy, period: str, reserved: tuple[int, int]) -> SettleContext | None:
        """What a settle of this admission needs, for a process without its ticket
        (gateway_shim/check_tickets.py); None when it holds nothing to settle."""
        layout = self._layout(key, policy, period)
        if not layout.needs_settle:
            return None
        rules = [(a, r.limit, r.window_ms, _counts(r)) for a, r in layout.settle_rules]
        return SettleContext(list(layout.settle_keys), layout.reserving, len(policy.concurrency), rules, reserved)

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
                self._settle_script, len(keys), keys_resp, encode_args(argv), len(keys) + len(argv),
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
    rules: list[tuple[int, int, int, int]]  # token rules: (algorithm, limit, window ms, counts code)
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
