"""Envoy's external processor (ext_proc over gRPC): a thin adapter over the
request lifecycle (lifecycle.py), driven by Envoy's phases instead of an
HTTP connection of the shim's own; same limits, refusals and events as the
standalone proxy.

Envoy is configured (deploy/envoy/ext_proc.yaml) to send request headers, the
request body buffered, response headers, and the response body streamed, one
gRPC stream per request:

    request headers   authenticate, match the route (no body: admit here)
    request body      admit; drop the client's key; rewrite the body if degraded
    response headers  the rate-limit headers
    response body     tally each chunk (SSE) or keep the JSON; cut at the budget;
                      settle and emit before the answer carrying the last bytes

A refusal is an ImmediateResponse with the standalone proxy's status, JSON
body and headers. A stream Envoy closes early (client gone, upstream reset)
is settled and emitted with what the shim had passed on to Envoy (which
buffers: a client that left may have read less). Every request past
authentication emits exactly one event; one without a valid key emits none.

The server runs in the shim's process, on its event loop (uvloop included:
grpc.aio schedules through the running loop).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as service
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HeaderMutation,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)

from gateway_shim import ext_proc_messages as messages
from gateway_shim.auth_failures import AuthFailures
from gateway_shim.errors import RouteNotFound, ShimError, error_answer
from gateway_shim.lifecycle import Exchange, Forward, Lifecycle, StreamObserver
from gateway_shim.telemetry import route_label

log = logging.getLogger("gateway_shim.ext_proc")


class _Phases:
    """One request, phase by phase, over the lifecycle. ``close`` ends it however it went."""

    __slots__ = ("_life", "exchange", "_forward", "_status", "_observer", "_ended", "_body", "finished", "_headers")

    def __init__(self, life: Lifecycle) -> None:
        self._life = life
        self.exchange: Exchange | None = None  # None until the request is tied to a key
        self._forward: Forward | None = None
        self._status = 0
        self._observer: StreamObserver | None = None
        self._ended = False  # the stream's last bytes were handed to Envoy (or it was cut)
        self._body = bytearray()  # a JSON answer, read once whole
        self.finished = False  # settled and emitted (or nothing to bill)
        self._headers: dict[str, str] = {}  # the client's request headers, for attribution

    async def on(self, request: ProcessingRequest) -> ProcessingResponse:
        phase = request.WhichOneof("request")
        if phase == "request_headers":
            return await self._request_headers(request.request_headers)
        exchange = self.exchange
        assert exchange is not None, f"ext_proc {phase} before request headers"
        try:
            if phase == "request_body":
                return messages.request_body(*await self._admit(request.request_body.body))
            if phase == "response_headers":
                return self._response_headers(messages.header_map(request.response_headers))
            if phase == "response_body":
                return await self._response_body(request.response_body.body, request.response_body.end_of_stream)
            raise ValueError(f"unexpected ext_proc phase {phase!r}: check processing_mode (deploy/envoy/ext_proc.yaml)")
        except Exception as exc:  # a refusal, or a bug: answered as the proxy answers it, and billed
            return await self._refused(exchange, exc)

    async def _refused(self, exchange: Exchange, exc: Exception) -> ProcessingResponse:
        answer = exchange.refuse(exc)
        await self._finish(exchange)
        return messages.immediate(answer, exchange.meter.reason or "quotameter_error")

    async def _finish(self, exchange: Exchange) -> None:
        await exchange.finish()
        self.finished = True

    # -- request ------------------------------------------------------------

    async def _request_headers(self, request: HttpHeaders) -> ProcessingResponse:
        self._headers = headers = messages.header_map(request)
        refusing = self._life.emitter.refusing  # a request that could not be billed is not served
        if refusing is not None:
            answer = error_answer(refusing)
            answer.headers["Retry-After"] = "5"
            return messages.immediate(answer, refusing.code)
        started = time.perf_counter()
        path = headers.get(":path", "/").partition("?")[0]
        method = headers.get(":method", "GET")
        route = None
        try:
            if not path.startswith("/v1/"):
                raise RouteNotFound(f"Unknown request URL: {method} {path}.")
            route = self._life.route(method, path[3:])
            # Envoy appended the address it saw (use_remote_address): wrong keys count against it.
            client = AuthFailures.last_forwarded(headers.get("x-forwarded-for"))
            self.exchange = exchange = await self._life.open_route(
                route, route.dialect.credentials(headers), None, client
            )
        except ShimError as exc:  # no customer to tie it to: answered, no event
            self._life.telemetry.unopened(method, path, route_label(route.name) if route else "unknown", exc.code,
                                          exc.status, started)
            return messages.immediate(error_answer(exc, dialect=route.dialect if route else None), exc.code)
        exchange.started, exchange.method, exchange.path = started, method, path
        if not request.end_of_stream:
            return messages.CONTINUE_HEADERS  # admitted on the body
        try:
            mutation, _ = await self._admit(b"")
        except Exception as exc:
            return await self._refused(exchange, exc)
        return messages.request_headers(mutation)

    async def _admit(self, raw: bytes) -> tuple[HeaderMutation | None, bytes | None]:
        """Admit (or raise the refusal): the header mutation for the upstream, and
        the body it gets instead of the client's (None: the client's)."""
        assert self.exchange is not None
        self._forward = forward = await self.exchange.admit(raw, self._headers)
        self.exchange.calling_upstream()  # Envoy sends it on as this answer reaches it
        # The quotameter key never reaches the model: the upstream's own key, if any, replaces it.
        # Nor does the client's accept-encoding: the shim reads the answer, so it comes uncompressed
        # (Envoy's compressor, if any, still encodes it for the client).
        # Anthropic's clients send their key as x-api-key, and its API takes the upstream's key there.
        upstream_key = self._life.config.upstream.api_key
        set_headers: dict[str, str] = {}
        if upstream_key and self.exchange.route.name == "/v1/messages":
            set_headers["x-api-key"] = upstream_key.get_secret_value()
        elif upstream_key:
            set_headers["authorization"] = f"Bearer {upstream_key.get_secret_value()}"
        body = forward.body if forward.rewritten else None
        if body is not None:
            set_headers["content-length"] = str(len(body))  # Envoy keeps it in BUFFERED mode: ours to set
        remove = tuple(name for name in ("authorization", "x-api-key", "accept-encoding") if name not in set_headers)
        return messages.mutation(set_headers, remove), body

    # -- response -----------------------------------------------------------

    def _response_headers(self, headers: dict[str, str]) -> ProcessingResponse:
        exchange, forward = self.exchange, self._forward
        assert exchange is not None and forward is not None
        self._status = status = int(headers.get(":status") or 0)
        exchange.upstream_answered(status)
        if exchange.is_stream(status, headers.get("content-type")):
            self._observer = exchange.stream(forward, status)
        return messages.response_headers(messages.mutation(exchange.headers))

    async def _response_body(self, chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
        exchange, observer = self.exchange, self._observer
        assert exchange is not None
        if observer is None:  # a JSON answer: passed on as it comes, read whole at its end
            self._body += chunk
            if end_of_stream:
                exchange.upstream_done()
                exchange.body(self._status, bytes(self._body))
                await self._finish(exchange)  # billed before the answer's last bytes leave
            return messages.response_body(None)
        if self._ended:
            return messages.response_body(b"")  # cut: the rest of the upstream's stream is dropped
        out = observer.feed(chunk)
        if observer.cut or end_of_stream:
            self._ended = True
            exchange.upstream_done()
            closing = observer.end()  # the held usage chunk and terminal event ([DONE]), or the cut's ending
            await self._finish(exchange)  # billed before they leave
            out += closing
        return messages.response_body(None if out == chunk else out)

    # -- end ----------------------------------------------------------------

    async def close(self) -> None:
        """Envoy ended the gRPC stream. A request it ended early (client gone, upstream
        reset, a timeout: Envoy does not say which) is billed for what was passed on."""
        exchange = self.exchange
        if exchange is None or self.finished:
            return
        if self._observer is not None and not self._ended:
            self._ended = True
            self._observer.client_gone()  # nothing more reaches the client
            self._observer.end()
            exchange.meter.reason = "stream_reset"
        elif self._forward is not None and exchange.meter.reason is None and not self._ended:
            exchange.meter.reason = "stream_reset"
        await self._finish(exchange)


class ExternalProcessor(service.ExternalProcessorServicer):
    def __init__(self, life: Lifecycle) -> None:
        self._life = life
        self._closing: set[asyncio.Task[None]] = set()

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        phases = _Phases(self._life)
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                await context.write(await phases.on(request))
        finally:
            if not phases.finished:
                # A task of its own: a stream Envoy cancelled still settles and emits.
                task = asyncio.ensure_future(phases.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                await asyncio.shield(task)

    async def drain(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class ExtProcServer:
    """The gRPC server, started and stopped with the shim's resources (server.py)."""

    def __init__(self, life: Lifecycle, host: str, port: int) -> None:
        self._processor = ExternalProcessor(life)
        # No SO_REUSEPORT (gRPC's default): a second shim on the port must fail, not share it.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        service.add_ExternalProcessorServicer_to_server(self._processor, self._server)
        try:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            raise OSError(f"cannot listen on {host}:{port} (shim.ext_proc_port): is it in use?") from None
        self._host = host

    async def start(self) -> None:
        await self._server.start()
        log.info("ext_proc listening on %s:%d", self._host, self.port)

    async def stop(self, grace_s: float) -> None:
        """Let streams in flight end (Envoy's streams are its requests), then bill the rest."""
        await self._server.stop(grace_s)
        await self._processor.drain()
