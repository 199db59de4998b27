"""Reading a proxied request's body within its limits: size (``shim.max_body_bytes``,
per route ``shim.max_body_bytes_by_route``) and time (``shim.client_body_timeout_s``).

A Content-Length past the limit is refused before a byte is read; a chunked
body, as soon as it passes it. A client that trickles its body (slowloris)
holds a connection and a task: it is cut with 408 once the time is up. Both
are ShimErrors raised after the key is known, so the request is answered in
OpenAI's shape and recorded as one event, as every refusal is. A compressed
body (Content-Encoding) is limited as it decompresses: a small gzip bomb is
refused as soon as it grows past the limit.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from gateway_shim.errors import PayloadTooLarge, RequestTimeout, UndecodableBody
from quotameter.config import Shim

_READ_CHUNK = 256 * 1024


async def read_body(request: web.Request, route: str, limits: Shim) -> bytes:
    """The whole body of ``request`` (a ``route`` request), or PayloadTooLarge / RequestTimeout."""
    max_bytes = limits.max_body_bytes_by_route.get(route, limits.max_body_bytes)
    too_large = PayloadTooLarge(
        f"The request body is larger than {max_bytes} bytes, the most this gateway takes on {route} "
        f"(shim.max_body_bytes). Send a smaller request."
    )
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(limits.client_body_timeout_s):
            while chunk := await request.content.read(_READ_CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise too_large
    except web.RequestPayloadError:  # a compressed body that does not decompress
        encoding = request.headers.get("Content-Encoding", "")[:40]
        raise UndecodableBody(
            f"The request body could not be decoded as its Content-Encoding ({encoding}) says.") from None
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {limits.client_body_timeout_s:g} seconds "
            "(shim.client_body_timeout_s)."
        ) from None
    return bytes(body)
