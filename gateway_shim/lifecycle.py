"""One request's lifecycle, whatever carries it: authenticate → admit
(reserve) → observe the response (a JSON body, or an SSE stream: tally, cut at
the budget) → settle → emit its event.

It knows no HTTP framework. Each transport is a thin adapter that feeds it
what it sees and writes what it returns: the standalone proxy (proxy.py,
aiohttp), the check endpoint (check.py: admission only, for a proxy that
forwards itself) and Envoy's ext_proc (ext_proc.py). All of them therefore
give the same limits, the same refusals and the same events. Nor does it know
an API's shape: the route's dialect (dialects/) reads the body, the usage and
the stream's events, and writes the cut's ending and the error bodies.

    exchange = await lifecycle.open(method, path, authorization, upstream)
    forward = await exchange.admit(raw_body, headers)  # or a refusal: exchange.refuse(exc)
    exchange.body(status, raw)                      # a JSON answer, or:
    stream = exchange.stream(forward, status)       #   feed(chunk) -> bytes to pass on,
    closing = stream.end()                          #   the last bytes (terminal event, or the cut's), sent after finish()
    await exchange.finish()                         # settle, then emit: before the last bytes

``open`` raises a ShimError for a request that cannot be tied to a customer
(no route, no valid key, Redis away): it is answered with ``error_answer``
and emits nothing. Past ``open``, every request emits exactly one event,
whatever its outcome, once ``finish`` runs (adapters call it in a
``finally``), after its reservation is settled.

``finish`` also tells telemetry.py what the request did (its metrics, span
ends and access line); an adapter that knows more sets it on the exchange:
its method, path and start, its SERVER span, and the upstream call
(``calling_upstream``, ``upstream_answered``, ``upstream_done``). A sampled
request's event carries its trace context.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

import redis.exceptions

from gateway_shim import refusal_text, telemetry
from gateway_shim.attribution import NO_ATTRIBUTION, Attribution, attribution_of
from gateway_shim.auth import Authenticator
from gateway_shim.emitter import EventEmitter
from gateway_shim.enforcement import Enforcer, KeyRevoked, Ticket
from gateway_shim.errors import (
    Answer,
    InvalidApiKey,
    MalformedRequest,
    ShimError,
    UpstreamFailed,
    UpstreamInvalidResponse,
    error_answer,
    quota_backend_down,
)
from gateway_shim.keystore import KeyRecord
from gateway_shim.metering import RequestMeter
from gateway_shim.dialects import CutStream
from gateway_shim.routes import ProxiedRequest, Route, match_route, read_request_async
from gateway_shim.sse import StreamTally
from gateway_shim.usage import Usage
from quotameter.events import UsageSource
from quotameter.tokens import count_text
from quotameter.config import Config
from quotameter.policy import Policy
from quotameter.redis_pool import RedisPoolExhausted

log = logging.getLogger("gateway_shim.lifecycle")


@dataclass(frozen=True, slots=True)
class Forward:
    """An admitted request, as it goes upstream."""

    body: bytes  # the body to send: the client's bytes unless ``rewritten``
    rewritten: bool  # the shim changed the body (usage asked for, fallback model, output cap)
    stream: bool  # the client asked for a stream
    cut_at: int | None  # output tokens a stream may carry before the shim ends it
    cut_message: str


class Lifecycle:
    """What every transport shares: keys, enforcement, the event emitter."""

    def __init__(self, config: Config, auth: Authenticator, enforcer: Enforcer, emitter: EventEmitter) -> None:
        self.config = config
        self.auth = auth
        self.enforcer = enforcer
        self.emitter = emitter
        self.telemetry = telemetry.ShimTelemetry(config)
        telemetry.register_emitter(emitter)

    async def open(
        self, method: str, path: str, authorization: str | None, upstream: str | None, client: str | None = None
    ) -> Exchange:
        """The request's route (``path`` is the part after ``/v1``) and its key's
        record; a ShimError for a request with neither (answer: ``error_answer``).
        ``client``: the address wrong keys count against (auth_failures.py)."""
        return await self.open_route(self.route(method, path), authorization, upstream, client)

    def route(self, method: str, path: str) -> Route:
        """The route for ``path`` (after ``/v1``), passthrough ones included; RouteNotFound else.
        Its dialect shapes the answer to a failed ``open_route``, and reads the key (``credentials``)."""
        return match_route(method, path, self.config.shim.passthrough_routes)

    async def open_route(
        self, route: Route, authorization: str | None, upstream: str | None, client: str | None = None
    ) -> Exchange:
        try:
            key = await self.auth.authenticate(authorization, client)
        except RedisPoolExhausted as exc:  # Redis is up: not an outage
            raise self.enforcer.busy(exc) from None
        except redis.exceptions.RedisError as exc:
            raise quota_backend_down(exc) from None
        return Exchange(self, route, key, RequestMeter(route=route.name, upstream=upstream))


class Exchange:
    """One request past authentication."""

    __slots__ = ("_life", "route", "key", "meter", "headers", "ticket", "proxied", "policy", "attribution",
                 "_billable", "_finished", "route_label", "method", "path", "span", "started", "admission_s",
                 "upstream_s", "upstream_status", "_upstream_t0", "client_span", "upstream_end_ns")

    def __init__(self, life: Lifecycle, route: Route, key: KeyRecord, meter: RequestMeter) -> None:
        self._life = life
        self.route = route
        self.key = key
        self.meter = meter
        self.headers: dict[str, str] = {}  # rate-limit headers, for every answer once admission ran
        if route.dialect.request_id_header:  # the request's id, as its API names it (Anthropic: request-id)
            self.headers[route.dialect.request_id_header] = meter.event_id
        self.ticket: Ticket | None = None
        self.proxied: ProxiedRequest | None = None
        self.policy: Policy | None = None
        self.attribution: Attribution = NO_ATTRIBUTION
        self._billable = True
        self._finished = False
        # What telemetry reports (telemetry.py); the adapter sets what it knows better.
        self.route_label = telemetry.route_label(route.name)
        self.method, self.path = "POST", route.name
        self.span: object | None = None  # the request's SERVER span, when traced
        self.started = time.perf_counter()  # the adapter's own start, when it has one
        self.admission_s: float | None = None
        self.upstream_s: float | None = None  # set by the adapter that called the upstream
        self.upstream_status: int | None = None  # the upstream's status (None: no answer)
        self._upstream_t0: float | None = None
        self.client_span: object | None = None  # the upstream call's GenAI CLIENT span, when traced
        self.upstream_end_ns = 0
        life.telemetry.opened()

    async def admit(self, raw: bytes, headers: Mapping[str, str] | None = None) -> Forward:
        """Admit the request whose body is ``raw``, or raise its refusal (a ShimError:
        answer it with ``refuse``). ``headers``: the client's, for its attribution."""
        life, meter = self._life, self.meter
        meter.request_bytes = len(raw)
        malformed: MalformedRequest | None = None
        try:
            proxied = await read_request_async(self.route, raw, life.config.shim)
        except MalformedRequest as exc:  # still counted as a request, then refused
            malformed, proxied = exc, ProxiedRequest(None, raw, None, False, False, dialect=self.route.dialect)
        try:
            self.attribution = attribution_of(headers or {}, proxied.body, life.config)
        except MalformedRequest as exc:  # a bad attribution too: counted as a request, then refused
            malformed = malformed or exc
        meter.attribution = self.attribution
        self.proxied = proxied
        meter.model_requested = proxied.model
        meter.streamed = proxied.stream
        enforcer = life.enforcer
        self.policy = policy = enforcer.policy(self.key, proxied.model)
        estimate, _ = enforcer.estimate(policy, proxied, self.route.streams)
        decision = meter.decision
        span = life.telemetry.child(self, "quotameter.admit")
        began = time.perf_counter()
        try:
            ticket = await enforcer.admit(self.key, policy, proxied, estimate, meter, self.headers,
                                          self.attribution.end_user)
        except KeyRevoked:
            life.auth.forget(self.key.key_id)
            raise life.auth.invalid() from None
        except MalformedRequest:
            if malformed is None:
                raise
            # A request refused for its end user (per_user.require_user) when the one it
            # named was refused already (attribution): the client learns what it sent wrong.
            meter.decision, meter.reason = decision, None
            raise malformed from None
        finally:
            self.admission_s = time.perf_counter() - began
            if span is not None:
                span.set_attribute("quotameter.decision", meter.decision.value)
                span.set_attribute("quotameter.reason", meter.reason or "")
                span.end()
            # The API's own names (and token kinds: what the tier's tokens/min rules count).
            self.headers = self.route.dialect.limit_headers(self.headers, policy.tier.tokens_per_minute_counts)
        self.ticket = ticket
        if malformed is not None:
            raise malformed
        body = proxied.upstream_body
        output_cut = estimate.cuttable and ticket.admission.output_tokens < estimate.output_tokens
        rewritten = proxied.usage_injected
        if ticket.model != proxied.model or (output_cut and not proxied.stream):
            assert proxied.body is not None
            degraded = proxied.dialect.degrade(proxied.body, ticket.model,
                                               ticket.admission.output_tokens if output_cut else None)
            body = json.dumps(degraded, separators=(",", ":")).encode()
            rewritten = True
        cut_at = None
        if proxied.stream and policy.tier.cut_streams and policy.reserves:
            cut_at = ticket.admission.output_tokens  # a stream never carries past its reservation
        message = "" if cut_at is None else refusal_text.stream_cut(policy, cut_at)
        return Forward(body, rewritten, proxied.stream, cut_at, message)

    # -- the upstream call, as the adapter sees it (for its duration and span) ----

    def calling_upstream(self) -> None:
        """The admitted request is being sent upstream now."""
        self._upstream_t0 = time.perf_counter()
        self.client_span = self._life.telemetry.client_span(self)

    def upstream_answered(self, status: int) -> None:
        self.upstream_status = status

    def upstream_done(self) -> None:
        """The upstream's part is over (its last byte, or its failure); ``finish`` calls it too."""
        if self._upstream_t0 is not None and self.upstream_s is None:
            self.upstream_s = time.perf_counter() - self._upstream_t0
            if self.client_span is not None:
                self.upstream_end_ns = time.time_ns()

    def max_output_tokens(self) -> int | None:
        proxied = self.proxied
        if proxied is None or proxied.body is None:
            return None
        value = proxied.dialect.max_output(proxied.body)
        return value if isinstance(value, int) else None

    def refuse(self, exc: BaseException) -> Answer:
        """The answer for a request that ends with ``exc`` (a refusal, an upstream
        failure, a bug), recorded in its event."""
        dialect = self.route.dialect
        if isinstance(exc, InvalidApiKey):  # revoked since it was cached: no customer to bill
            self._billable = False
            return error_answer(exc, dialect=dialect)
        if isinstance(exc, ShimError):
            self.meter.refused(exc)
            return error_answer(exc, self.headers, dialect)
        log.error("%s failed", self.route.name, exc_info=exc)
        self.meter.status, self.meter.reason = 500, "internal_error"
        return error_answer(ShimError("The gateway failed to process your request."), self.headers, dialect)

    def upstream_error(self) -> None:
        """The upstream answered with an error of its own, passed on as it is."""
        self.meter.reason = "upstream_error"

    def body(self, status: int, raw: bytes) -> None:
        """A whole (JSON) answer from the upstream: its status, model and usage.
        Raises a ShimError (answer it with ``refuse``) for a success no client
        can use: not a JSON object, an error body, or JSON where a stream was
        asked for. Nothing of those reached the client: nothing is billed."""
        meter, proxied = self.meter, self.proxied
        meter.status = status
        if status >= 400:
            self.upstream_error()
        if status < 300 and proxied is not None and proxied.body is not None:
            try:
                document = json.loads(raw)
            except ValueError:
                document = None
            if not isinstance(document, dict):
                raise UpstreamInvalidResponse("The model server's answer was not valid JSON. Please retry.")
            dialect = proxied.dialect
            error = dialect.upstream_error(document)
            if error:
                raise UpstreamFailed(_upstream_error_message(error))
            if proxied.stream:
                raise UpstreamInvalidResponse(
                    "The model server answered a stream request with a JSON body, not an event stream."
                )
            meter.model_served = dialect.served_model(document)
            meter.usage = dialect.usage(document) or _counted_usage(proxied, dialect.text(document))
        meter.response_bytes = len(raw)
        meter.first_byte()

    def is_stream(self, status: int, content_type: str | None) -> bool:
        """Whether the upstream's answer is the event stream the client asked for."""
        proxied = self.proxied
        return (proxied is not None and proxied.stream and status == 200
                and (content_type or "").partition(";")[0].strip().lower() == "text/event-stream")

    def stream(self, forward: Forward, status: int) -> StreamObserver:
        return StreamObserver(self, forward, status)

    def hand_off(self) -> None:
        """An admission of the check endpoint: the request runs behind another proxy,
        and its event comes with its usage report (check_tickets.py), not from here."""
        assert self.ticket is not None
        self._finished = True
        self._life.enforcer.hand_off(self.ticket)
        self._life.telemetry.finished(self)

    async def finish(self) -> None:
        """Settle the reservation, then emit the request's event; once, whatever
        happened. A stream calls it before its last bytes, others before the answer."""
        if self._finished:
            return
        self._finished = True
        self.upstream_done()
        life = self._life
        if self.ticket is not None:
            span = life.telemetry.child(self, "quotameter.settle")
            await life.enforcer.settle(self.ticket, self.meter)
            if span is not None:
                span.end()
        if self._billable:
            life.emitter.emit(self.meter.encoded_event(life.config.shim.instance, self.key, self.traceparent()))
        life.telemetry.finished(self)

    def traceparent(self) -> str | None:
        """The request's W3C trace context when it is sampled (it travels with its event)."""
        span = self.span
        if span is None:
            return None
        context = span.get_span_context()  # type: ignore[attr-defined]
        if not context.trace_flags.sampled:
            return None
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"

    def priced_model(self) -> str | None:
        """The model the request is priced as (the settle's choice): the one that served it."""
        meter = self.meter
        return meter.model_served or (self.ticket.model if self.ticket is not None else meter.model_requested)


