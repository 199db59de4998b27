"""Reading the ledger from any process.

The worker owns the chDB directory while it runs, so readers ask it first
(``GET {worker_url}/usage``, ``POST {worker_url}/query``); with no worker
running they open the store themselves, read-only. Every request carries
``services.admin_token`` when one is set.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.store import HistoryError
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.service_auth import TokenGate

WORKER_TIMEOUT_S = 5.0


def _from_worker(config: Config, customer: str, period: str) -> dict[str, Any]:
    query = urllib.parse.urlencode({"customer": customer, "period": period})
    url = f"{config.services.worker_url.rstrip('/')}/usage?{query}"
    request = urllib.request.Request(url, headers=TokenGate.from_services(config.services).headers())
    try:
        with urllib.request.urlopen(request, timeout=WORKER_TIMEOUT_S) as response:  # noqa: S310 - configured URL
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
        return store.usage(customer, period, config.billing.calendar)
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
        config.billing.calendar.validate(period)
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


class LedgerReader:
    """Read-only SQL on the ledger from any process: through the worker's
    ``POST /query`` while one answers, else the history store opened
    read-only (chDB directory or ClickHouse server) for this reader's life."""

    def __init__(self, config: Config, timeout_s: float = 30.0) -> None:
        self.config = config
        self.url = f"{config.services.worker_url.rstrip('/')}/query"
        self.timeout_s = timeout_s
        self.store: Any = None
        self.source = f"worker {config.services.worker_url}"

    def rows(self, sql: str) -> list[dict[str, Any]]:
        if self.store is None:
            request = urllib.request.Request(
                self.url,
                data=json.dumps({"sql": sql}).encode(),
                headers={"Content-Type": "application/json", **TokenGate.from_services(self.config.services).headers()},
            )
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - configured URL
                    return json.loads(response.read())["rows"]
            except urllib.error.HTTPError as exc:
                detail = exc.read().decode(errors="replace")[:500]
                raise HistoryError(f"the worker at {self.url} answered {exc.code}: {detail}") from None
            except (urllib.error.URLError, OSError) as exc:
                self._open_store(f"no worker at {self.url} ({getattr(exc, 'reason', exc)})")
        try:
            return self.store.query(sql)
        except QuotameterError as exc:
            raise HistoryError(f"the ledger ({self.source}): {exc}") from None

    def _open_store(self, worker_error: str) -> None:
        from pipeline.history.factory import open_store

        try:
            self.store = open_store(self.config, read_only=True)
        except QuotameterError as exc:
            raise HistoryError(f"cannot read the ledger: {worker_error}; and opening it directly failed: {exc}") from None
        self.source = "the history store, opened read-only (no worker running)"

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


@contextmanager
def open_ledger(config: Config, timeout_s: float = 30.0) -> Iterator[LedgerReader]:
    reader = LedgerReader(config, timeout_s)
    try:
        yield reader
    finally:
        reader.close()
