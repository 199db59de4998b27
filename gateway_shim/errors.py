"""What can go wrong in the shim, and the one place it becomes an HTTP answer.

    QuotameterError
    └── ShimError                 an OpenAI-style error body: status, type, code
        ├── InvalidApiKey         401  missing, unknown or revoked key
        ├── TooManyAuthFailures   429  this client address presented too many wrong keys or tokens
        ├── RouteNotFound         404  not an OpenAI route the shim proxies
        ├── MalformedRequest      400  the body is not a JSON object
        │   ├── InvalidParameter  400  a field admission or metering reads has the wrong type or value (param: which)
        │   ├── NestingTooDeep    400  JSON nested past shim.max_json_depth
        │   └── UndecodableBody   400  the body does not decode as its Content-Encoding says
        ├── RequestTimeout        408  the body did not arrive within shim.client_body_timeout_s
        ├── ModelNotAllowed       403  the model is not in the tier's / key's allowed_models
        ├── Refusal               a limit refused the request; carries the retry delay
        │   ├── RateLimited       429  rate_limit_exceeded, type "requests" or "tokens"
        │   │   └── QueueRefused  429  batch queue full, or the wait ran past max_wait_s
        │   └── QuotaExceeded     429 (or the tier's 402) insufficient_quota
        ├── UpstreamUnavailable   502  the upstream refused or dropped the connection
        ├── UpstreamTimeout       504  the upstream did not answer in upstream.timeout_s
        ├── BackendUnavailable    503  Redis is unreachable (the shim fails closed)
        ├── BackendBusy           503  Redis is up, but no pooled connection freed up in time
        ├── MeteringUnavailable   503  the usage spool is full or cannot be written
        ├── UsageBadRequest       400  GET /v1/usage: a bad parameter
        ├── UsageForbidden        403  GET /v1/usage: a key asked for another customer
        ├── UsageNotFound         404  GET /v1/usage: no such customer (admin token)
        ├── HistoryUnavailable    503  GET /v1/usage?start_time=…: the worker that reads the ledger does not answer
        ├── IngestDisabled        404  POST /v1/events: no shim.ingest_token is set
        ├── InvalidEvents         400  POST /v1/events: an event breaks the schema (param: where)
        ├── PayloadTooLarge       413  a body over shim.max_body_bytes; POST /v1/events: over ingest_max_bytes or ingest_max_events
        └── UnsupportedMediaType  415  POST /v1/events: not a CloudEvents content type

Bodies follow OpenAI's shape, so every SDK raises its usual exception:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass

from aiohttp import web

from quotameter.errors import QuotameterError

log = logging.getLogger("gateway_shim.errors")

class ShimError(QuotameterError):
    """A request the shim answers itself. ``code`` also becomes the event's reason."""

    status = 500
    error_type = "server_error"
    code = "internal_error"
    retry_after_s: float | None = None  # sent as Retry-After when set
    param: str | None = None  # the offending field, when one is to blame

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidApiKey(ShimError):
    """The presented key is missing, malformed, unknown or revoked. Create one
    with ``quotameter keys create``."""

    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class TooManyAuthFailures(ShimError):
    """A client address presented more wrong keys or tokens than
    ``shim.auth_failures_per_minute`` allows: every request from it is refused
    until its failures age out (``Retry-After``). Fix the client's key; behind
    a proxy, list the proxy in ``shim.trusted_proxies`` so clients are told apart."""

    status = 429
    error_type = "invalid_request_error"
    code = "too_many_authentication_failures"

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            "Too many requests with an invalid API key from this address. "
            f"Retry in {max(1, math.ceil(retry_after_s))}s with a valid key."
        )
        self.retry_after_s = retry_after_s


class RouteNotFound(ShimError):
    status = 404
    error_type = "invalid_request_error"
    code = "unknown_url"


class MalformedRequest(ShimError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_json"


class InvalidParameter(MalformedRequest):
    """A body field the shim reads (model, max_tokens, stream, messages…) has the
    wrong type or value, or is missing; ``param`` names it as OpenAI does
    (``messages[2].role``)."""

    def __init__(self, message: str, param: str, code: str = "invalid_type") -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # invalid_type, invalid_value, missing_required_parameter, too_many_items


class NestingTooDeep(MalformedRequest):
    code = "nesting_too_deep"


class UndecodableBody(MalformedRequest):
    code = "invalid_content_encoding"


class RequestTimeout(ShimError):
    """The client did not send its whole body within ``shim.client_body_timeout_s``."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class ModelNotAllowed(ShimError):
    status = 403
    error_type = "invalid_request_error"
    code = "model_not_allowed"


class Refusal(ShimError):
    """A limit refused the request; retry after ``retry_after_s`` (None: not
    within the period). ``reason`` becomes the event's reason."""

    status = 429

    def __init__(self, message: str, retry_after_s: float | None, reason: str) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.reason = reason


class RateLimited(Refusal):
    error_type = "requests"
    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float | None, reason: str, unit: str = "requests") -> None:
        super().__init__(message, retry_after_s, reason)
        self.error_type = unit  # OpenAI: "requests" or "tokens"


