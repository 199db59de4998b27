"""Reading the ledger from any process.

The worker owns the chDB directory while it runs, so readers ask it first
(``GET {worker_url}/usage``); with no worker running they open the directory
themselves, read-only.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.store import HistoryError
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.periods import period_bounds

WORKER_TIMEOUT_S = 5.0


def _from_worker(config: Config, customer: str, period: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"customer": customer, "period": period})
    url = f"{config.services.worker_url.rstrip('/')}/usage?{query}"
    try:
        with urllib.request.urlopen(url, timeout=WORKER_TIMEOUT_S) as response:  # noqa: S310 - configured URL
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:300]
        raise HistoryError(f"the worker at {url} answered {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise HistoryError(f"no worker at {config.services.worker_url} ({reason})") from None


def _from_directory(config: Config, customer: str, period: str) -> dict[str, Any]:
    store = ChdbHistory(config.services.history_dir, read_only=True)
    try:
        return store.usage(customer, period, config.billing.timezone)
    finally:
        store.close()


def ledger_usage(config: Config, customer: str, period: str) -> dict[str, Any]:
    """Exact ledger totals of ``customer`` in billing ``period`` (``YYYY-MM``):
    customer, period, requests, refused, input_tokens, output_tokens,
    cached_tokens, reasoning_tokens, cost_usd (a string, 12 places), events.

    Raises QuotameterError naming both causes when neither the worker nor
    the data directory can answer.
    """
    try:
        period_bounds(period, config.billing.timezone)
    except ValueError as exc:
        raise QuotameterError(str(exc)) from None
    try:
        return _from_worker(config, customer, period)
    except HistoryError as worker_error:
        try:
            return _from_directory(config, customer, period)
        except HistoryError as directory_error:
            raise QuotameterError(
                f"cannot read the usage ledger: {worker_error}; and opening it directly failed: {directory_error}"
            ) from None
