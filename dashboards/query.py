"""Running panel SQL against the ledger, from any process.

The worker owns the chDB directory while it runs, so the built-in dashboard
asks it first (``POST {worker_url}/query``); with no worker running it opens
the directory itself, read-only, for the length of one page (the way
``pipeline.history.reader`` reads usage).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from dashboards.macros import TimeRange, Variables, expand
from dashboards.model import Panel
from pipeline.history.store import HistoryError
from quotameter.config import Config
from quotameter.errors import QuotameterError

WORKER_TIMEOUT_S = 30.0
Row = dict[str, Any]


class QueryRunner(Protocol):
    def rows(self, sql: str) -> list[Row]: ...


class WorkerUnreachable(HistoryError):
    """No worker answers at the configured worker_url."""


class WorkerRunner:
    """Queries through the worker's read-only ``POST /query``."""

    def __init__(self, worker_url: str) -> None:
        self.url = f"{worker_url.rstrip('/')}/query"

    def rows(self, sql: str) -> list[Row]:
        request = urllib.request.Request(
            self.url, data=json.dumps({"sql": sql}).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=WORKER_TIMEOUT_S) as response:  # noqa: S310 - configured URL
                return json.loads(response.read())["rows"]
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:500]
            raise HistoryError(f"the worker at {self.url} answered {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise WorkerUnreachable(f"no worker at {self.url} ({getattr(exc, 'reason', exc)})") from None


class ChdbRunner:
    """Queries a chDB directory opened read-only by this process."""

    def __init__(self, path: Path) -> None:
        from pipeline.history.chdb_store import ChdbHistory

        self.store = ChdbHistory(path, read_only=True)

    def rows(self, sql: str) -> list[Row]:
        return self.store.query(sql)

    def close(self) -> None:
        self.store.close()


class _FallbackRunner:
    """The worker while it answers; the directory once it does not."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.worker: WorkerRunner | None = WorkerRunner(config.services.worker_url)
        self.direct: ChdbRunner | None = None
        self.source = f"worker {config.services.worker_url}"

    def rows(self, sql: str) -> list[Row]:
        if self.worker is not None:
            try:
                return self.worker.rows(sql)
            except WorkerUnreachable as worker_error:
                self.worker = None
                try:
                    self.direct = ChdbRunner(self.config.services.history_dir)
                except HistoryError as directory_error:
                    raise QuotameterError(
                        f"cannot read the usage ledger: {worker_error}; and opening it directly failed: "
                        f"{directory_error}"
                    ) from None
                self.source = f"chDB directory {self.config.services.history_dir} (read-only)"
        assert self.direct is not None
        return self.direct.rows(sql)

    def close(self) -> None:
        if self.direct is not None:
            self.direct.close()


@contextmanager
def ledger_runner(config: Config) -> Iterator[_FallbackRunner]:
    runner = _FallbackRunner(config)
    try:
        yield runner
    finally:
        runner.close()


def run_panel(runner: QueryRunner, panel: Panel, time_range: TimeRange, variables: Variables) -> list[Row]:
    return runner.rows(expand(panel.sql, time_range, variables))
