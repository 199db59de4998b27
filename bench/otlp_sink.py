"""An OTLP/HTTP endpoint that takes every export and keeps nothing: the
collector of bench/telemetry_bench.py, in its own process so its work is not
the shim's. ``GET /stats`` says how many exports and bytes it took.

    .venv/bin/python bench/otlp_sink.py --port 4318
"""

from __future__ import annotations

import argparse

from aiohttp import web

_taken = {"traces": 0, "metrics": 0, "bytes": 0}


async def _take(request: web.Request) -> web.Response:
    _taken["bytes"] += len(await request.read())
    _taken[request.match_info["signal"]] += 1
    return web.Response(content_type="application/x-protobuf")  # an empty Export*ServiceResponse


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(_taken)


def main() -> None:
    parser = argparse.ArgumentParser(description="An OTLP/HTTP sink.")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/{signal:traces|metrics}", _take)
    app.router.add_get("/stats", _stats)
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
