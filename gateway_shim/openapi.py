"""``GET /openapi.json``: the OpenAPI 3.1 document of the shim's own endpoints.

Written by hand in openapi.yaml (next to this file); the usage event's schema
is taken from the event model itself (quotameter/events.py), so what
``POST /v1/events`` is documented to take is what it validates.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from quotameter.events import UsageEvent

_SOURCE = Path(__file__).with_name("openapi.yaml")


@cache
def document() -> dict[str, Any]:
    spec = yaml.safe_load(_SOURCE.read_text())
    event = UsageEvent.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas = spec["components"]["schemas"]
    schemas.update(event.pop("$defs", {}))
    schemas["UsageEvent"] = event
    return spec


def register(app: web.Application) -> None:
    """Add ``GET /openapi.json`` (before the catch-all); the document is built once, here."""
    body = json.dumps(document()).encode()

    async def openapi(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app.router.add_get("/openapi.json", openapi)
