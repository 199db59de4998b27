"""Envoy's external processor (ext_proc over gRPC): the shim's request life,
driven by Envoy's phases instead of an HTTP connection of its own.

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
is settled and emitted with what was delivered. Every request past
authentication emits exactly one event; one without a valid key emits none.

The server runs in the shim's process, on its event loop (uvloop included:
grpc.aio schedules through the running loop).
"""

from __future__ import annotations

import asyncio
import json
import logging

import grpc
import redis.exceptions
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as service
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    HeaderMutation,
    HttpHeaders,
    ProcessingRequest,
    ProcessingResponse,
)

from gateway_shim import ext_proc_messages as messages
from gateway_shim.enforcement import KeyRevoked, Ticket
from gateway_shim.errors import InvalidApiKey, MalformedRequest, RouteNotFound, ShimError, error_response, quota_backend_down
from gateway_shim.keystore import KeyRecord
from gateway_shim.metering import RequestMeter
from gateway_shim.proxy import Proxy, _rewrite
from gateway_shim.routes import ProxiedRequest, Route, match_route, read_request
from gateway_shim.sse import StreamTally
from gateway_shim.upstream import _cut_ending
from gateway_shim.usage import completion_text, counted_usage, model_from, usage_from
from quotameter.redis_pool import RedisPoolExhausted

log = logging.getLogger("gateway_shim.ext_proc")


class _Refused(Exception):
    """Answer the request with ``answer`` (an ImmediateResponse) now."""

    def __init__(self, answer: ProcessingResponse) -> None:
        self.answer = answer


