"""Counting a report of a check admission that carries no usage.

A gateway behind ``/v1/check`` reads the usage from the model's answer; when
none came (the client left mid-stream, so the gateway closed the upstream
before its usage chunk; or the model reports none) its report says
``usage_source: none``. Billing it nothing would let a client stop paying by
cutting its streams, so the ingest counts it instead, as the shim's own proxy
counts such answers (gateway_shim/usage.py ``counted_usage``): the input is
the prompt the check counted and reserved (kept in its ticket), the output the
completion text the gateway passed to the client, counted for the served
model, and ``usage_source`` says ``counted``.

The gateway sends that text beside the event, in two CloudEvents extension
attributes (strings, as the spec has them):

    deliveredtext    the completion text passed to the client, or its start
                     when the gateway bounds what it keeps
    deliveredbytes   the UTF-8 bytes of all of it

The text is read here and nowhere else: the event's schema drops attributes
it does not know, so the stored event never holds it. When the gateway kept
only the start, the output is scaled to all of it (tokens per byte of the
start), rounded up.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quotameter.events import Decision, EncodedEvent, UsageEvent, UsageSource, encode_event
from quotameter.tokens import count_text

TEXT_ATTRIBUTE = "deliveredtext"
BYTES_ATTRIBUTE = "deliveredbytes"


@dataclass(frozen=True, slots=True)
class Delivered:
    """What a gateway passed to the client: the text it kept, and the UTF-8 bytes of all of it."""

    text: str
    total_bytes: int


def delivered_from(item: Any) -> Delivered | None:
    """The delivered text an event carries in its extension attributes, else None.
    A count that is not a non-negative integer is ignored: the text alone is counted."""
    if not isinstance(item, dict) or not isinstance(item.get(TEXT_ATTRIBUTE), str):
        return None
    # A lone surrogate (an escape the gateway cut in half) cannot be tokenised: it is replaced.
    text = item[TEXT_ATTRIBUTE].encode("utf-8", "replace").decode("utf-8")
    kept_bytes = len(text.encode("utf-8"))
    total = item.get(BYTES_ATTRIBUTE)
    if isinstance(total, str) and total.isascii() and total.isdigit():
        total = int(total)
    if not isinstance(total, int) or isinstance(total, bool) or total < kept_bytes:
        total = kept_bytes
    return Delivered(text, total)


def output_tokens(delivered: Delivered | None, model: str | None) -> int:
    """The delivered text's tokens; scaled up to all of it when only its start was kept."""
    if delivered is None:
        return 0
    tokens = count_text(delivered.text, model)
    kept_bytes = len(delivered.text.encode("utf-8"))
    if kept_bytes and delivered.total_bytes > kept_bytes:
        return -(-tokens * delivered.total_bytes // kept_bytes)  # exact integer ceiling
    return tokens


def counted_report(event: EncodedEvent, prompt_tokens: int, model: str | None, delivered: Delivered | None) -> EncodedEvent:
    """``event`` counted when it reports an answer served without usage; else as it is.

    Without usage means ``usage_source`` none and no tokens at all (a reporter that
    gave tokens is believed), for an answer the model gave (status below 300, as
    the proxy counts only those). ``model`` prices the count when the event names none."""
    reported = UsageEvent.model_validate_json(event.value)
    data = reported.data
    if (data.usage_source is not UsageSource.NONE or data.decision is not Decision.ADMITTED or data.status >= 300
            or data.input_tokens or data.output_tokens or data.cached_tokens or data.cache_write_tokens
            or data.reasoning_tokens):
        return event
    served = data.model_served or data.model_requested or model
    counted = data.model_copy(update={
        "input_tokens": prompt_tokens,
        "output_tokens": output_tokens(delivered, served),
        "usage_source": UsageSource.COUNTED,
    })
    return event._replace(value=encode_event(reported.model_copy(update={"data": counted})))
