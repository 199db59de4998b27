"""The routes the shim proxies, each with its API dialect (dialects/), and
what it reads from a request body.

Only the body fields metering needs are read (the model, the stream flag,
the output cap, the prompt), after the dialect has checked their types and
the document's bounds; the body is re-serialised only when the shim must ask
the upstream for usage in a stream, otherwise the client's bytes go through.
Paths listed in ``shim.passthrough_routes`` are proxied unread and unmetered.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from gateway_shim.dialects import Dialect
from gateway_shim.dialects.chat import CHAT
from gateway_shim.dialects.messages import MESSAGES
from gateway_shim.dialects.responses import RESPONSES
from gateway_shim.errors import MalformedRequest, RouteNotFound
from gateway_shim.request_checks import parse_body
from quotameter.config import Shim

_DEFAULT_LIMITS = Shim()


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # as recorded in events, e.g. "/v1/chat/completions"
    has_body: bool
    streams: bool  # accepts "stream": true with stream_options.include_usage
    checked: bool = False  # its body's fields are checked (the dialect's ``check``)
    dialect: Dialect = CHAT  # the API shape: request fields, usage, stream events, error bodies


# (method, path after /v1) → route. Anything else is a 404 (or passed through, if configured).
_ROUTES: dict[tuple[str, str], Route] = {
    ("POST", "/chat/completions"): Route("/v1/chat/completions", has_body=True, streams=True, checked=True),
    ("POST", "/completions"): Route("/v1/completions", has_body=True, streams=True, checked=True),
    ("POST", "/embeddings"): Route("/v1/embeddings", has_body=True, streams=False, checked=True),
    ("POST", "/responses"): Route("/v1/responses", has_body=True, streams=True, checked=True, dialect=RESPONSES),
    ("POST", "/messages"): Route("/v1/messages", has_body=True, streams=True, checked=True, dialect=MESSAGES),
    ("GET", "/models"): Route("/v1/models", has_body=False, streams=False),
}
_MODEL_ROUTE = Route("/v1/models/{model}", has_body=False, streams=False)
_MODEL_PATH = re.compile(r"^/models/[^/]+$")


def add_route(method: str, path: str, route: Route) -> None:
    """Serve ``route`` at ``path`` (after ``/v1``): how a dialect's module adds its API."""
    _ROUTES[(method, path)] = route


def match_route(method: str, path: str, passthrough: Sequence[str] = ()) -> Route:
    """The route for ``path`` (the part after ``/v1``), or RouteNotFound. A path
    matching a ``passthrough`` pattern (``shim.passthrough_routes``, full paths)
    is a route of its own, named for the pattern: proxied unread, unmetered."""
    route = _ROUTES.get((method, path.rstrip("/") or "/"))
    if route is None and method == "GET" and _MODEL_PATH.match(path):
        route = _MODEL_ROUTE
    if route is None:
        full = "/v1" + path
        for pattern in passthrough:
            if fnmatchcase(full, pattern):
                return Route(pattern, has_body=False, streams=False)
        raise RouteNotFound(f"Unknown request URL: {method} {full}. Please check the URL and method.")
    return route


def dialect_for(path: str) -> Dialect:
    """The dialect of the POST route at ``path`` (a full ``/v1/...`` path, query
    allowed), chat's for any other: for an adapter that only sees the URI."""
    route = _ROUTES.get(("POST", path.partition("?")[0].removeprefix("/v1").rstrip("/") or "/"))
    return route.dialect if route is not None else CHAT


@dataclass(frozen=True, slots=True)
class ProxiedRequest:
    body: dict[str, Any] | None  # the parsed JSON body (None without one)
    upstream_body: bytes  # what goes upstream
    model: str | None
    stream: bool
    usage_injected: bool  # the shim asked for usage: drop the usage-only chunk
    prompt_tokens: int | None = None  # counted with the body, off the event loop (large bodies)
    dialect: Dialect = CHAT


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
    dialect = route.dialect
    if not route.has_body:
        return ProxiedRequest(None, raw, None, False, False, dialect=dialect)
    body = parse_body(raw, limits)
    if not isinstance(body, dict):
        raise MalformedRequest("The request body must be a JSON object.")
    if route.checked:
        dialect.check(route.name, body, limits)
    model = dialect.model(body)
    prompt_tokens = dialect.count_prompt(body, model) if count else None
    stream = route.streams and dialect.wants_stream(body)
    asked = dialect.ask_for_usage(body) if stream else None
    if asked is not None:
        upstream_body = json.dumps(asked, separators=(",", ":")).encode()
        return ProxiedRequest(asked, upstream_body, model, True, True, prompt_tokens, dialect)
    return ProxiedRequest(body, raw, model, stream, False, prompt_tokens, dialect)
