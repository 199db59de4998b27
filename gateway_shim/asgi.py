"""quotameter as ASGI 3 middleware, for a Python app that serves an
OpenAI-compatible API itself (FastAPI, Starlette, anything ASGI): a thin
adapter over the request lifecycle (lifecycle.py), with the standalone
proxy's limits, refusals and events.

    app = QuotameterMiddleware(app)               # config from QUOTAMETER_CONFIG

For each ``/v1/…`` request it reads the body, admits it (a refusal is
answered here, in OpenAI's shape, and the app never sees the request), hands
the app the body to serve (rewritten when degraded to a fallback model or
capped), and watches what the app sends: a JSON answer is read whole, billed,
then sent with the rate-limit headers; an SSE answer is passed on event by
event, tallied, and cut at the budget (the app's stream is then stopped).
Settle and emit happen before the answer's last bytes leave. Other paths
pass through untouched.

The app sees the client's Authorization header as sent. A body with a
Content-Encoding is not decoded (send JSON as is).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from gateway_shim.errors import Answer, PayloadTooLarge, ShimError, UpstreamInvalidResponse, error_answer
from gateway_shim.in_process import InProcess
from gateway_shim.lifecycle import Exchange, Forward, StreamObserver
from quotameter.config import Config

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PREFIX = "/v1"


class _StreamCut(Exception):
    """Raised into the app's ``send`` once its stream is cut: stops the app's generator."""


class _Peer:
    """What AuthFailures.client_of reads of a request: its peer and headers."""

    __slots__ = ("remote", "headers")

    def __init__(self, scope: Scope, headers: dict[str, str]) -> None:
        client = scope.get("client")
        self.remote = client[0] if client else ""
        self.headers = {"X-Forwarded-For": headers["x-forwarded-for"]} if "x-forwarded-for" in headers else {}


class QuotameterMiddleware:
    def __init__(self, app: ASGIApp, config: Config | None = None, shim: InProcess | None = None) -> None:
        self.app = app
        self.shim = shim or InProcess(config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _closing_on_shutdown(send, self.shim))
            return
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == PREFIX or path.startswith(PREFIX + "/")):
            await self.app(scope, receive, send)
            return
        life = await self.shim.lifecycle()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        refusing = life.emitter.refusing  # a request that could not be billed is not served
        if refusing is not None:
            answer = error_answer(refusing)
            answer.headers["Retry-After"] = "5"
            await _answer(send, answer)
            return
        try:
            exchange = await life.open(scope["method"], path[len(PREFIX):] or "/", headers.get("authorization"),
                                       None, life.auth.client_of(_Peer(scope, headers)))
        except ShimError as exc:  # no customer to tie it to: answered, no event
            await _answer(send, error_answer(exc))
            return
        try:
            await _Relay(self.app, exchange, life.config).run(scope, receive, send, headers)
        finally:
            await exchange.finish()


class _Relay:
    """One admitted request through the app."""

    def __init__(self, app: ASGIApp, exchange: Exchange, config: Config) -> None:
        self.app = app
        self.exchange = exchange
        self.config = config
        self.started = False  # the response's start went to the client
        self.ended = False  # the stream's last bytes went out (or were cut)
        self.gone: asyncio.Future[Message] | None = None  # the server's next message: the disconnect
        self.observer: StreamObserver | None = None
        self.start: Message | None = None
        self.body = bytearray()

    async def run(self, scope: Scope, receive: Receive, send: Send, headers: dict[str, str]) -> None:
        exchange = self.exchange
        try:
            raw = await _read_body(receive, headers, self.config, exchange.route.name)
            forward = await exchange.admit(raw, headers)
        except Exception as exc:
            await self._refused(send, exc)
            return
        if forward.rewritten:  # the app reads the new body: its length too
            scope = dict(scope, headers=[(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
                         + [(b"content-length", str(len(forward.body)).encode())])
        # After the body, the only message left is the disconnect: watched here, for the app too
        # (a server may drop what is sent to a client that left, without an error).
        self.gone = asyncio.ensure_future(receive())
        try:
            await self.app(scope, _replay(forward.body, self.gone), lambda message: self._send(message, forward, send))
        except _StreamCut:
            pass
        except Exception as exc:
            if self.started:
                raise  # the client has the start of an answer: the server ends the connection
            await self._refused(send, exc)
            return
        finally:
            self.gone.cancel()
        if self.observer is not None and not self.ended:
            if self.gone.done() and not self.gone.cancelled():
                self._client_gone()
                return
            await self._end_stream(send, more=True)  # the app returned without a last body

    async def _send(self, message: Message, forward: Forward, send: Send) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.start = message
            status = message["status"]
            content_type = next((v.decode("latin-1") for k, v in message.get("headers", ())
                                 if k.lower() == b"content-type"), None)
            if self.exchange.is_stream(status, content_type):
                self.observer = self.exchange.stream(forward, status)
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != b"content-length"]
                await send(dict(message, headers=headers + _encoded(self.exchange.headers)))
                self.started = True
            return
        if kind != "http.response.body":
            await send(message)
            return
        observer = self.observer
        if observer is None:  # a JSON answer: read whole, billed, then sent
            self.body += message.get("body", b"")
            if len(self.body) > self.config.upstream.max_response_bytes:
                raise UpstreamInvalidResponse("The model server's answer is larger than the gateway accepts.")
            if not message.get("more_body", False):
                await self._send_whole(send)
            return
        if self.ended:
            raise _StreamCut
        if self.gone is not None and self.gone.done():
            self._client_gone()
            raise _StreamCut  # nothing more reaches the client: the app's generator stops
        out = observer.feed(message.get("body", b""))
        if observer.cut or not message.get("more_body", False):
            await self._end_stream(send, out)
            if observer.cut:
                raise _StreamCut  # the app's generator stops here
            return
        if out:
            await self._write(send, out)

    async def _send_whole(self, send: Send) -> None:
        exchange, start = self.exchange, self.start
        assert start is not None
        raw = bytes(self.body)
        try:
            exchange.body(start["status"], raw)
        except ShimError as exc:
            self.started = True
            await self._refused(send, exc)
            return
        await exchange.finish()  # billed before the answer leaves
        self.started = True
        await send(dict(start, headers=list(start.get("headers", ())) + _encoded(exchange.headers)))
        await send({"type": "http.response.body", "body": raw, "more_body": False})

    async def _refused(self, send: Send, exc: BaseException) -> None:
        """The request ends with ``exc``: its event first, then its answer."""
        answer = self.exchange.refuse(exc)
        await self.exchange.finish()
        await _answer(send, answer)

    async def _write(self, send: Send, data: bytes) -> None:
        try:
            await send({"type": "http.response.body", "body": data, "more_body": True})
        except OSError:
            self._client_gone()
            raise _StreamCut from None

    def _client_gone(self) -> None:
        """What was passed on is billed; the answer's end is not sent."""
        assert self.observer is not None
        self.ended = True
        self.observer.client_gone()
        self.observer.end()

    async def _end_stream(self, send: Send, out: bytes = b"", more: bool = False) -> None:
        """The stream's last bytes (the held usage chunk and [DONE], or the cut's ending) leave after settle and emit."""
        observer = self.observer
        assert observer is not None
        self.ended = True
        if more:  # the app returned without a last body
            observer.upstream_cut()
        closing = observer.end()
        await self.exchange.finish()
        try:
            await send({"type": "http.response.body", "body": out + closing, "more_body": False})
        except OSError:
            pass  # billed: only the closing lines were lost


async def _read_body(receive: Receive, headers: dict[str, str], config: Config, route: str) -> bytes:
    limits = config.shim
    max_bytes = limits.max_body_bytes_by_route.get(route, limits.max_body_bytes)
    too_large = PayloadTooLarge(f"The request body is larger than {max_bytes} bytes, the most this gateway takes "
                                f"on {route} (shim.max_body_bytes). Send a smaller request.")
    if int(headers.get("content-length") or 0) > max_bytes:
        raise too_large
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > max_bytes:
            raise too_large
        if not message.get("more_body", False):
            break
    return bytes(body)


def _replay(body: bytes, gone: asyncio.Future[Message]) -> Receive:
    """The app's receive: the admitted body once, then the disconnect when it comes."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await asyncio.shield(gone)

    return replayed


def _closing_on_shutdown(send: Send, shim: InProcess) -> Send:
    """The app's lifespan, with the events flushed once it has shut down."""

    async def sending(message: Message) -> None:
        if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
            await shim.close()
        await send(message)

    return sending


def _encoded(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


async def _answer(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status,
                "headers": _encoded({**answer.headers, "Content-Length": str(len(answer.body))})})
    await send({"type": "http.response.body", "body": answer.body, "more_body": False})

