"""One request through the shim: authenticate, admit, forward, meter, settle, emit.

The hot path costs one Redis round trip (the admission script) once a key's
record is cached, plus the upstream call, plus one settle call when the
request held something (see enforcement.py). Every request that got past
authentication emits exactly one event, whatever its outcome, after its
reservation is settled; a request without a valid key emits none.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import redis.exceptions
from aiohttp import web

from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.emitter import EventEmitter
from gateway_shim.enforcement import Enforcer, KeyRevoked, Ticket
from gateway_shim.errors import InvalidApiKey, MalformedRequest, ShimError, error_response, quota_backend_down
from gateway_shim.keystore import KeyRecord
from gateway_shim.metering import RequestMeter
from gateway_shim.routes import ProxiedRequest, Route, match_route, read_request
from gateway_shim.upstream import Upstream, is_stream, relay_body, relay_stream
from quotameter.config import Config
from quotameter.redis_pool import RedisPoolExhausted

log = logging.getLogger("gateway_shim.proxy")


class Proxy:
    def __init__(
        self, config: Config, auth: Authenticator, admitter: Admitter, upstream: Upstream, emitter: EventEmitter
    ) -> None:
        self.config = config
        self.auth = auth
        self.admitter = admitter
        self.enforcer = Enforcer(config, admitter)
        self.upstream = upstream
        self.emitter = emitter

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info.get("tail", "")
        try:
            route = match_route(request.method, path)
            key = await self.auth.authenticate(request.headers.get("Authorization"))
        except ShimError as exc:
            return error_response(exc)
        except RedisPoolExhausted as exc:  # Redis is up: not an outage
            return error_response(self.enforcer.busy(exc))
        except redis.exceptions.RedisError as exc:
            return error_response(quota_backend_down(exc))
        meter = RequestMeter(route=route.name, upstream=self.upstream.base_url)
        headers: dict[str, str] = {}  # rate-limit headers, on every answer once admission ran
        billable = True
        ticket: list[Ticket] = []
        finished = False

        async def finish() -> None:
            # Settle before the event (the pipeline's contract), and emit before
            # the answer's last bytes leave (a stream calls this itself).
            nonlocal finished
            if finished:
                return
            finished = True
            if ticket:
                await self.enforcer.settle(ticket[0], meter)
            if billable:
                self.emitter.emit(meter.encoded_event(self.config.shim.instance, key))

        try:
            return await self._admitted(request, path, route, key, meter, headers, ticket, finish)
        except InvalidApiKey as exc:  # revoked since it was cached: no customer to bill
            billable = False
            return error_response(exc)
        except ShimError as exc:
            meter.refused(exc)
            return error_response(exc, headers)
        except Exception:
            log.exception("%s %s failed", request.method, route.name)
            meter.status, meter.reason = 500, "internal_error"
            return error_response(ShimError("The gateway failed to process your request."), headers)
        finally:
            await finish()  # a JSON answer is written after this returns: billed first

    async def _admitted(
        self,
        request: web.Request,
        path: str,
        route: Route,
        key: KeyRecord,
        meter: RequestMeter,
        headers: dict[str, str],
        held: list[Ticket],
        finish: Callable[[], Awaitable[None]],
    ) -> web.StreamResponse:
        raw = await request.read()
        meter.request_bytes = len(raw)
        malformed: MalformedRequest | None = None
        try:
            proxied = read_request(route, raw)
        except MalformedRequest as exc:  # still counted as a request, then refused
            malformed, proxied = exc, ProxiedRequest(None, raw, None, False, False)
        meter.model_requested = proxied.model
        meter.streamed = proxied.stream
        policy = self.enforcer.policy(key, proxied.model)
        estimate, _ = self.enforcer.estimate(policy, proxied, route.streams)
        try:
            ticket = await self.enforcer.admit(key, policy, proxied, estimate, meter, headers)
        except KeyRevoked:
            self.auth.forget(key.key_id)
            raise self.auth.invalid() from None
        held.append(ticket)
        if malformed is not None:
            raise malformed
        body = proxied.upstream_body
        output_cut = estimate.cuttable and ticket.admission.output_tokens < estimate.output_tokens
        if ticket.model != proxied.model or (output_cut and not proxied.stream):
            body = _rewrite(proxied, ticket.model, ticket.admission.output_tokens if output_cut else None)
        cut_at = None
        if proxied.stream and policy.tier.cut_streams and policy.reserves:
            cut_at = ticket.admission.output_tokens  # a stream never carries past its reservation
        async with self.upstream.open(request, path, body) as upstream:
            if is_stream(upstream, proxied):
                message = (
                    f"{policy.tier_name.capitalize()} tier budget reached: the response was cut at "
                    f"{cut_at} output tokens.{' ' + policy.upgrade_hint if policy.upgrade_hint else ''}"
                )
                return await relay_stream(request, upstream, proxied, meter, headers, cut_at, message, finish)
            return await relay_body(upstream, proxied, meter, headers)


def _rewrite(proxied: ProxiedRequest, model: str | None, max_tokens: int | None) -> bytes:
    """The body for a degraded admission: the fallback model, and the output
    cap a request without max_tokens was admitted with."""
    assert proxied.body is not None
    body = dict(proxied.body)
    if model:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return json.dumps(body, separators=(",", ":")).encode()