class QueueRefused(RateLimited):
    def __init__(self, reason: str, message: str, retry_after_s: float | None = 1.0) -> None:
        super().__init__(message, retry_after_s, reason)


class QuotaExceeded(Refusal):
    error_type = "insufficient_quota"
    code = "insufficient_quota"

    def __init__(self, message: str, retry_after_s: float | None, reason: str, status: int = 429) -> None:
        super().__init__(message, retry_after_s, reason)
        self.status = status


class UpstreamUnavailable(ShimError):
    """The upstream model server refused the connection or dropped it before
    answering. Check ``upstream.url`` and that the server is up."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamTimeout(ShimError):
    """The upstream took longer than ``upstream.timeout_s`` to answer."""

    status = 504
    error_type = "upstream_error"
    code = "upstream_timeout"


class UpstreamInvalidResponse(ShimError):
    """The upstream answered with success but nothing a client can read: a
    body that is not a JSON object, a JSON body where a stream was asked for,
    or an answer past ``upstream.max_response_bytes``. Check the upstream's
    logs and that it speaks OpenAI's API."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_invalid_response"


class UpstreamFailed(ShimError):
    """The upstream answered with success but its body is an error: passed on
    as a 502 with the upstream's message."""

    status = 502
    error_type = "upstream_error"
    code = "upstream_error"


class BackendUnavailable(ShimError):
    """Redis is unreachable, so nothing can be admitted (fail closed). Check
    ``services.redis_url``."""

    status = 503
    error_type = "server_error"
    code = "quota_backend_unavailable"



def quota_backend_down(exc: Exception) -> BackendUnavailable:
    """Redis unreachable (not merely busy): the answer of every /v1/ endpoint, logged here once."""
    log.error("Redis unreachable: %s", exc)
    return BackendUnavailable("The quota service is temporarily unavailable. Please retry shortly.")

class BackendBusy(ShimError):
    """Redis is up, but every connection of the shim's pool stayed busy for
    ``services.redis_pool_timeout_ms``: the shim is asked more than Redis
    answers. Not an outage, so no fail mode applies. Raise
    ``services.redis_max_connections`` or add shim processes."""

    status = 503
    error_type = "server_error"
    code = "quota_backend_busy"
    retry_after_s = 1.0


@dataclass(frozen=True, slots=True)
class Answer:
    """An answer the shim gives itself, before any transport writes it."""

    status: int
    headers: dict[str, str]
    body: bytes


def error_answer(error: ShimError, headers: Mapping[str, str] | None = None) -> Answer:
    """``error`` as OpenAI's error JSON, with ``headers`` (the rate-limit ones) and Retry-After."""
    body = {"error": {"message": error.message, "type": error.error_type, "param": error.param, "code": error.code}}
    answer_headers = {**(headers or {}), "Content-Type": "application/json; charset=utf-8"}
    if error.retry_after_s is not None:
        answer_headers["Retry-After"] = str(max(1, math.ceil(error.retry_after_s)))
    return Answer(error.status, answer_headers, json.dumps(body).encode())


def to_response(answer: Answer) -> web.Response:
    return web.Response(status=answer.status, body=answer.body, headers=answer.headers)


def error_response(error: ShimError, headers: Mapping[str, str] | None = None) -> web.Response:
    return to_response(error_answer(error, headers))


class MeteringUnavailable(ShimError):
    """The usage spool is full (Kafka has been unreachable for long) or cannot
    be written, so the request could not be billed and was refused. Bring the
    broker back (``services.kafka_bootstrap``) or free disk space; the shim
    serves again as soon as the spool drains below ``shim.spool_max_bytes``."""

    status = 503
    error_type = "server_error"
    code = "metering_unavailable"


class UsageForbidden(ShimError):
    """A key asked for another customer's usage: a key reads its own only."""

    status = 403
    error_type = "invalid_request_error"
    code = "permission_denied"


class UsageBadRequest(ShimError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_parameter"


class UsageNotFound(ShimError):
    status = 404
    error_type = "invalid_request_error"
    code = "customer_not_found"


class HistoryUnavailable(ShimError):
    """Usage history is read from the ledger through the pipeline worker
    (services.worker_url), which did not answer. Check that a worker runs."""

    status = 503
    error_type = "server_error"
    code = "usage_history_unavailable"
    retry_after_s = 5.0


class IngestDisabled(ShimError):
    """POST /v1/events is off until ``shim.ingest_token`` is set (best from
    QUOTAMETER_SHIM__INGEST_TOKEN)."""

    status = 404
    error_type = "invalid_request_error"
    code = "ingest_disabled"


class InvalidEvents(ShimError):
    """Reported usage events that break the ``quotameter.request.v1`` schema;
    ``param`` names the first offending field. Nothing of the request was taken."""

    status = 400
    error_type = "invalid_request_error"
    code = "invalid_event"

    def __init__(self, message: str, param: str | None) -> None:
        super().__init__(message)
        self.param = param


class PayloadTooLarge(ShimError):
    """A POST /v1/events body past ``shim.ingest_max_bytes`` or a batch past
    ``shim.ingest_max_events``: send smaller batches."""

    status = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class UnsupportedMediaType(ShimError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"
