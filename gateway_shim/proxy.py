"""One request through the shim: authenticate, admit, forward, meter, emit.

The hot path costs one Redis round trip (the admission script) once a key's
record is cached, plus the upstream call. Every request that got past
authentication emits exactly one event, whatever its outcome; a request
without a valid key has no customer to bill and emits none.
"""

from __future__ import annotations

import logging
import time

import redis.exceptions
from aiohttp import web

from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.emitter import EventEmitter
from gateway_shim.errors import BackendUnavailable, InvalidApiKey, RateLimited, ShimError, error_response
from gateway_shim.keystore import KeyRecord
from gateway_shim.metering import RequestMeter
from gateway_shim.routes import Route, match_route, read_request
from gateway_shim.upstream import Upstream, is_stream, relay_body, relay_stream
from quotameter.config import Config, Tier
from quotameter.events import Decision

log = logging.getLogger("gateway_shim.proxy")


class Proxy:
    def __init__(
        self, config: Config, auth: Authenticator, admitter: Admitter, upstream: Upstream, emitter: EventEmitter
    ) -> None:
        self.config = config
        self.auth = auth
        self.admitter = admitter
        self.upstream = upstream
        self.emitter = emitter

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info.get("tail", "")
        try:
            route = match_route(request.method, path)
            key = await self.auth.authenticate(request.headers.get("Authorization"))
        except ShimError as exc:
            return error_response(exc)
        except redis.exceptions.RedisError as exc:
            return error_response(_backend_down(exc))
        meter = RequestMeter(route=route.name, upstream=self.upstream.base_url)
        headers: dict[str, str] = {}  # x-ratelimit-*, on every answer once admission ran
        billable = True
        try:
            return await self._admitted(request, path, route, key, meter, headers)
        except InvalidApiKey as exc:  # revoked since it was cached: no customer to bill
            billable = False
            return error_response(exc)
        except ShimError as exc:
            meter.status = exc.status
            meter.reason = meter.reason or exc.code
            if isinstance(exc, RateLimited):
                meter.decision = Decision.REFUSED
            return error_response(exc, headers)
        except Exception:
            log.exception("%s %s failed", request.method, route.name)
            meter.status, meter.reason = 500, "internal_error"
            return error_response(ShimError("The gateway failed to process your request."), headers)
        finally:
            if billable:
                self.emitter.emit(meter.to_event(self.config.shim.instance, key))

    async def _admitted(
        self,
        request: web.Request,
        path: str,
        route: Route,
        key: KeyRecord,
        meter: RequestMeter,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        tier = self._tier(key)
        try:
            admission = await self.admitter.admit(key, tier.requests_per_minute, int(time.time() * 1000))
        except redis.exceptions.RedisError as exc:
            raise _backend_down(exc) from None
        if admission.revoked:
            self.auth.forget(key.key_id)
            raise self.auth.invalid()
        headers.update(admission.headers())
        if not admission.admitted:
            message = _refusal_message(key.tier, tier, admission.retry_after_ms)
            raise RateLimited(message, admission.retry_after_ms / 1000)
        raw = await request.read()
        meter.request_bytes = len(raw)
        proxied = read_request(route, raw)
        meter.model_requested = proxied.model
        meter.streamed = proxied.stream
        async with self.upstream.open(request, path, proxied.upstream_body) as upstream:
            if is_stream(upstream, proxied):
                return await relay_stream(request, upstream, proxied, meter, headers)
            return await relay_body(upstream, proxied, meter, headers)

    def _tier(self, key: KeyRecord) -> Tier:
        tier = self.config.tiers.get(key.tier)
        if tier is None:
            log.error("key %s has tier %r, which the config does not define", key.key_id, key.tier)
            raise BackendUnavailable(f"Your key's tier {key.tier!r} is not configured on this gateway.")
        return tier


def _refusal_message(tier_name: str, tier: Tier, retry_after_ms: int) -> str:
    retry_s = max(1, -(-retry_after_ms // 1000))
    hint = f" {tier.upgrade_hint}" if tier.upgrade_hint else ""
    return (
        f"{tier_name.capitalize()} tier limit exceeded: {tier.requests_per_minute} requests per minute. "
        f"Please retry after {retry_s}s.{hint}"
    )


def _backend_down(exc: Exception) -> BackendUnavailable:
    log.error("Redis unreachable: %s", exc)
    return BackendUnavailable("The quota service is temporarily unavailable. Please retry shortly.")
