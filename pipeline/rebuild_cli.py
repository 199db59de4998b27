"""``quotameter rebuild-state`` outside the worker: ask the running worker
(it owns the chDB directory and serializes the rebuild with its batches),
else open the ledger and Redis directly."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.parse
import urllib.request

from pipeline.history.factory import open_store
from pipeline.history.store import AsyncHistory, HistoryError
from pipeline.rebuild import rebuild_state
from pipeline.redis_writer import UsageWriter
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.service_auth import TokenGate
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import redis_client

WORKER_TIMEOUT_S = 120.0


def _through_worker(config: Config, customer: str | None, month: str | None, force: bool) -> dict[str, int] | None:
    query = urllib.parse.urlencode({k: v for k, v in {"customer": customer, "month": month, "force": "1" if force else ""}.items() if v})
    url = f"{config.services.worker_url.rstrip('/')}/rebuild-state?{query}"
    request = urllib.request.Request(url, data=b"", method="POST", headers=TokenGate.from_services(config.services).headers())
    try:
        with urllib.request.urlopen(request, timeout=WORKER_TIMEOUT_S) as response:  # noqa: S310 - configured URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise QuotameterError(f"the worker at {url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError):
        return None  # no worker: do it here


async def _directly(config: Config, customer: str | None, month: str | None, force: bool) -> dict[str, int]:
    history = AsyncHistory(open_store(config, read_only=True))
    client = redis_client(config.services, timeout_s=None)
    writer = UsageWriter(client, RedisKeys(config.services.redis_prefix), lambda: time.time_ns() // 1_000_000)
    try:
        return await rebuild_state(history, writer, config.billing.calendar, customer, month, force)
    except ConnectionError as exc:
        raise QuotameterError(f"cannot write to Redis at {config.services.redis_url}: {exc}") from None
    finally:
        await client.aclose()
        history.close()


def rebuild_from_cli(config: Config, customer: str | None, month: str | None, force: bool) -> tuple[dict[str, int], str]:
    if month is not None:
        config.billing.calendar.validate(month)  # ValueError names the format
    counts = _through_worker(config, customer, month, force)
    if counts is not None:
        return counts, f"through the worker at {config.services.worker_url}"
    try:
        return asyncio.run(_directly(config, customer, month, force)), "directly; no worker was running"
    except HistoryError as exc:
        raise QuotameterError(f"no worker at {config.services.worker_url}, and the ledger: {exc}") from None
