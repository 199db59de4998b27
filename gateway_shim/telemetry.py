"""The shim's metrics and spans (OpenTelemetry API, meter and tracer
``quotameter.shim``); telemetry/ decides where they go.

What a request costs here is part of the proxy's promise (a fraction of a
millisecond added), and the SDK's synchronous ``add``/``record`` validates
and hashes the attributes for every reader on every call (~10 µs here). So:

- counters are kept as plain sums in this process, keyed by a tuple of their
  attributes, and reported through asynchronous (observable) instruments,
  which the SDK reads only when it collects: a dict increment per request.
  They export exactly as synchronous counters do (cumulative sums).
- histograms are recorded once per request, after its answer is written
  (``loop.call_soon`` from ``finish``: the handler's step that writes the
  answer runs first), with attribute dicts built once per attribute tuple,
  which lets otel_histograms.py skip the SDK's per-call attribute work.
- spans exist only when a tracer provider is set (an OTLP endpoint); without
  one no span object is made at all.

Attribute values are bounded sets: a model is named only when the config
knows it (prices, aliases, tiers), else ``other``; never a key or an end
user, and a customer only with ``telemetry.customer_labels``.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics, trace
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import NoOpTracerProvider, ProxyTracerProvider, SpanKind, Status, StatusCode

from gateway_shim.otel_histograms import FastHistogram
from quotameter.config import Config
from quotameter.events import Decision
from telemetry import logs
from telemetry.context import extract

if TYPE_CHECKING:
    from gateway_shim.emitter import EventEmitter
    from gateway_shim.lifecycle import Exchange

OTHER = "other"
# API route -> its metric name, and the GenAI operation it is (semantic conventions).
_ROUTES = {
    "/v1/chat/completions": ("chat", "chat"),
    "/v1/completions": ("completions", "text_completion"),
    "/v1/embeddings": ("embeddings", "embeddings"),
    "/v1/responses": ("responses", "chat"),
    "/v1/messages": ("messages", "chat"),
    "/v1/models": ("models", None),
    "/v1/models/{model}": ("models", None),
}
# A reason code -> the kind of limit it is about ("" for none).
_LIMIT_KINDS = {
    "rate_limit_requests": "rpm", "user_rate_limit_requests": "rpm",
    "rate_limit_tokens": "tpm", "user_rate_limit_tokens": "tpm",
    "concurrency": "concurrency",
    "quota_tokens": "quota", "user_quota_tokens": "quota",
    "quota_budget": "budget", "fallback": "budget", "budget_cut": "budget",
    "queue_full": "queue", "queue_timeout": "queue",
    "model_not_allowed": "model",
}
# config's limit kinds (fail modes) -> the same short names
_KIND_NAMES = {
    "requests_per_minute": "rpm", "tokens_per_minute": "tpm", "concurrent_requests": "concurrency",
    "monthly_tokens": "quota", "monthly_budget_usd": "budget",
}
_OUTCOME_OF_REASON = {"fallback": "fallback", "queued": "queued", "budget_cut": "cut"}
_UPSTREAM_REASONS = {
    "upstream_error": None, "upstream_unavailable": "connection", "upstream_stream_cut": "connection",
    "upstream_timeout": "timeout", "upstream_invalid_response": "invalid_response", "stream_too_long": None,
}
_TOKEN_TYPES = ("input", "output", "cached", "reasoning", "cache_write")

# Bucket boundaries in seconds: the SDK's defaults are for milliseconds.
_ADDED_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
_ADMISSION_S = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0)
# The GenAI conventions' advice for operation durations and token counts.
_OPERATION_S = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
_TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)

_meter = metrics.get_meter("quotameter.shim")
_tracer = trace.get_tracer("quotameter.shim")

# -- in-process sums, read by the observable instruments ------------------------
_requests: defaultdict[tuple[Any, ...], int] = defaultdict(int)
_upstream_errors: defaultdict[tuple[str, str], int] = defaultdict(int)
_tokens: defaultdict[tuple[Any, ...], int] = defaultdict(int)
_cost: defaultdict[tuple[Any, ...], int] = defaultdict(int)
_fail_modes: defaultdict[tuple[str, str], int] = defaultdict(int)
_inflight = [0]
_emitters: weakref.WeakSet[EventEmitter] = weakref.WeakSet()

_REQUEST_KEYS = ("route", "outcome", "reason", "limit_kind", "tier", "model")
_attrs: dict[tuple[Any, ...], dict[str, Any]] = {}


def _attributes(names: tuple[str, ...], values: tuple[Any, ...]) -> dict[str, Any]:
    """One dict per attribute tuple, built once: the SDK reads, never keeps, it."""
    key = (names, values)
    found = _attrs.get(key)
    if found is None:
        found = _attrs[key] = {n: v for n, v in zip(names, values, strict=True) if v is not None}
    return found


def _observe(sums: dict[tuple[Any, ...], int], names: tuple[str, ...]) -> Iterator[Observation]:
    for values, total in list(sums.items()):
        yield Observation(total, _attributes(names, values))


def _requests_cb(options: CallbackOptions) -> Iterable[Observation]:
    # customer is last, and absent (None) unless customer_labels
    return _observe(_requests, (*_REQUEST_KEYS, "customer"))


def _spool_depth(options: CallbackOptions) -> Iterable[Observation]:
    return [Observation(sum(emitter.spool.depth for emitter in list(_emitters)))]


def _spool_age(options: CallbackOptions) -> Iterable[Observation]:
    oldest = [t for emitter in list(_emitters) if (t := emitter.oldest_undelivered_ms()) is not None]
    return [Observation(max(time.time() - min(oldest) / 1000, 0.0) if oldest else 0.0)]


_meter.create_observable_counter("quotameter.shim.requests", [_requests_cb], unit="{request}",
                                 description="Requests, by outcome and reason")
_meter.create_observable_counter(
    "quotameter.shim.upstream.errors", [lambda o: _observe(_upstream_errors, ("route", "kind"))], unit="{error}",
    description="Upstream calls that failed: timeout, connection, status_5xx, invalid_response")
_meter.create_observable_counter(
    "quotameter.shim.tokens", [lambda o: _observe(_tokens, ("type", "model", "tier", "customer"))], unit="{token}",
    description="Tokens served, as metered")
_meter.create_observable_counter(
    "quotameter.shim.cost", [lambda o: _observe(_cost, ("model", "tier", "customer"))], unit="{microdollar}",
    description="Cost at the shim's prices, integer micro-USD (the worker's is the billing one)")
_meter.create_observable_counter(
    "quotameter.shim.fail_mode.decisions", [lambda o: _observe(_fail_modes, ("mode", "limit_kind"))],
    unit="{decision}", description="Admissions decided without Redis")
_meter.create_observable_up_down_counter(
    "quotameter.shim.inflight", [lambda o: [Observation(_inflight[0])]], unit="{request}",
    description="Requests past authentication, not yet finished")
_meter.create_observable_gauge("quotameter.shim.spool.depth", [_spool_depth], unit="{event}",
                               description="Usage events spooled and not yet delivered")
_meter.create_observable_gauge("quotameter.shim.spool.age", [_spool_age], unit="s",
                               description="Age of the oldest undelivered usage event (0 when none)")

_admission_duration = FastHistogram(_meter.create_histogram(
    "quotameter.shim.admission.duration", unit="s", description="Admission, from the body read to the decision",
    explicit_bucket_boundaries_advisory=_ADMISSION_S))
_added_duration = FastHistogram(_meter.create_histogram(
    "quotameter.shim.added.duration", unit="s", description="The proxy's own time: the request's minus the upstream's",
    explicit_bucket_boundaries_advisory=_ADDED_S))
_upstream_duration = FastHistogram(_meter.create_histogram(
    "quotameter.shim.upstream.duration", unit="s", description="The upstream call, to its last byte",
    explicit_bucket_boundaries_advisory=_OPERATION_S))
_token_usage = FastHistogram(_meter.create_histogram(
    "gen_ai.client.token.usage", unit="{token}", description="Tokens used per GenAI operation",
    explicit_bucket_boundaries_advisory=_TOKENS))
_operation_duration = FastHistogram(_meter.create_histogram(
    "gen_ai.client.operation.duration", unit="s", description="GenAI operation duration",
    explicit_bucket_boundaries_advisory=_OPERATION_S))


def register_emitter(emitter: EventEmitter) -> None:
    """Count ``emitter``'s spool in the spool gauges (while it lives)."""
    _emitters.add(emitter)


