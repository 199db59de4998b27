"""The shim's own answers on the Messages API, as Anthropic gives them, so the
``anthropic`` SDKs raise their usual exceptions (RateLimitError,
AuthenticationError…) and read their usual headers.

Errors: ``{"type": "error", "error": {"type", "message"}, "request_id"}``,
the type chosen by status as Anthropic does. Rate limits: the per-minute
figures of the OpenAI headers the shim computes (ratelimit_headers.py) become
``anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-{limit,remaining,reset}``,
the reset an RFC 3339 instant; which token header depends on what the tier's
tokens/min rules count. ``retry-after`` and the IETF ``RateLimit`` fields stay.
Every answer carries ``request-id``: the request's event id, so a client's
``_request_id`` finds its row in the ledger.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from quotameter.config import TokenCount

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
_TOKEN_HEADER = {TokenCount.TOTAL: "tokens", TokenCount.INPUT: "input-tokens", TokenCount.OUTPUT: "output-tokens"}
_DURATION = re.compile(r"^(?:(\d+)ms|(?:(\d+)m)?(\d+(?:\.\d+)?)s)$")
REQUEST_ID_HEADER = "request-id"


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status (other 4xx: invalid_request_error, other 5xx: api_error)."""
    return _ERROR_TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")


def error_body(status: int, message: str, request_id: str | None = None) -> bytes:
    body: dict[str, object] = {"type": "error", "error": {"type": error_type(status), "message": message}}
    if request_id:
        body["request_id"] = request_id
    return json.dumps(body).encode()


def ratelimit_headers(openai_headers: Mapping[str, str], counts: TokenCount, now: datetime) -> dict[str, str]:
    """``openai_headers`` (an answer's headers) with OpenAI's ``x-ratelimit-*`` turned into Anthropic's."""
    out: dict[str, str] = {}
    lowered = {name.lower(): value for name, value in openai_headers.items()}
    for unit, anthropic_unit in (("requests", "requests"), ("tokens", _TOKEN_HEADER[counts])):
        limit = lowered.get(f"x-ratelimit-limit-{unit}")
        remaining = lowered.get(f"x-ratelimit-remaining-{unit}")
        reset_ms = duration_ms(lowered.get(f"x-ratelimit-reset-{unit}", ""))
        if limit is None or remaining is None or reset_ms is None:
            continue
        prefix = f"anthropic-ratelimit-{anthropic_unit}"
        out[f"{prefix}-limit"] = limit
        out[f"{prefix}-remaining"] = remaining
        out[f"{prefix}-reset"] = rfc3339(now + timedelta(milliseconds=reset_ms))
    out.update({name: value for name, value in openai_headers.items() if not name.lower().startswith("x-ratelimit-")})
    return out


def duration_ms(text: str) -> int | None:
    """Milliseconds of a duration as OpenAI writes it (``20ms``, ``8.571s``, ``1m0s``), or None."""
    match = _DURATION.match(text)
    if match is None:
        return None
    millis, minutes, seconds = match.groups()
    if millis is not None:
        return int(millis)
    return int(minutes or 0) * 60_000 + round(float(seconds) * 1000)


def rfc3339(instant: datetime) -> str:
    """An instant as Anthropic writes resets: UTC, whole seconds rounded up (never earlier than true)."""
    instant = instant.astimezone(UTC)
    if instant.microsecond:
        instant = instant.replace(microsecond=0) + timedelta(seconds=1)
    return instant.strftime("%Y-%m-%dT%H:%M:%SZ")
