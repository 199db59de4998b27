"""``GET /v1/usage``: a customer's period usage and what is left of their quota.

    GET /v1/usage[?period=YYYY-MM]              with the customer's own API key
    GET /v1/usage?customer=ID[&period=YYYY-MM]  with the admin token (shim.admin_token)
    GET /v1/usage?start_time=S[&bucket_width=1h&group_by=user,tag:team…]   history

A key reads its own customer only: asking for another customer is a 403,
and nothing in the answer names any other customer or any key. The admin
token is compared in constant time and is never a customer key. A wrong key
or token counts against the client's address like the proxy's (429 past
``shim.auth_failures_per_minute``, gateway_shim/auth_failures.py).

With ``start_time``, the answer is the ledger's history instead, in time
buckets and grouped by model, key, end user, project or tag
(gateway_shim/usage_history.py), under the same access rules.

Usage is the pipeline's period totals in Redis (authoritative, a batch
behind at most) plus the reservations the shim holds for requests not yet in
them; ``remaining`` is what admission would see: the quota or budget minus
both, never below zero (null: unlimited).
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from aiohttp import web

from gateway_shim import usage_history
from gateway_shim.auth import Authenticator, bearer_token
from gateway_shim.auth_failures import AuthFailures, shared
from gateway_shim.errors import (
    BackendBusy,
    ShimError,
    UsageBadRequest,
    UsageForbidden,
    UsageNotFound,
    error_response,
    quota_backend_down,
)
from quotameter.aggregate import format_usd
from quotameter.config import Config
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import RedisPoolExhausted, redis_client

_MICRO = Decimal(1_000_000)
_INT_FIELDS = ("requests", "refused", "input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "events")


class UsageApi:
    def __init__(self, config: Config, client: aioredis.Redis, failures: AuthFailures | None = None) -> None:
        self.config = config
        self.client = client
        self.names = RedisKeys(config.services.redis_prefix)
        # No cache: a revoked key stops reading at once.
        self.auth = Authenticator(client, self.names, ttl_s=0.0, failures=failures)
        token = config.shim.admin_token.get_secret_value() if config.shim.admin_token else ""
        self._admin = token.encode() if token else None

    def _is_admin(self, authorization: str | None) -> bool:
        token = bearer_token(authorization)
        return self._admin is not None and token is not None and hmac.compare_digest(token.encode(), self._admin)

    async def handle(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(await self._answer(request))
        except ShimError as exc:
            return error_response(exc)
        except RedisPoolExhausted:
            return error_response(BackendBusy("The quota service is busy. Please retry shortly."))
        except redis.exceptions.RedisError as exc:
            return error_response(quota_backend_down(exc))

    async def _answer(self, request: web.Request) -> dict[str, Any]:
        asked = request.query.get("customer") or None
        calendar = self.config.billing.calendar
        history = "start_time" in request.query  # the ledger's buckets (usage_history.py), not period totals
        period = request.query.get("period") or calendar.current(datetime.now(UTC))
        try:
            start, end = calendar.bounds(period)
        except ValueError as exc:
            if not history:
                raise UsageBadRequest(str(exc)) from None
        authorization = request.headers.get("Authorization")
        client = self.auth.client_of(request)
        self.auth.failures.check(client)  # before the admin token is compared, too
        if self._is_admin(authorization):
            if asked is None:
                raise UsageBadRequest("The admin token reads one customer at a time: add ?customer=ID.")
            customer = asked
            tier = await self.client.hget(self.names.customer(customer), "tier")
            tier = tier.decode() if isinstance(tier, bytes) else tier
        else:
            key = await self.auth.authenticate(authorization, client)  # InvalidApiKey: 401, counted
            if asked is not None and asked != key.customer:
                raise UsageForbidden("This API key can only read its own customer's usage.")
            customer, tier = key.customer, key.tier
        if history:
            return await usage_history.history(self.config, customer, request.query)
        totals, held = await self._state(customer, period)
        if tier is None and not totals:
            raise UsageNotFound(f"No customer {customer!r} is known to this gateway.")
        return self._document(customer, tier, period, start, end, totals, held)

    async def _state(self, customer: str, period: str) -> tuple[dict[str, str], dict[str, str]]:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.names.usage(customer, period))
            pipe.hgetall(self.names.reserved(customer, period))
            totals, held = await pipe.execute()
        decode = lambda h: {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v) for k, v in h.items()}  # noqa: E731
        return decode(totals), decode(held)

    def _limits(self, tier_name: str | None, customer: str) -> tuple[int | None, Decimal | None]:
        tier = self.config.tiers.get(tier_name or "")
        if tier is None:
            return None, None
        override = self.config.customers.get(customer)
        tokens = override.monthly_tokens if override and override.monthly_tokens is not None else tier.monthly_tokens
        budget = override.monthly_budget_usd if override and override.monthly_budget_usd is not None else tier.monthly_budget_usd
        return tokens, budget

    def _document(
        self, customer: str, tier: str | None, period: str, start: datetime, end: datetime,
        totals: dict[str, str], held: dict[str, str],
    ) -> dict[str, Any]:
        usage: dict[str, Any] = {name: int(totals.get(name) or 0) for name in _INT_FIELDS}
        usage["total_tokens"] = usage["input_tokens"] + usage["output_tokens"]
        cost = Decimal(totals.get("cost_usd") or 0)
        usage["cost_usd"] = format_usd(cost)
        updated_ms = int(totals.get("updated_ms") or 0)
        usage["updated_at"] = datetime.fromtimestamp(updated_ms / 1000, UTC).isoformat() if updated_ms else None
        reserved_tokens = max(int(held.get("tokens") or 0), 0)
        reserved_usd = max(Decimal(int(held.get("micro_usd") or 0)) / _MICRO, Decimal(0))
        quota, budget = self._limits(tier, customer)
        used_tokens = usage["total_tokens"] + reserved_tokens
        return {
            "object": "usage",
            "customer": customer,
            "tier": tier,
            "period": period,
            "period_start": start.isoformat(),
            "period_end": end.isoformat(),
            "currency": self.config.billing.currency,
            "usage": usage,
            "reserved": {"tokens": reserved_tokens, "cost_usd": format_usd(reserved_usd)},
            "limits": {"monthly_tokens": quota, "monthly_budget_usd": None if budget is None else format_usd(budget)},
            "remaining": {
                "tokens": None if quota is None else max(quota - used_tokens, 0),
                "budget_usd": None if budget is None else format_usd(max(budget - cost - reserved_usd, Decimal(0))),
            },
        }


def register(
    app: web.Application, config: Config, guard: Callable[[web.Request], web.Response | None] | None = None
) -> None:
    """Add ``GET /v1/usage`` (before the proxy's catch-all) with its own Redis client.
    ``guard``: an answer that pre-empts the route's own (the server's spool guard), or None."""
    holder: dict[str, UsageApi] = {}
    failures = shared(app, config.shim)

    async def resources(app: web.Application):  # noqa: ANN202 - async generator
        client = redis_client(config.services)
        holder["api"] = UsageApi(config, client, failures)
        yield
        await client.aclose()

    async def usage(request: web.Request) -> web.Response:
        refused = guard(request) if guard is not None else None
        if refused is not None:
            return refused
        return await holder["api"].handle(request)

    app.cleanup_ctx.append(resources)
    app.router.add_get("/v1/usage", usage)

