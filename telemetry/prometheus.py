"""``GET /metrics``: the process's OpenTelemetry metrics as Prometheus text,
through the exporter's collector in prometheus_client's registry."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import REGISTRY, generate_latest

# The text format every Prometheus reads (2.x included); prometheus_client
# labels the same bytes version=1.0.0, which older servers do not know.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def exposition() -> bytes:
    """Collect now (observable gauges call back here) and render."""
    return generate_latest(REGISTRY)


async def metrics_handler(request: web.Request) -> web.Response:
    return web.Response(body=exposition(), headers={"Content-Type": CONTENT_TYPE})
