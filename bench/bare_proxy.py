"""A bare pass-through proxy on the shim's HTTP stack (aiohttp server + aiohttp
client), streaming, with no auth, admission or metering: the baseline that
bench/proxy_bench.py compares the shim with. It serves the way the shim does
(uvloop's event loop when installed, an AppRunner site with the shim's listen
backlog), so that the difference is the shim's work, not its loop.

    python bench/bare_proxy.py --port 8090 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

_REQUEST_DROP = frozenset("host connection keep-alive transfer-encoding content-length accept-encoding".split())
_RESPONSE_DROP = frozenset("connection keep-alive transfer-encoding content-length content-encoding server date".split())
_SESSION = web.AppKey("session", aiohttp.ClientSession)
BACKLOG = 1024  # the shim's default shim.listen_backlog


def build_app(upstream: str) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def session(app: web.Application):  # noqa: ANN202
        connector = aiohttp.TCPConnector(limit=1000, keepalive_timeout=30)
        app[_SESSION] = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))
        yield
        await app[_SESSION].close()

    async def forward(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in _REQUEST_DROP)
        body = await request.read()
        async with request.app[_SESSION].request(
            request.method, upstream + request.rel_url.raw_path_qs, data=body or None, headers=headers
        ) as answer:
            out = CIMultiDict((k, v) for k, v in answer.headers.items() if k.lower() not in _RESPONSE_DROP)
            if answer.content_type != "text/event-stream":
                return web.Response(status=answer.status, body=await answer.read(), headers=out)
            response = web.StreamResponse(status=answer.status, headers=out)
            await response.prepare(request)
            async for chunk in answer.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


async def _serve(app: web.Application, host: str, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=BACKLOG).start()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    print(f"bare proxy on http://{host}:{port} ({type(asyncio.get_running_loop()).__module__})", flush=True)
    await stop.wait()
    await runner.cleanup()


def _loop_factory():  # noqa: ANN202 - as gateway_shim.server chooses its loop
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="base URL, without /v1")
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(build_app(args.upstream.rstrip("/")), args.host, args.port))


if __name__ == "__main__":
    main()
