"""A request's trace context as it travels with its event: the W3C
``traceparent`` string (CloudEvents' distributed-tracing extension attribute
and the Kafka record header of the same name)."""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACEPARENT_HEADER = "traceparent"
_propagator = TraceContextTextMapPropagator()


def inject_traceparent() -> str | None:
    """The current span's ``traceparent`` when it is sampled, else None (an
    unsampled request's event carries nothing)."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid or not span_context.trace_flags.sampled:
        return None
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{int(span_context.trace_flags):02x}"


def extract(traceparent: str | bytes | None) -> Context | None:
    """The context a ``traceparent`` names, or None when it is missing or malformed."""
    if not traceparent:
        return None
    if isinstance(traceparent, bytes):
        traceparent = traceparent.decode("ascii", "replace")
    context = _propagator.extract({TRACEPARENT_HEADER: traceparent})
    return context if trace.get_current_span(context).get_span_context().is_valid else None


def span_context_of(traceparent: str | bytes | None) -> trace.SpanContext | None:
    """The remote span a ``traceparent`` names (for a span link), or None."""
    context = extract(traceparent)
    return trace.get_current_span(context).get_span_context() if context is not None else None
