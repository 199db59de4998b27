"""The standalone proxy: the request lifecycle (lifecycle.py) over aiohttp,
forwarding to the upstream model server itself.

The hot path costs one Redis round trip (the admission script) once a key's
record is cached, plus the upstream call, plus one settle call when the
request held something (see enforcement.py).

Streams are written to the client event by event as they arrive. A stream
the upstream cuts short is ended cleanly for the client after the last whole
event, and what was delivered is counted. A client that goes away stops the
relay; the tokens it received are still metered.
"""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web

from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.emitter import EventEmitter
from gateway_shim.enforcement import Enforcer
from gateway_shim.errors import (
    ShimError,
    UpstreamTimeout,
    UpstreamUnavailable,
    error_response,
    to_response,
)
from gateway_shim.lifecycle import Exchange, Forward, Lifecycle
from gateway_shim.request_body import read_body
from gateway_shim.upstream import Upstream, client_headers
from quotameter.config import Config

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
        path = "/" + request.match_info.get("tail", "")
        try:
            exchange = await self.lifecycle.open(
                request.method, path, request.headers.get("Authorization"), self.upstream.base_url,
                self.auth.client_of(request),
            )
        except ShimError as exc:
            return error_response(exc)
        try:
            forward = await exchange.admit(await read_body(request, exchange.route.name, self.config.shim))
            async with self.upstream.open(request, path, forward.body) as upstream:
                if exchange.is_stream(upstream.status, upstream.headers.get("Content-Type")):
                    return await _relay_stream(request, upstream, exchange, forward)
                return await _relay_body(upstream, exchange)
        except Exception as exc:
            return to_response(exchange.refuse(exc))
        finally:
            await exchange.finish()  # a JSON answer is written after this returns: billed first


async def _relay_body(upstream: aiohttp.ClientResponse, exchange: Exchange) -> web.Response:
    try:
        raw = await upstream.read()
    except TimeoutError:
        raise UpstreamTimeout("The model server stopped sending its answer. Please retry.") from None
    except aiohttp.ClientError as exc:
        log.warning("upstream dropped the connection mid-answer: %s", exc)  # the detail is for the operator
        raise UpstreamUnavailable("The model server dropped the connection. Please retry shortly.") from None
    exchange.body(upstream.status, raw)
    return web.Response(status=upstream.status, body=raw, headers=client_headers(upstream, exchange.headers))


async def _relay_stream(
    request: web.Request, upstream: aiohttp.ClientResponse, exchange: Exchange, forward: Forward
) -> web.StreamResponse:
    """The stream's closing bytes ([DONE], or the cut's ending) go out only after
    ``finish`` (settle, emit): a client that read the whole answer was billed,
    whenever the shim is killed. The other order would leave a window, the
    settle's Redis round trip long, in which a SIGKILL serves a stream unbilled."""
    observer = exchange.stream(forward, upstream.status)
    response = web.StreamResponse(status=upstream.status, headers=client_headers(upstream, exchange.headers))
    await response.prepare(request)
    chunks = upstream.content.iter_any()
    gone = False
    while not observer.cut:
        try:
            data = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError):
            observer.upstream_cut()
            break
        out = observer.feed(data)
        if out:
            try:
                await response.write(out)
            except ConnectionError:
                observer.client_gone()
                gone = True
                break
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

