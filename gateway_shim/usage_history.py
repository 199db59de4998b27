"""``GET /v1/usage?start_time=…``: a customer's usage history from the ledger,
in time buckets, grouped by model, API key, end user, project or tag (shaped
like OpenAI's organization usage API).

    start_time    Unix seconds, required; rounded down to a bucket boundary (UTC)
    end_time      Unix seconds, exclusive; default now
    bucket_width  1m, 1h or 1d (default 1d)
    group_by      comma list (or repeated): model, api_key, user, project, tag:KEY
    limit         buckets per page: 1m 60 (max 1440), 1h 24 (max 168), 1d 7 (max 31)
    page          the previous answer's next_page

Every bucket of the page is listed, empty ones with ``results: []``. Only
requests the model answered count (not refusals, 4xx or upstream errors). The ledger is read through the pipeline worker
(``POST {services.worker_url}/usage/buckets`` with services.admin_token),
which owns the embedded chDB ledger on ``quotameter up`` and reads the
ClickHouse server when services.history_url names one: the same path either
way. The ledger is a flush behind the requests (pipeline.ledger_flush_ms).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from multidict import MultiMapping

from gateway_shim.errors import HistoryUnavailable, UsageBadRequest
from quotameter.config import Config
from quotameter.service_auth import TokenGate

WIDTHS_S = {"1m": 60, "1h": 3600, "1d": 86400}
LIMITS = {"1m": (60, 1440), "1h": (24, 168), "1d": (7, 31)}  # (default, max) buckets per page
GROUPS = ("model", "api_key", "user", "project")
WORKER_TIMEOUT_S = 10.0
MAX_TIME_S = 4_102_444_800  # 2100-01-01: the ledger's DateTime64 and every client's clock agree up to there
_PAGE = "page_"


def _int(query: Mapping[str, str], name: str, default: int | None = None) -> int:
    text = query.get(name)
    if text is None or text == "":
        if default is None:
            raise UsageBadRequest(f"{name} is required (Unix seconds).")
        return default
    if not text.isdigit() or len(text) > 12 or int(text) > MAX_TIME_S:
        raise UsageBadRequest(f"{name} must be a whole number, 0-{MAX_TIME_S}, not {text[:40]!r}.")
    return int(text)


def group_by_of(query: MultiMapping[str]) -> list[str]:
    names: list[str] = []
    for value in query.getall("group_by", []):
        names.extend(part.strip() for part in value.split(",") if part.strip())
    for name in names:
        if name not in GROUPS and not name.startswith("tag:"):
            raise UsageBadRequest(f"group_by {name[:80]!r} is not one of {', '.join(GROUPS)}, tag:KEY.")
    return names


async def history(config: Config, customer: str, query: MultiMapping[str]) -> dict[str, Any]:
    """The page the query asks for (UsageBadRequest, HistoryUnavailable)."""
    width_name = query.get("bucket_width") or "1d"
    if width_name not in WIDTHS_S:
        raise UsageBadRequest(f"bucket_width must be one of {', '.join(WIDTHS_S)}.")
    width = WIDTHS_S[width_name]
    start = _int(query, "start_time") // width * width
    end = _int(query, "end_time", int(time.time()))
    if end <= start:
        raise UsageBadRequest("end_time must be after start_time.")
    default_limit, max_limit = LIMITS[width_name]
    limit = _int(query, "limit", default_limit)
    if not 1 <= limit <= max_limit:
        raise UsageBadRequest(f"limit must be 1-{max_limit} buckets for bucket_width {width_name}.")
    page_start = start
    if page := query.get("page"):
        cursor = page.removeprefix(_PAGE)
        if not page.startswith(_PAGE) or not cursor.isdigit() or len(cursor) > 12:
            raise UsageBadRequest("page must be a next_page from a previous answer.")
        page_start = int(cursor)
        if not start <= page_start < end or (page_start - start) % width:
            raise UsageBadRequest("page does not belong to this start_time, end_time and bucket_width.")
    page_end = min(page_start + limit * width, end)
    group_by = group_by_of(query)
    answer = await _ask_worker(config, {
        "customer": customer, "start_s": page_start, "end_s": page_end, "width_s": width, "group_by": group_by,
    })
    if answer.get("truncated"):
        raise UsageBadRequest("This page has too many groups to answer at once: ask for fewer buckets (limit) "
                              "or fewer group_by dimensions.")
    by_bucket: dict[int, list[dict[str, Any]]] = {}
    for result in answer["results"]:
        bucket = result.pop("bucket_s")
        by_bucket.setdefault(bucket, []).append({"object": "usage.result", **result})
    data = [
        {"object": "bucket", "start_time": at, "end_time": at + width, "results": by_bucket.get(at, [])}
        for at in range(page_start, page_end, width)
    ]
    more = page_end < end
    return {"object": "page", "customer": customer, "data": data, "has_more": more,
            "next_page": f"{_PAGE}{page_end}" if more else None}


async def _ask_worker(config: Config, body: dict[str, Any]) -> dict[str, Any]:
    url = f"{config.services.worker_url.rstrip('/')}/usage/buckets"
    headers = TokenGate.from_services(config.services).headers()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WORKER_TIMEOUT_S)) as session:
            async with session.post(url, json=body, headers=headers) as response:
                document = await response.json(content_type=None)
                status = response.status
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise HistoryUnavailable(f"Usage history is unavailable: the ledger could not be read ({type(exc).__name__}). "
                                 "Please retry shortly.") from None
    if status == 400 and isinstance(document, dict):
        raise UsageBadRequest(str(document.get("error"))[:300])
    if status != 200 or not isinstance(document, dict) or not isinstance(document.get("results"), list):
        raise HistoryUnavailable("Usage history is unavailable: the ledger could not be read. Please retry shortly.")
    return document