class StreamObserver:
    """An SSE answer passing through: whole events are handed on as they complete,
    tallied on the way, and cut once they would carry the output past ``cut_at``.

    It also stops a stream the upstream would never end (``cut`` turns true,
    the event's reason says why): one that sent only keep-alive comments for
    ``upstream.timeout_s``, one running past ``upstream.max_stream_s``, and
    one whose event grows past ``upstream.max_response_bytes`` without ending.
    The clock is read as bytes arrive: a stream that sends nothing at all is
    ended by the adapter's read timeout (``upstream_cut("upstream_timeout")``)."""

    __slots__ = ("_exchange", "_forward", "tally", "_client_gone", "_stopped", "_started", "_last_data", "_events",
                 "_silence_s", "_max_s", "_max_event_bytes")

    def __init__(self, exchange: Exchange, forward: Forward, status: int) -> None:
        proxied = exchange.proxied
        assert proxied is not None
        self._exchange = exchange
        self._forward = forward
        exchange.meter.streamed = True
        exchange.meter.status = status
        self.tally = StreamTally(hide_usage=proxied.usage_injected, cut_at=forward.cut_at, model=proxied.model,
                                 hold_done=True, dialect=proxied.dialect)
        self._client_gone = False
        self._stopped = False
        limits = exchange._life.config.upstream
        self._silence_s, self._max_s = limits.timeout_s, limits.max_stream_s
        self._max_event_bytes = limits.max_response_bytes
        self._started = self._last_data = time.monotonic()
        self._events = 0

    @property
    def cut(self) -> bool:
        """The budget is reached, or the stream is stopped: send nothing more from the upstream."""
        return self.tally.cut or self._stopped

    def feed(self, data: bytes) -> bytes:
        """Upstream bytes in; the complete events to pass on now out (the terminal one held back)."""
        tally = self.tally
        out = tally.feed(data)
        if out:
            meter = self._exchange.meter
            meter.first_byte()
            meter.response_bytes += len(out)
        now = time.monotonic()
        if tally.events != self._events or tally.pending_bytes:  # data, or an event on its way
            self._events, self._last_data = tally.events, now
        elif now - self._last_data > self._silence_s:
            self._stop("upstream_timeout", "sent only keep-alives for %.0f s", self._silence_s)
        if now - self._started > self._max_s:
            self._stop("stream_too_long", "ran past upstream.max_stream_s (%.0f s)", self._max_s)
        elif tally.pending_bytes > self._max_event_bytes:
            self._stop("upstream_invalid_response", "sent an event past upstream.max_response_bytes (%d)",
                       self._max_event_bytes)
        return out

    def _stop(self, reason: str, why: str, *args: object) -> None:
        if not self._stopped and not self.tally.cut:
            self._stopped = True
            self._exchange.meter.reason = reason
            log.warning("ending a stream the upstream " + why, *args)

    def upstream_cut(self, reason: str = "upstream_stream_cut") -> None:
        """The upstream's connection failed mid-stream (or fell silent: ``upstream_timeout``)."""
        self._exchange.meter.reason = reason

    def client_gone(self) -> None:
        """The client went away: nothing more can reach it; what it had is billed."""
        self._client_gone = True
        self._exchange.meter.reason = "client_disconnected"

    def end(self) -> bytes:
        """The stream is over (ended, cut, failed or abandoned): record its usage and
        return its closing bytes (the held usage chunk and [DONE], or the cut's
        ending), to be sent after ``finish``."""
        exchange, tally = self._exchange, self.tally
        meter, proxied = exchange.meter, exchange.proxied
        assert proxied is not None
        ending = b""
        usage = _stream_usage(tally, proxied)
        if tally.cut:
            meter.reason = "budget_cut"
            ending = proxied.dialect.cut_ending(CutStream(
                response_id=tally.chunk_id, model=tally.model or proxied.model, output_tokens=usage.output_tokens,
                input_tokens=usage.input_tokens, text=tally.text, message=self._forward.cut_message,
                sequence_number=tally.events, last_event=tally.last_event))
        elif not self._client_gone:
            ending = tally.held_usage + tally.held
        if not tally.done and meter.reason is None:
            meter.reason = "upstream_stream_cut"  # ended without its terminal event ([DONE])
        if tally.dropped:
            log.warning("the upstream sent %d stream events that are not JSON objects: dropped", tally.dropped)
        meter.model_served = tally.model
        meter.usage = usage
        if self._client_gone:
            return b""
        meter.response_bytes += len(ending)
        return ending


