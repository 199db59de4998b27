"""The OpenAI routes the shim proxies, and what it reads from a request body.

Only the body fields metering needs are read (``model``, ``stream``,
``stream_options``), after request_checks.py has checked their types and the
document's bounds; the body is re-serialised only when the shim must ask the
upstream for usage in a stream, otherwise the client's bytes go through.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass
from typing import Any

from gateway_shim.errors import MalformedRequest, RouteNotFound
from gateway_shim.request_checks import check_body, parse_body
from quotameter.config import Shim
from quotameter.tokens import count_prompt

_DEFAULT_LIMITS = Shim()


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # as recorded in events, e.g. "/v1/chat/completions"
    has_body: bool
    streams: bool  # accepts "stream": true with stream_options.include_usage
    checked: bool = False  # an OpenAI route: its body's fields are checked (request_checks.py)


# (method, path after /v1) → route. Anything else is a 404.
_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/chat/completions"): Route("/v1/chat/completions", has_body=True, streams=True, checked=True),
    ("POST", "/completions"): Route("/v1/completions", has_body=True, streams=True, checked=True),
    ("POST", "/embeddings"): Route("/v1/embeddings", has_body=True, streams=False, checked=True),
    ("GET", "/models"): Route("/v1/models", has_body=False, streams=False),
}
_MODEL_ROUTE = Route("/v1/models/{model}", has_body=False, streams=False)
_MODEL_PATH = re.compile(r"^/models/[^/]+$")


def match_route(method: str, path: str) -> Route:
    """The route for ``path`` (the part after ``/v1``), or RouteNotFound."""
    route = _ROUTES.get((method, path.rstrip("/") or "/"))
    if route is None and method == "GET" and _MODEL_PATH.match(path):
        route = _MODEL_ROUTE
    if route is None:
        raise RouteNotFound(f"Unknown request URL: {method} /v1{path}. Please check the URL and method.")
    return route


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    body: dict[str, Any] | None  # the parsed JSON body (None without one)
    upstream_body: bytes  # what goes upstream
    model: str | None
    stream: bool
    usage_injected: bool  # the shim asked for usage: drop the usage-only chunk
    prompt_tokens: int | None = None  # counted with the body, off the event loop (large bodies)


async def read_request_async(route: Route, raw: bytes, limits: Shim = _DEFAULT_LIMITS) -> ProxiedRequest:
    """``read_request``; a body past ``limits.parse_in_thread_bytes`` is parsed,
    checked and its prompt counted in a thread, so it does not stall the event
    loop (a 16 MiB prompt takes over a second to count)."""
    if len(raw) <= limits.parse_in_thread_bytes:
        return read_request(route, raw, limits)
    return await asyncio.to_thread(read_request, route, raw, limits, True)


def read_request(route: Route, raw: bytes, limits: Shim = _DEFAULT_LIMITS, count: bool = False) -> ProxiedRequest:
    """Read what metering needs from the body (its prompt counted too when
    ``count``), or MalformedRequest."""
    if not route.has_body:
        return ProxiedRequest(None, raw, None, False, False)
    body = parse_body(raw, limits)
    if not isinstance(body, dict):
        raise MalformedRequest("The request body must be a JSON object.")
    if route.checked:
        check_body(route.name, body, limits)
    model = body.get("model") if isinstance(body.get("model"), str) else None
    prompt_tokens = count_prompt(body, model) if count else None
    stream = route.streams and body.get("stream") is True
    options = body.get("stream_options")
    if stream and not (isinstance(options, dict) and options.get("include_usage") is True):
        # The usage chunk is the only exact count of a stream: ask for it, and
        # hide it from a client that did not ask.
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        upstream_body = json.dumps(body, separators=(",", ":")).encode()
        return ProxiedRequest(body, upstream_body, model, True, True, prompt_tokens)
    return ProxiedRequest(body, raw, model, stream, False, prompt_tokens)