class _Exchange:
    """One request, phase by phase. ``close`` ends it however it went."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.key: KeyRecord | None = None
        self.route: Route | None = None
        self.meter: RequestMeter | None = None
        self.headers: dict[str, str] = {}  # rate-limit headers, once admission ran
        self.ticket: Ticket | None = None
        self.proxied: ProxiedRequest | None = None
        self.billable = True
        self.finished = False
        self.cut_at: int | None = None
        self.cut_message = ""
        self.tally: StreamTally | None = None
        self.cut_sent = False
        self.body = bytearray()  # a JSON answer, read once whole

    async def on(self, request: ProcessingRequest) -> ProcessingResponse:
        phase = request.WhichOneof("request")
        try:
            if phase == "request_headers":
                return await self._request_headers(request.request_headers)
            if phase == "request_body":
                return await self._request_body(request.request_body.body)
            if phase == "response_headers":
                return self._response_headers(messages.header_map(request.response_headers))
            if phase == "response_body":
                return await self._response_body(request.response_body.body, request.response_body.end_of_stream)
        except _Refused as refused:
            await self.finish()
            return refused.answer
        raise ValueError(f"unexpected ext_proc phase {phase!r}: check processing_mode (deploy/envoy/ext_proc.yaml)")

    # -- request ------------------------------------------------------------

    async def _request_headers(self, request: HttpHeaders) -> ProcessingResponse:
        headers = messages.header_map(request)
        proxy = self.proxy
        refusing = proxy.emitter.refusing  # a request that could not be billed is not served
        if refusing is not None:
            answer = error_response(refusing)
            answer.headers["Retry-After"] = "5"
            raise _Refused(messages.immediate(answer, "quotameter_metering_unavailable"))
        path = headers.get(":path", "/").partition("?")[0]
        method = headers.get(":method", "GET")
        try:
            if not path.startswith("/v1/"):
                raise RouteNotFound(f"Unknown request URL: {method} {path}.")
            self.route = match_route(method, path[3:])
            self.key = await proxy.auth.authenticate(headers.get("authorization"))
        except ShimError as exc:
            raise _Refused(messages.immediate(error_response(exc), exc.code)) from None
        except RedisPoolExhausted as exc:
            raise _Refused(messages.immediate(error_response(proxy.enforcer.busy(exc)), "quota_backend_busy")) from None
        except redis.exceptions.RedisError as exc:
            raise _Refused(messages.immediate(error_response(quota_backend_down(exc)), "quota_backend_down")) from None
        self.meter = RequestMeter(route=self.route.name, upstream=None)
        if request.end_of_stream:  # no body comes: admit on the headers
            return messages.request_headers((await self._admit(b""))[0])
        return messages.CONTINUE_HEADERS

    async def _request_body(self, raw: bytes) -> ProcessingResponse:
        return messages.request_body(*await self._admit(raw))

    async def _admit(self, raw: bytes) -> tuple[HeaderMutation | None, bytes | None]:
        """Admit the request (or raise _Refused): the header mutation for the upstream,
        and the body it gets instead of the client's (None: the client's)."""
        proxy, meter, key, route = self.proxy, self.meter, self.key, self.route
        assert meter is not None and key is not None and route is not None
        meter.request_bytes = len(raw)
        try:
            malformed: MalformedRequest | None = None
            try:
                proxied = read_request(route, raw)
            except MalformedRequest as exc:  # still counted as a request, then refused
                malformed, proxied = exc, ProxiedRequest(None, raw, None, False, False)
            self.proxied = proxied
            meter.model_requested, meter.streamed = proxied.model, proxied.stream
            enforcer = proxy.enforcer
            policy = enforcer.policy(key, proxied.model)
            estimate, _ = enforcer.estimate(policy, proxied, route.streams)
            try:
                self.ticket = ticket = await enforcer.admit(key, policy, proxied, estimate, meter, self.headers)
            except KeyRevoked:
                proxy.auth.forget(key.key_id)
                raise proxy.auth.invalid() from None
            if malformed is not None:
                raise malformed
        except InvalidApiKey as exc:  # revoked since it was cached: no customer to bill
            self.billable = False
            raise _Refused(messages.immediate(error_response(exc), exc.code)) from None
        except ShimError as exc:
            meter.refused(exc)
            raise _Refused(messages.immediate(error_response(exc, self.headers), meter.reason or exc.code)) from None
        body = proxied.upstream_body
        output_cut = estimate.cuttable and ticket.admission.output_tokens < estimate.output_tokens
        if ticket.model != proxied.model or (output_cut and not proxied.stream):
            body = _rewrite(proxied, ticket.model, ticket.admission.output_tokens if output_cut else None)
        if proxied.stream and policy.tier.cut_streams and policy.reserves:
            self.cut_at = ticket.admission.output_tokens  # a stream never carries past its reservation
            self.cut_message = (
                f"{policy.tier_name.capitalize()} tier budget reached: the response was cut at "
                f"{self.cut_at} output tokens.{' ' + policy.upgrade_hint if policy.upgrade_hint else ''}"
            )
        # The quotameter key never reaches the model: the upstream's own key, if any, replaces it.
        upstream_key = proxy.config.upstream.api_key
        set_headers = {"authorization": f"Bearer {upstream_key.get_secret_value()}"} if upstream_key else {}
        replaced = body if body != raw else None
        if replaced is not None:
            set_headers["content-length"] = str(len(body))  # Envoy keeps it in BUFFERED mode: ours to set
        return messages.mutation(set_headers, () if upstream_key else ("authorization",)), replaced

    # -- response -----------------------------------------------------------

    def _response_headers(self, headers: dict[str, str]) -> ProcessingResponse:
        meter, proxied = self.meter, self.proxied
        assert meter is not None and proxied is not None
        meter.status = status = int(headers.get(":status", "0") or 0)
        if status >= 400:
            meter.reason = "upstream_error"  # the upstream's own refusal, passed through as is
        content_type = headers.get("content-type", "").partition(";")[0].strip()
        if proxied.stream and status == 200 and content_type == "text/event-stream":
            self.tally = StreamTally(
                hide_usage=proxied.usage_injected, cut_at=self.cut_at, model=proxied.model, hold_done=True
            )
        return messages.response_headers(messages.mutation(self.headers))

    async def _response_body(self, chunk: bytes, end_of_stream: bool) -> ProcessingResponse:
        meter = self.meter
        assert meter is not None
        if self.tally is None:
            self.body += chunk
            meter.response_bytes += len(chunk)
            if end_of_stream:
                meter.first_byte()
                self._read_json()
                await self.finish()  # billed before the answer's last bytes leave
            return messages.response_body(None)
        if self.cut_sent:
            return messages.response_body(b"")  # the stream was cut: the rest is dropped
        tally = self.tally
        out = tally.feed(chunk)
        if out:
            meter.first_byte()
        ending = b""
        if tally.cut:
            self.cut_sent = True
            meter.reason = "budget_cut"
            assert self.proxied is not None
            ending = _cut_ending(tally, self.proxied, self.cut_message)
        elif end_of_stream:
            ending = tally.held
        meter.response_bytes += len(out) + len(ending)
        if tally.cut or end_of_stream:
            self._read_stream()
            await self.finish()  # billed before [DONE] or the cut ending leave
        out += ending
        return messages.response_body(None if out == chunk else out)

    def _read_json(self) -> None:
        meter, proxied = self.meter, self.proxied
        assert meter is not None and proxied is not None
        if meter.status < 300 and proxied.body is not None:
            try:
                document = json.loads(bytes(self.body))
            except ValueError:
                document = None
            meter.model_served = model_from(document)
            meter.usage = usage_from(document) or counted_usage(proxied.body, proxied.model, completion_text(document))

    def _read_stream(self) -> None:
        """The stream's usage: its usage chunk, else the text the client was sent."""
        meter, proxied, tally = self.meter, self.proxied, self.tally
        assert meter is not None and proxied is not None and tally is not None
        meter.streamed = True
        if not tally.done and meter.reason is None:
            meter.reason = "upstream_stream_cut"  # ended without [DONE]
        meter.model_served = tally.model
        meter.usage = (None if tally.cut else tally.usage) or counted_usage(proxied.body, proxied.model, tally.text)

    # -- end ----------------------------------------------------------------

    async def finish(self) -> None:
        """Settle, then emit the event (once)."""
        if self.finished or self.meter is None or self.key is None:
            return
        self.finished = True
        proxy, meter = self.proxy, self.meter
        if self.ticket is not None:
            await proxy.enforcer.settle(self.ticket, meter)
        if self.billable:
            proxy.emitter.emit(meter.encoded_event(proxy.config.shim.instance, self.key))

    async def close(self) -> None:
        """Envoy ended the stream. One that ended early (client gone, upstream reset,
        Envoy's timeout) is billed for what was delivered."""
        if self.finished or self.meter is None:
            return
        meter = self.meter
        if self.ticket is not None and meter.reason is None:
            meter.reason = "stream_reset"
        if self.tally is not None:
            self._read_stream()
        await self.finish()