def _upstream_error_message(error: object) -> str:
    message = error.get("message") if isinstance(error, dict) else error
    if not isinstance(message, str) or not message:
        return "The model server failed to answer. Please retry."
    return f"The model server failed: {message[:1000]}"


def _counted_usage(proxied: ProxiedRequest, output_text: str) -> Usage:
    """The shim's own count, for when the upstream reported nothing usable."""
    body = proxied.body
    prompt = proxied.prompt_tokens
    if prompt is None:
        prompt = proxied.dialect.count_prompt(body, proxied.model) if body else 0
    return Usage(input_tokens=prompt, output_tokens=count_text(output_text, proxied.model),
                 source=UsageSource.COUNTED)


def _stream_usage(tally: StreamTally, proxied: ProxiedRequest) -> Usage:
    """A stream's usage: the upstream's report, the exact count; without one, the shim's
    count of what the client received. A stream cut here, or one that broke off before
    the report could cover what was sent (Anthropic reports the input first, the output
    last), keeps the input as reported (cached and cache-write tokens apart) with the
    output the client received."""
    reported = tally.usage
    if reported is not None and not tally.cut and (tally.done or not reported.input_tokens):
        return reported
    counted = _counted_usage(proxied, tally.text)
    if reported is None or not reported.input_tokens:
        return counted
    if not tally.cut and reported.output_tokens >= counted.output_tokens:
        return reported  # a report after the last text (chat's usage chunk), the end lost
    return replace(reported, output_tokens=counted.output_tokens, reasoning_tokens=0, source=UsageSource.COUNTED)
