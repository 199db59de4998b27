"""The upstream model server: one pooled HTTP session, and the two ways an
answer comes back through the shim (one JSON body, or a stream of events).

Streams are written to the client event by event as they arrive. A stream
the upstream cuts short is ended cleanly for the client after the last whole
event, and what was delivered is counted. A client that goes away stops the
relay; the tokens it received are still metered.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway_shim.errors import UpstreamTimeout, UpstreamUnavailable
from gateway_shim.metering import RequestMeter
from gateway_shim.routes import ProxiedRequest
from gateway_shim.sse import StreamTally
from gateway_shim.usage import completion_text, counted_usage, model_from, usage_from
from quotameter.config import Upstream as UpstreamConfig

log = logging.getLogger("gateway_shim.upstream")

# Not passed upstream: hop-by-hop headers, the client's quotameter key, and
# what aiohttp sets itself (it negotiates compression and decompresses).
_REQUEST_DROP = frozenset(
    "host connection keep-alive proxy-authorization proxy-connection te trailer transfer-encoding "
    "upgrade content-length authorization accept-encoding".split()
)
_RESPONSE_DROP = frozenset(
    "connection keep-alive transfer-encoding content-length content-encoding server date".split()
)


class Upstream:
    def __init__(self, config: UpstreamConfig) -> None:
        self.base_url = config.url.rstrip("/")
        self._authorization = f"Bearer {config.api_key.get_secret_value()}" if config.api_key else None
        # No total timeout (streams run long); the upstream must connect and keep talking.
        # No connect timeout either: it would also bound the wait for a free
        # connection, turning a burst past max_connections into 504s.
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=config.timeout_s)
        self._max_connections = config.max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, keepalive_timeout=30)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    def open(self, request: web.Request, path: str, body: bytes) -> _Exchange:
        """``async with``: the upstream's response to ``request`` (its path after /v1
        is ``path``), released on the way out."""
        assert self._session is not None, "Upstream.start() was not awaited"
        return _Exchange(self._session, self._authorization, self.base_url, request, path, body)


class _Exchange:
    """One upstream call as an async context manager (a plain class: cheaper than
    a generator-based one on every request)."""

    __slots__ = ("_session", "_authorization", "_base_url", "_request", "_path", "_body", "_response")

    def __init__(
        self, session: aiohttp.ClientSession, authorization: str | None, base_url: str,
        request: web.Request, path: str, body: bytes,
    ) -> None:
        self._session, self._authorization, self._base_url = session, authorization, base_url
        self._request, self._path, self._body = request, path, body
        self._response: aiohttp.ClientResponse | None = None

    async def __aenter__(self) -> aiohttp.ClientResponse:
        request = self._request
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP)
        if self._authorization:
            headers["Authorization"] = self._authorization
        query = request.query_string
        url = self._base_url + self._path + (f"?{query}" if query else "")
        try:
            self._response = await self._session.request(request.method, url, data=self._body or None, headers=headers)
        except TimeoutError:
            log.warning("upstream %s did not answer within its timeout", url)
            raise UpstreamTimeout("The model server did not answer in time. Please retry.") from None
        except aiohttp.ClientError as exc:
            # The detail (addresses, errno) is for the operator's log, not the client.
            log.warning("upstream %s unavailable: %s", url, exc)
            raise UpstreamUnavailable("The model server is unavailable. Please retry shortly.") from None
        return self._response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            self._response.release()


def _client_headers(upstream: aiohttp.ClientResponse, ours: dict[str, str]) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP)
    headers.update(ours)  # our x-ratelimit-* win over the upstream's own
    return headers


def is_stream(upstream: aiohttp.ClientResponse, proxied: ProxiedRequest) -> bool:
    return proxied.stream and upstream.status == 200 and upstream.content_type == "text/event-stream"


async def relay_body(
    upstream: aiohttp.ClientResponse, proxied: ProxiedRequest, meter: RequestMeter, headers: dict[str, str]
) -> web.Response:
    try:
        raw = await upstream.read()
    except TimeoutError:
        raise UpstreamTimeout("The model server stopped sending its answer. Please retry.") from None
    except aiohttp.ClientError as exc:
        log.warning("upstream dropped the connection mid-answer: %s", exc)
        raise UpstreamUnavailable("The model server dropped the connection. Please retry shortly.") from None
    meter.status = upstream.status
    meter.response_bytes = len(raw)
    if upstream.status >= 400:
        meter.reason = "upstream_error"  # the upstream's own refusal, passed through as is
    if upstream.status < 300 and proxied.body is not None:
        try:
            document = json.loads(raw)
        except ValueError:
            document = None
        meter.model_served = model_from(document)
        meter.usage = usage_from(document) or counted_usage(proxied.body, proxied.model, completion_text(document))
    meter.first_byte()
    return web.Response(status=upstream.status, body=raw, headers=_client_headers(upstream, headers))


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    proxied: ProxiedRequest,
    meter: RequestMeter,
    headers: dict[str, str],
    cut_at: int | None = None,
    cut_message: str = "",
    finish: Callable[[], Awaitable[None]] | None = None,
) -> web.StreamResponse:
    """``cut_at``: the output tokens the stream may carry before the shim ends
    it with a final chunk (finish_reason "length") and an error event.

    ``finish`` (settle and emit the request's event) runs once the usage is
    known and before the stream's last bytes ([DONE], the cut ending, the end
    of the body) go out: a client that read the whole answer was billed,
    whenever the shim is killed. The other order would leave a window, the
    settle's Redis round trip long, in which a SIGKILL serves a stream unbilled."""
    meter.streamed = True
    meter.status = upstream.status
    response = web.StreamResponse(status=upstream.status, headers=_client_headers(upstream, headers))
    await response.prepare(request)
    tally = StreamTally(hide_usage=proxied.usage_injected, cut_at=cut_at, model=proxied.model, hold_done=True)
    chunks = upstream.content.iter_any()
    while True:
        try:
            data = await chunks.__anext__()
        except StopAsyncIteration:
            break
        except (aiohttp.ClientError, TimeoutError):
            meter.reason = "upstream_stream_cut"
            break
        out = tally.feed(data)
        if not out:
            if tally.cut:
                break
            continue
        meter.first_byte()
        try:
            await response.write(out)
        except ConnectionError:  # the client went away
            meter.reason = "client_disconnected"
            break
        meter.response_bytes += len(out)
        if tally.cut:
            break
    ending = b""
    if tally.cut:
        meter.reason = "budget_cut"
        ending = _cut_ending(tally, proxied, cut_message)
    elif meter.reason != "client_disconnected":
        ending = tally.held
    if not tally.done and meter.reason is None:
        meter.reason = "upstream_stream_cut"  # ended without [DONE]
    meter.model_served = tally.model
    # A usage chunk is the exact count; without one, count what the client received.
    meter.usage = (None if tally.cut else tally.usage) or counted_usage(proxied.body, proxied.model, tally.text)
    if meter.reason != "client_disconnected":
        meter.response_bytes += len(ending)
    if finish is not None:
        await finish()
    if meter.reason != "client_disconnected":
        try:
            if ending:
                await response.write(ending)
            await response.write_eof()
        except ConnectionError:
            pass  # billed: it had every token, only the closing lines were lost
    return response


def _cut_ending(tally: StreamTally, proxied: ProxiedRequest, message: str) -> bytes:
    """A final chunk the client reads as a normal end, then an OpenAI error event."""
    final = {
        "id": tally.chunk_id or "chatcmpl-quotameter-cut",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": tally.model or proxied.model,
        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
    }
    error = {"error": {"message": message, "type": "insufficient_quota", "param": None, "code": "budget_exceeded"}}
    return (
        b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n"
        + b"data: " + json.dumps(error, separators=(",", ":")).encode() + b"\n\n"
        + b"data: [DONE]\n\n"
    )
