"""The upstream model server: one pooled HTTP session, and the headers that
pass between it and the client (the relay itself is in proxy.py)."""

from __future__ import annotations

import logging

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway_shim.errors import UpstreamTimeout, UpstreamUnavailable
from quotameter.config import Upstream as UpstreamConfig

log = logging.getLogger("gateway_shim.upstream")

# Not passed upstream: hop-by-hop headers, the client's quotameter key (Authorization,
# or x-api-key as Anthropic's clients send it), and
# what aiohttp sets itself (it negotiates compression and decompresses).
_REQUEST_DROP = frozenset(
    "host connection keep-alive proxy-authorization proxy-connection te trailer transfer-encoding "
    "upgrade content-length authorization x-api-key accept-encoding".split()
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
        # No cookie jar: one session serves every customer, and a jar would send a
        # cookie the model server set in one customer's answer with the next
        # customer's request. A Set-Cookie still reaches the client it was meant for.
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout,
                                              cookie_jar=aiohttp.DummyCookieJar())

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
        if self._authorization and self._path == "/messages":  # Anthropic's API takes its key as x-api-key
            headers["x-api-key"] = self._authorization.removeprefix("Bearer ")
        elif self._authorization:
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


def client_headers(upstream: aiohttp.ClientResponse, ours: dict[str, str]) -> CIMultiDict[str]:
    headers = CIMultiDict((k, v) for k, v in upstream.headers.items() if k.lower() not in _RESPONSE_DROP)
    headers.update(ours)  # our x-ratelimit-* win over the upstream's own
    return headers
