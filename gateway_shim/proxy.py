"""The standalone proxy: the request lifecycle (lifecycle.py) over aiohttp,
forwarding to the upstream model server itself.

The hot path costs one Redis round trip (the admission script) once a key's
record is cached, plus the upstream call, plus one settle call when the
request held something (see enforcement.py).

Streams are written to the client event by event as they arrive. A stream
the upstream cuts short is ended cleanly for the client after the last whole
event, and what was delivered is counted. A client that goes away stops the
relay; the tokens it received are still metered.

An upstream's Content-Type is not trusted for a stream request: an answer
that starts like an event stream is relayed as one (and labelled so), any
other success goes to ``Exchange.body``, which refuses it with a 502.
"""

from __future__ import annotations

import logging
import time

import aiohttp
from aiohttp import web
from opentelemetry import context as otel_context
from opentelemetry import trace

from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.emitter import EventEmitter
from gateway_shim.enforcement import Enforcer
from gateway_shim.errors import (
    ShimError,
    UpstreamInvalidResponse,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_response,
    to_response,
)
from gateway_shim.lifecycle import Exchange, Forward, Lifecycle
from gateway_shim.request_body import read_body
from gateway_shim.sse import looks_like_events
from gateway_shim.telemetry import route_label
from gateway_shim.upstream import Upstream, client_headers
from quotameter.config import Config
from telemetry import logs
from telemetry.context import TRACEPARENT_HEADER

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
        self.lifecycle = Lifecycle(config, auth, self.enforcer, emitter)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        path = "/" + request.match_info.get("tail", "")
        telemetry = self.lifecycle.telemetry
        try:
            route = self.lifecycle.route(request.method, path)
        except ShimError as exc:
            span = telemetry.server_span(request.method, None, request.path, request.headers.get(TRACEPARENT_HEADER))
            telemetry.unopened(request.method, request.path, "unknown", exc.code, exc.status, started, span)
            return error_response(exc)
        span = telemetry.server_span(request.method, route.name, request.path, request.headers.get(TRACEPARENT_HEADER))
        token = None if span is None else otel_context.attach(trace.set_span_in_context(span))
        try:
            try:
                exchange = await self.lifecycle.open_route(
                    route, route.dialect.credentials(request.headers), self.upstream.base_url,
                    self.auth.client_of(request),
                )
            except ShimError as exc:
                telemetry.unopened(request.method, request.path, route_label(route.name), exc.code, exc.status,
                                   started, span)
                return error_response(exc, dialect=route.dialect)
            exchange.started, exchange.method, exchange.path, exchange.span = started, request.method, request.path, span
            with logs.request_context(exchange.meter.event_id, exchange.key.customer, exchange.key.key_id):
                return await self._exchange(request, path, exchange)
        finally:
            if token is not None:
                otel_context.detach(token)

    async def _exchange(self, request: web.Request, path: str, exchange: Exchange) -> web.StreamResponse:
        try:
            forward = await exchange.admit(await read_body(request, exchange.route.name, self.config.shim), request.headers)
            exchange.calling_upstream()
            async with self.upstream.open(request, path, forward.body) as upstream:
                exchange.upstream_answered(upstream.status)
                if exchange.is_stream(upstream.status, upstream.headers.get("Content-Type")):
                    return await _relay_stream(request, upstream, exchange, forward)
                head = b""
                if forward.stream and 200 <= upstream.status < 300:
                    head = await _read_head(upstream)
                    if looks_like_events(head):
                        return await _relay_stream(request, upstream, exchange, forward, head)
                return await _relay_body(upstream, exchange, head, self.config.upstream.max_response_bytes)
        except Exception as exc:
            return to_response(exchange.refuse(exc))
        finally:
            await exchange.finish()  # a JSON answer is written after this returns: billed first


def _read_failed(exc: Exception) -> ShimError:
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout("The model server stopped sending its answer. Please retry.")
    log.warning("upstream dropped the connection mid-answer: %s", exc)  # the detail is for the operator
    return UpstreamUnavailable("The model server dropped the connection. Please retry shortly.")


async def _read_head(upstream: aiohttp.ClientResponse) -> bytes:
    """The first bytes of an answer, enough to tell an event stream (``data:``…) from JSON."""
    head = b""
    try:
        while len(head.lstrip()) < 6 and not upstream.content.at_eof():
            head += await upstream.content.readany()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _read_failed(exc) from None
    return head


async def _relay_body(
    upstream: aiohttp.ClientResponse, exchange: Exchange, head: bytes, max_bytes: int
) -> web.Response:
    """A whole answer (``head``: its first bytes, when already read), at most ``max_bytes`` of it."""
    too_large = UpstreamInvalidResponse("The model server's answer is larger than the gateway accepts.")
    if (upstream.content_length or 0) > max_bytes:
        raise too_large
    parts, size = [head], len(head)
    try:
        async for data in upstream.content.iter_any():
            size += len(data)
            if size > max_bytes:
                raise too_large
            parts.append(data)
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise _read_failed(exc) from None
    exchange.upstream_done()
    raw = b"".join(parts)
    exchange.body(upstream.status, raw)
    return web.Response(status=upstream.status, body=raw, headers=client_headers(upstream, exchange.headers))


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, exchange: Exchange, forward: Forward, head: bytes = b""
) -> web.StreamResponse:
    """The stream's closing bytes (the usage chunk and [DONE], or the cut's ending) go out only after
    ``finish`` (settle, emit): a client that read the whole answer was billed,
    whenever the shim is killed. The other order would leave a window, the
    settle's Redis round trip long, in which a SIGKILL serves a stream unbilled."""
    observer = exchange.stream(forward, upstream.status)
    headers = client_headers(upstream, exchange.headers)
    if head:  # sniffed: the upstream mislabelled its stream
        headers["Content-Type"] = "text/event-stream"
    response = web.StreamResponse(status=upstream.status, headers=headers)
    await response.prepare(request)
    chunks = upstream.content.iter_any()
    gone = False
    data = head
    while True:
        out = observer.feed(data) if data else b""
        if out:
            try:
                await response.write(out)
            except ConnectionError:
                observer.client_gone()
                gone = True
                break
        if observer.cut:
            break
        try:
            data = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except TimeoutError:
            observer.upstream_cut("upstream_timeout")
            break
        except aiohttp.ClientError:
            observer.upstream_cut()
            break
    exchange.upstream_done()
    closing = observer.end()
    await exchange.finish()
    if not gone:
        try:
            if closing:
                await response.write(closing)
            await response.write_eof()
        except ConnectionError:
            pass  # billed: it had every token, only the closing lines were lost
    return response