def fail_mode(mode: str, limit_kind: str) -> None:
    """One admission decided without Redis: ``mode`` open or closed."""
    _fail_modes[(mode, ",".join(_KIND_NAMES.get(kind, kind) for kind in limit_kind.split(",")) if limit_kind else "")] += 1


def route_label(route_name: str) -> str:
    """The route's metric name: chat, completions, … (passthrough routes: other)."""
    known = _ROUTES.get(route_name)
    return known[0] if known is not None else OTHER


def tracing() -> bool:
    """Whether a tracer provider collects spans (otherwise none are made)."""
    return not isinstance(trace.get_tracer_provider(), (NoOpTracerProvider, ProxyTracerProvider))


def outcome_of(decision: Decision, reason: str | None, status: int) -> str:
    if decision is Decision.REFUSED:
        return "refused"
    if reason in _UPSTREAM_REASONS:
        return "upstream_error"
    if reason in _OUTCOME_OF_REASON:
        return _OUTCOME_OF_REASON[reason]
    return "error" if status >= 400 else "admitted"


class ShimTelemetry:
    """The recording side, one per lifecycle: what the config says about labels."""

    def __init__(self, config: Config) -> None:
        self.customer_labels = config.telemetry.customer_labels
        self.provider = config.upstream.provider
        known: set[str] = set()
        for price in config.prices:
            known.add(price.model)
            known.update(price.aliases)
        for tier in config.tiers.values():
            known.update(getattr(tier, "allowed_models", None) or ())
            fallback = getattr(tier, "fallback", None)
            if fallback is not None and getattr(fallback, "model", None):
                known.add(fallback.model)
        self.known_models = frozenset(known)
        self.tracing = tracing()

    def model(self, name: str | None) -> str:
        return name if name is not None and name in self.known_models else OTHER

    # -- spans (only when tracing) --------------------------------------------

    def server_span(self, method: str, route_path: str | None, path: str,
                    traceparent: str | None = None) -> trace.Span | None:
        """The request's SERVER span, or None when not tracing or sampled out (then
        nothing more of the request's trace is made). ``traceparent``: the client's,
        whose sampling decision a parent-based sampler follows. The caller makes it current."""
        if not self.tracing:
            return None
        name = f"{method} {route_path}" if route_path else method
        span = _tracer.start_span(name, context=extract(traceparent) if traceparent else None, kind=SpanKind.SERVER,
                                  attributes={"http.request.method": method, "url.path": path})
        return span if span.is_recording() else None

    def child(self, exchange: Exchange, name: str) -> trace.Span | None:
        """A span under the request's (current) SERVER span, when that one is recorded."""
        return _tracer.start_span(name) if exchange.span is not None else None

    def client_span(self, exchange: Exchange) -> trace.Span | None:
        """The upstream call as a GenAI CLIENT span (an HTTP one for a route that is no GenAI operation)."""
        if exchange.span is None:
            return None
        operation = _ROUTES.get(exchange.route.name, (None, None))[1]
        if operation is None:
            return _tracer.start_span(f"{exchange.method} {exchange.route.name}", kind=SpanKind.CLIENT)
        model = exchange.meter.model_requested
        attributes: dict[str, Any] = {"gen_ai.operation.name": operation, "gen_ai.provider.name": self.provider}
        if model:
            attributes["gen_ai.request.model"] = model
        max_tokens = exchange.max_output_tokens()
        if max_tokens is not None:
            attributes["gen_ai.request.max_tokens"] = max_tokens
        return _tracer.start_span(f"{operation} {model}" if model else operation, kind=SpanKind.CLIENT,
                                  attributes=attributes)

    # -- one request ------------------------------------------------------------

    def unopened(self, method: str, path: str, route: str, reason: str, status: int, started: float,
                 span: trace.Span | None = None) -> None:
        """A request answered before it had a customer (unknown route, bad key, Redis away)."""
        _requests[(route, "error", reason, "", "", OTHER, None)] += 1
        if span is not None:
            _end_server_span(span, status, "error", reason)
        logs.access(method=method, path=path, status=status, outcome="error", reason=reason,
                    duration_ms=round((time.perf_counter() - started) * 1000, 3))

    def finished(self, exchange: Exchange) -> None:
        """Count the request now (sums); its histograms, span ends and access line
        run just after, once its answer is written."""
        _inflight[0] -= 1
        meter, key = exchange.meter, exchange.key
        if exchange.client_span is not None:
            _end_client_span(exchange.client_span, exchange)
        reason = meter.reason or ""
        outcome = outcome_of(meter.decision, meter.reason, meter.status)
        customer = key.customer if self.customer_labels else None
        model = self.model(meter.model_requested)
        route = exchange.route_label
        _requests[(route, outcome, reason, _LIMIT_KINDS.get(reason, ""), key.tier, model, customer)] += 1
        usage = meter.usage
        if usage.input_tokens or usage.output_tokens:
            tier = key.tier
            served = self.model(meter.model_served or meter.model_requested)
            for kind, count in zip(_TOKEN_TYPES, (usage.input_tokens, usage.output_tokens, usage.cached_tokens,
                                                  usage.reasoning_tokens, usage.cache_write_tokens), strict=True):
                if count:
                    _tokens[(kind, served, tier, customer)] += count
        upstream_kind = None
        if exchange.upstream_s is not None or meter.reason in _UPSTREAM_REASONS:
            upstream_kind = _upstream_error_kind(exchange.upstream_status, meter.reason)
            if upstream_kind is not None:
                _upstream_errors[(route, upstream_kind)] += 1
        asyncio.get_running_loop().call_soon(self._record, exchange, outcome, reason, model, upstream_kind,
                                             time.perf_counter())

    def _record(self, exchange: Exchange, outcome: str, reason: str, model: str, upstream_kind: str | None,
                end: float) -> None:
        meter = exchange.meter
        route = exchange.route_label
        if exchange.admission_s is not None:
            _admission_duration.record(exchange.admission_s, _attributes(("route", "outcome"), (route, outcome)))
        total_s = end - exchange.started
        upstream_s = exchange.upstream_s
        if upstream_s is not None:
            _added_duration.record(max(total_s - upstream_s, 0.0),
                                   _attributes(("route", "streamed"), (route, meter.streamed)))
            status = exchange.upstream_status
            status_class = "error" if status is None else f"{status // 100}xx"
            _upstream_duration.record(upstream_s, _attributes(("route", "status_class"), (route, status_class)))
            operation = _ROUTES.get(exchange.route.name, (None, None))[1]
            if operation is not None:
                served = self.model(meter.model_served) if meter.model_served else model
                # error.type: the HTTP status the model answered, else how the call failed
                error = str(status) if status is not None and status >= 400 else upstream_kind
                _operation_duration.record(upstream_s, _attributes(
                    ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model", "gen_ai.response.model",
                     "error.type"), (operation, self.provider, model, served, error)))
                usage = meter.usage
                if usage.source.value != "none":
                    names = ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model",
                             "gen_ai.response.model", "gen_ai.token.type")
                    _token_usage.record(usage.input_tokens, _attributes(
                        names, (operation, self.provider, model, served, "input")))
                    _token_usage.record(usage.output_tokens, _attributes(
                        names, (operation, self.provider, model, served, "output")))
        cost = exchange.cost_micro_usd()
        if cost:
            customer = exchange.key.customer if self.customer_labels else None
            _cost[(self.model(meter.model_served or meter.model_requested), exchange.key.tier, customer)] += cost
        if exchange.span is not None:
            _end_server_span(exchange.span, meter.status, outcome, reason)
        usage = meter.usage
        # Runs in the request's context (call_soon copies it): the line carries its ids.
        logs.access(method=exchange.method, path=exchange.path, status=meter.status, outcome=outcome, reason=reason,
                    tier=exchange.key.tier, model=meter.model_requested, input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens, duration_ms=round(total_s * 1000, 3),
                    event_id=meter.event_id, key_id=exchange.key.key_id)

    def opened(self) -> None:
        _inflight[0] += 1

    def handed_off(self) -> None:
        _inflight[0] -= 1


