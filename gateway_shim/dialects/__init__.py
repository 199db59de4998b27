"""API dialects: what one API shape (chat completions, the Responses API,
Anthropic's Messages…) means to the request lifecycle (lifecycle.py), which
is the same for all of them.

A dialect provides, for its API:

- the request: its body's checks (OpenAI-shaped 400s), the model, whether a
  stream is asked for, the output cap the client set (``max_output``) and the
  field it goes in (``cap_field``), the body rewritten to ask for usage in a
  stream (``ask_for_usage``; None when it comes anyway), the prompt's tokens
  counted by the shim, and the degraded body (fallback model, output cap);
- the credentials: where its clients put their key (``credentials``);
- a JSON answer: its usage, served model, generated text, and an error the
  upstream sent with a success status;
- a stream event (its JSON data): the served model, the usage it carries
  (merged with what earlier events said: Anthropic splits it in two), the
  generated text, the response id, and whether it is the stream's normal end
  (held back by the tally until the request is settled and emitted);
- the cut: the events that end a stream the shim stops at the budget, read
  by the API's SDKs as a normal end plus the reason;
- refusals: the error body (``error_body``) and the rate-limit header names
  (``limit_headers`` renames OpenAI's ``x-ratelimit-*``).

Chat completions (chat.py) keep fast paths of their own in sse.py (most
chunks are never parsed); every other dialect's stream events are parsed one
by one through the methods below.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from gateway_shim.usage import Usage
from quotameter.config import TokenCount


class Limits(Protocol):
    """The bounds a body is checked against (quotameter.config.Shim has them)."""

    max_json_depth: int
    max_messages: int
    max_content_parts: int


@dataclass(frozen=True, slots=True)
class CutStream:
    """What a cut stream's ending is built from."""

    response_id: str | None  # the upstream's id for the answer, when one was seen
    model: str | None  # the served model (else the one asked for)
    output_tokens: int  # what the client was served
    input_tokens: int  # the prompt, as the shim counts it
    text: str  # the text the client was served
    message: str  # why the stream ends (refusal_text.stream_cut)
    sequence_number: int  # events the upstream sent (for APIs that number their events)
    last_event: dict[str, Any] | None = None  # the last event the client was sent (what it left open)


class Dialect:
    """One API shape. The defaults are OpenAI's conventions; a dialect overrides what differs."""

    name = "openai"
    cap_field = "max_tokens"  # the output cap a degraded request is sent with
    fast_chunks = False  # sse.py's chat fast paths apply (chat.py only)
    # The API requires the output cap: a ceiling the budget may lower (cut_streams), not a demand.
    cap_required = False
    request_id_header: str | None = None  # a header every answer carries the request's event id in

    # -- request --------------------------------------------------------------

    def check(self, route: str, body: dict[str, Any], limits: Limits) -> None:
        """Raise InvalidParameter for a field admission or metering could not read."""

    def model(self, body: dict[str, Any]) -> str | None:
        model = body.get("model")
        return model if isinstance(model, str) else None

    def wants_stream(self, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    def max_output(self, body: dict[str, Any]) -> int | None:
        """The output cap the client set (a positive int), else None."""
        return _positive(body.get(self.cap_field))

    def choices(self, body: dict[str, Any]) -> int:
        return 1

    def ask_for_usage(self, body: dict[str, Any]) -> dict[str, Any] | None:
        """The body asking the upstream for usage in a stream, or None when it comes anyway."""
        return None

    def count_prompt(self, body: dict[str, Any], model: str | None) -> int:
        raise NotImplementedError

    def degrade(self, body: dict[str, Any], model: str | None, max_output: int | None) -> dict[str, Any]:
        """The body for a degraded admission: the fallback ``model``, the output cap admitted."""
        body = dict(body)
        if model:
            body["model"] = model
        if max_output is not None:
            body[self.cap_field] = max_output
        return body

    def credentials(self, headers: Mapping[str, str]) -> str | None:
        """The client's credentials as an ``Authorization`` value (``headers``: case-insensitive
        or lower-case names)."""
        return headers.get("authorization") or headers.get("Authorization")

    # -- a JSON answer ----------------------------------------------------------

    def usage(self, document: dict[str, Any]) -> Usage | None:
        raise NotImplementedError

    def served_model(self, document: dict[str, Any]) -> str | None:
        model = document.get("model")
        return model if isinstance(model, str) and model else None

    def text(self, document: dict[str, Any]) -> str:
        raise NotImplementedError

    def upstream_error(self, document: dict[str, Any]) -> object | None:
        """An error the upstream answered with a success status, else None."""
        return document.get("error") or None

    # -- one stream event (its JSON data) ----------------------------------------

    def event_model(self, event: dict[str, Any]) -> str | None:
        return self.served_model(event)

    def event_id(self, event: dict[str, Any]) -> str | None:
        value = event.get("id")
        return value if isinstance(value, str) else None

    def event_usage(self, event: dict[str, Any], previous: Usage | None) -> Usage | None:
        """The stream's usage once ``event`` is read (``previous``: what earlier events said)."""
        return self.usage(event) or previous

    def event_text(self, event: dict[str, Any]) -> str:
        return self.text(event)

    def event_ends(self, event: dict[str, Any]) -> bool:
        """Whether ``event`` is the stream's normal end."""
        return False

    def cut_ending(self, cut: CutStream) -> bytes:
        """The events ending a stream cut at the budget: a normal end to the SDK, and why."""
        raise NotImplementedError

    # -- refusals -----------------------------------------------------------------

    def error_body(self, status: int, error_type: str, code: str, message: str, param: str | None) -> bytes:
        return json.dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}}).encode()

    def limit_headers(self, headers: dict[str, str], counts: TokenCount = TokenCount.TOTAL) -> dict[str, str]:
        """The rate-limit headers under this API's names (given OpenAI's; ``counts``: what
        the tier's tokens/min rules count)."""
        return headers


def _positive(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sse(event: dict[str, Any], name: str | None = None) -> bytes:
    """One SSE event carrying ``event`` as its data (and ``event: name`` when given)."""
    data = b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"
    return b"event: " + name.encode() + b"\n" + data if name else data
