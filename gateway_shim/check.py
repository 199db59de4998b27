"""``/v1/check``: admission without proxying, for a proxy that forwards itself
(nginx ``auth_request``, Traefik ``forwardAuth``, Caddy ``forward_auth``,
Envoy ext_authz over HTTP).

The proxy calls it with the client's request headers (any method) and
forwards only on a 2xx. It authenticates the client's ``Authorization:
Bearer`` key, takes the model from ``x-quotameter-model`` (else the JSON
body's ``model``, when the proxy sends the body; else the tier's defaults),
and runs the proxy's own admission: same script, same limits, same refusals
and headers. Admitted: 200 with the event id, customer, tier, key id (and
the model to serve, when degraded to a fallback; the request's attribution
as JSON in ``x-quotameter-attribution``, for the report's data) as
``x-quotameter-*`` headers, plus the rate-limit headers. The request's usage event comes later
from the gateway through ``POST /v1/events`` under that event id, which
settles the reservation (gateway_shim/check_tickets.py). A refusal is an event of its
own, emitted here as the proxy does; its answer also carries its JSON body in
``x-quotameter-error``, for nginx (see ``_refused``).

The end user a tier's ``per_user`` limits hold is read from the
``x-quotameter-user`` header the proxy passes on (or the body's ``user``).

Without a body the worst case reserved is the tier's ``default_max_tokens``
of output (the prompt is not seen). A tier's ``cut_streams`` never admits a
request shrunk to fit here: the proxy that forwards it cannot cut it there.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import redis.exceptions
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace

from gateway_shim.attribution import header_value
from gateway_shim.check_tickets import CheckTickets
from gateway_shim.dialects import Dialect
from gateway_shim.errors import Answer, ShimError, error_answer
from gateway_shim.lifecycle import Exchange, Lifecycle
from gateway_shim.proxy import Proxy
from gateway_shim.routes import Route, dialect_for
from quotameter.events import Decision
from telemetry import logs
from telemetry.context import TRACEPARENT_HEADER

log = logging.getLogger("gateway_shim.check")

MODEL_HEADER = "x-quotameter-model"
EVENT_ID_HEADER = "x-quotameter-event-id"
ERROR_HEADER = "x-quotameter-error"
# Where proxies put the original request's URI: nginx (by convention), Traefik / Caddy.
_URI_HEADERS = ("X-Original-URI", "X-Forwarded-Uri")


class Check:
    def __init__(self, proxy: Proxy, tickets: CheckTickets) -> None:
        self._proxy = proxy
        self.tickets = tickets

    async def handle(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        lifecycle = self._proxy.lifecycle
        telemetry = lifecycle.telemetry
        span = telemetry.server_span(request.method, "/v1/check", request.path, request.headers.get(TRACEPARENT_HEADER))
        token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
        try:
            return await self._handle(request, lifecycle, started, span)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _handle(self, request: web.Request, lifecycle: Lifecycle, started: float, span: object | None
                      ) -> web.Response:
        uri = _route(request)
        dialect = dialect_for(uri)  # the API the proxy forwards to: its body fields, its error bodies
        route = Route(uri, has_body=True, streams=True, dialect=dialect)
        try:
            exchange = await lifecycle.open_route(
                route, dialect.credentials(request.headers), None, self._proxy.auth.client_of(request)
            )
        except ShimError as exc:
            lifecycle.telemetry.unopened(request.method, request.path, "check", exc.code, exc.status, started, span)
            return _refused(error_answer(exc, dialect=dialect))
        exchange.route_label, exchange.method, exchange.path = "check", request.method, request.path
        exchange.started, exchange.span = started, span
        with logs.request_context(exchange.meter.event_id, exchange.key.customer, exchange.key.key_id):
            return await self._admit(request, lifecycle, exchange, dialect)

    async def _admit(self, request: web.Request, lifecycle: Lifecycle, exchange: Exchange, dialect: Dialect
                     ) -> web.Response:
        body = await _body(request) or {"messages": []}  # the prompt unseen: reserve the output's worst case
        model = request.headers.get(MODEL_HEADER) or (body.get("model") if isinstance(body.get("model"), str) else None)
        if model is not None:
            body["model"] = model
        try:
            if dialect.max_output(body) is None:
                # Reserved as if asked for: a cut_streams tier would otherwise admit the request
                # shrunk to fit, and the proxy that forwards it cannot cut the answer there.
                body[dialect.cap_field] = lifecycle.enforcer.policy(exchange.key, model).default_max_tokens
            await exchange.admit(json.dumps(body).encode(), request.headers)
        except Exception as exc:
            # Refused: the request ends here, and its event is emitted as the proxy's are.
            answer = exchange.refuse(exc)
            if answer.status >= 500:
                exchange.meter.decision = Decision.REFUSED  # never forwarded
            await exchange.finish()
            return _refused(answer)
        exchange.hand_off()
        ticket, key = exchange.ticket, exchange.key
        assert ticket is not None
        if not ticket.admission.local:
            try:
                # For a report without usage: the prompt the admission counted, or (a tier
                # that reserves and limits no tokens, so it did not) counted here.
                await self.tickets.keep(ticket, ticket.reserved[0] or dialect.count_prompt(body, ticket.model))
            except (redis.exceptions.RedisError, OSError) as exc:
                # Admitted all the same: its report is ingested without a settle, and
                # the reservation expires after its TTL.
                log.error("cannot keep check ticket %s (%s): its reservation expires after its TTL", ticket.event_id, exc)
        headers = exchange.headers
        headers[EVENT_ID_HEADER] = ticket.event_id
        headers["x-quotameter-customer"] = key.customer
        headers["x-quotameter-tier"] = key.tier
        headers["x-quotameter-key-id"] = key.key_id  # for the usage report's api_key_id
        if (attributed := header_value(exchange.attribution, key.project)) is not None:
            headers["x-quotameter-attribution"] = attributed  # for the report's data (deploy/nginx/quotameter.js)
        if ticket.model is not None and ticket.model != model:
            headers["x-quotameter-served-model"] = ticket.model  # degraded to the tier's fallback
        answer = {"event_id": ticket.event_id, "customer": key.customer, "tier": key.tier, "model": ticket.model}
        return web.json_response(answer, headers=headers)


def _refused(answer: Answer) -> web.Response:
    """The proxy's own error answer, its body also in ``x-quotameter-error`` (one line of
    ASCII JSON): nginx's auth_request keeps a subrequest's headers, never its body, so
    its error_page can only give the client the answer from there (deploy/nginx/)."""
    return web.Response(status=answer.status, body=answer.body,
                        headers={**answer.headers, ERROR_HEADER: answer.body.decode("ascii")})


def _route(request: web.Request) -> str:
    for name in _URI_HEADERS:
        uri = request.headers.get(name)
        if uri and uri.startswith("/"):
            return uri.partition("?")[0][:200]
    return "/v1/check"


async def _body(request: web.Request) -> dict[str, Any]:
    """The JSON body a proxy may pass along (Envoy's with_request_body), else {}.
    The body is the upstream's business: one that is not a JSON object is ignored."""
    if not request.can_read_body:
        return {}
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: nested too deep
        return {}
    return body if isinstance(body, dict) else {}
