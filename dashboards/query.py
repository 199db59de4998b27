"""Running panel SQL against the ledger, from any process.

The worker owns the chDB directory while it runs, so the built-in dashboard
reads through ``pipeline.history.reader.LedgerReader``: the worker's
``POST /query`` while it answers, else the store opened read-only for the
length of one page.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Protocol

from dashboards.macros import TimeRange, Variables, expand
from dashboards.model import Panel
from pipeline.history.reader import open_ledger
from quotameter.config import Config

WORKER_TIMEOUT_S = 30.0
Row = dict[str, Any]


class QueryRunner(Protocol):
    def rows(self, sql: str) -> list[Row]: ...


class ChdbRunner:
    """Queries a chDB directory opened read-only by this process."""

    def __init__(self, path: Path) -> None:
        from pipeline.history.chdb_store import ChdbHistory

        self.store = ChdbHistory(path, read_only=True)

    def rows(self, sql: str) -> list[Row]:
        return self.store.query(sql)

    def close(self) -> None:
        self.store.close()


def ledger_runner(config: Config) -> AbstractContextManager[QueryRunner]:
    """The worker while it answers, else the store opened read-only."""
    return open_ledger(config, WORKER_TIMEOUT_S)


def exact_decimals(panel: Panel, sql: str) -> str:
    """``sql`` projected onto the panel's fields, money and percentages as decimal
    text: JSON rows would otherwise carry them as binary floats. (Grafana reads the
    Decimals as they are.) A plain projection keeps the rows' order; no ``* REPLACE``,
    whose syntax tree the worker's query guard does not read."""
    if not panel.decimal_columns:
        return sql
    decimals = set(panel.decimal_columns)
    columns = ", ".join(f"toString({f.name}) AS {f.name}" if f.name in decimals else f.name for f in panel.fields)
    return f"SELECT {columns} FROM ({sql})"


def run_panel(runner: QueryRunner, panel: Panel, time_range: TimeRange, variables: Variables) -> list[Row]:
    """The panel's rows, money and percentages as exact decimal text."""
    return runner.rows(exact_decimals(panel, expand(panel.sql, time_range, variables)))
