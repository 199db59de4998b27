"""Envoy's ext_proc messages, as the shim reads and writes them.

Envoy (1.27 on) sends header values in ``raw_value`` and takes them from
there; ``value`` is read only as a fallback for older senders.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from envoy.config.core.v3.base_pb2 import HeaderValue, HeaderValueOption
from envoy.service.ext_proc.v3.external_processor_pb2 import (
    BodyMutation,
    BodyResponse,
    CommonResponse,
    HeaderMutation,
    HeadersResponse,
    HttpHeaders,
    ImmediateResponse,
    ProcessingResponse,
)
from envoy.type.v3.http_status_pb2 import HttpStatus

from gateway_shim.errors import Answer

_OVERWRITE = HeaderValueOption.HeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
# Set by Envoy on the answer it builds: copying them would send them twice.
_IMMEDIATE_DROP = frozenset(("content-length", "date", "server"))

CONTINUE_HEADERS = ProcessingResponse(request_headers=HeadersResponse())


def header_map(headers: HttpHeaders) -> dict[str, str]:
    """Lower-case names (HTTP/2 style, as Envoy sends them) to values."""
    return {
        h.key: h.raw_value.decode("latin-1") if h.raw_value else h.value for h in headers.headers.headers
    }


def mutation(
    set_headers: Mapping[str, str] | None = None, remove: Iterable[str] = ()
) -> HeaderMutation | None:
    if not set_headers and not remove:
        return None
    return HeaderMutation(
        set_headers=[
            HeaderValueOption(header=HeaderValue(key=k.lower(), raw_value=v.encode("latin-1")), append_action=_OVERWRITE)
            for k, v in (set_headers or {}).items()
        ],
        remove_headers=list(remove),
    )


def immediate(answer: Answer, details: str) -> ProcessingResponse:
    """The shim's own answer (status, JSON body, headers), sent by Envoy in place of the upstream's."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in _IMMEDIATE_DROP}
    return ProcessingResponse(
        immediate_response=ImmediateResponse(
            status=HttpStatus(code=answer.status),  # type: ignore[arg-type]  # any status, not just the enum's
            headers=mutation(headers),
            body=answer.body,
            details=details,
        )
    )


def request_headers(header_mutation: HeaderMutation | None) -> ProcessingResponse:
    return ProcessingResponse(request_headers=HeadersResponse(response=CommonResponse(header_mutation=header_mutation)))


def request_body(header_mutation: HeaderMutation | None, body: bytes | None) -> ProcessingResponse:
    """The buffered request body's answer: headers still held by Envoy, and the body
    replaced when ``body`` is not None (content-length is then the caller's to set)."""
    return ProcessingResponse(
        request_body=BodyResponse(
            response=CommonResponse(
                header_mutation=header_mutation, body_mutation=None if body is None else BodyMutation(body=body)
            )
        )
    )


def response_headers(header_mutation: HeaderMutation | None) -> ProcessingResponse:
    return ProcessingResponse(response_headers=HeadersResponse(response=CommonResponse(header_mutation=header_mutation)))


def response_body(body: bytes | None) -> ProcessingResponse:
    """One streamed chunk's answer: passed as is (None), or replaced (an empty body drops it)."""
    if body is None:
        return ProcessingResponse(response_body=BodyResponse())
    replaced = BodyMutation(body=body) if body else BodyMutation(clear_body=True)
    return ProcessingResponse(response_body=BodyResponse(response=CommonResponse(body_mutation=replaced)))