class ExternalProcessor(service.ExternalProcessorServicer):
    def __init__(self, proxy: Proxy) -> None:
        self._proxy = proxy
        self._closing: set[asyncio.Task[None]] = set()

    async def Process(self, request_iterator: object, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        exchange = _Exchange(self._proxy)
        try:
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    break
                await context.write(await exchange.on(request))
        except Exception:
            if exchange.meter is not None and exchange.meter.reason is None and not exchange.finished:
                log.exception("ext_proc stream for %s failed", exchange.meter.route)
                exchange.meter.status, exchange.meter.reason = 500, "internal_error"
            raise
        finally:
            if not exchange.finished:
                # A task of its own: a cancelled stream (Envoy reset it) still settles and emits.
                task = asyncio.ensure_future(exchange.close())
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
                await asyncio.shield(task)

    async def drain(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


class ExtProcServer:
    """The gRPC server, started and stopped with the shim's resources (server.py)."""

    def __init__(self, proxy: Proxy, host: str, port: int) -> None:
        self._processor = ExternalProcessor(proxy)
        self._server = grpc.aio.server()
        service.add_ExternalProcessorServicer_to_server(self._processor, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self._host = host

    async def start(self) -> None:
        await self._server.start()
        log.info("ext_proc listening on %s:%d", self._host, self.port)

    async def stop(self, grace_s: float) -> None:
        """Let streams in flight end (Envoy's streams are its requests), then bill the rest."""
        await self._server.stop(grace_s)
        await self._processor.drain()