def _end_server_span(span: trace.Span, status: int, outcome: str, reason: str) -> None:
    span.set_attribute("http.response.status_code", status)
    span.set_attribute("quotameter.outcome", outcome)
    span.set_attribute("quotameter.reason", reason)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))
    span.end()


def _upstream_error_kind(status: int | None, reason: str | None) -> str | None:
    """How an upstream call failed (None: it did not, or the client's request was at fault: a 4xx)."""
    if status is not None and status >= 500:
        return "status_5xx"
    if reason == "upstream_error":  # an error passed on (4xx: the client's), or one in a 2xx body
        return None if status is not None and status >= 400 else "invalid_response"
    return _UPSTREAM_REASONS.get(reason) if reason else None


def _end_client_span(span: trace.Span, exchange: Exchange) -> None:
    """The upstream call's span, ended when the upstream's part did, with what its answer said."""
    meter = exchange.meter
    if exchange.upstream_status is not None:
        span.set_attribute("http.response.status_code", exchange.upstream_status)
    if meter.model_served:
        span.set_attribute("gen_ai.response.model", meter.model_served)
    usage = meter.usage
    if usage.source.value != "none":
        span.set_attribute("gen_ai.usage.input_tokens", usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", usage.output_tokens)
    kind = _upstream_error_kind(exchange.upstream_status, meter.reason)
    if kind is not None:
        span.set_attribute("error.type", kind)
        span.set_status(Status(StatusCode.ERROR))
    span.end(end_time=exchange.upstream_end_ns or None)
