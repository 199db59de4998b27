"""What a dashboard is, independent of how it is drawn: panels of SQL with
the ClickHouse datasource's macros, a visualisation and a unit.

Both renderers read these: ``dashboards.grafana`` (Grafana JSON) and
``dashboards.server`` (the built-in page). A panel's ``uid`` and ``id`` are
stable: Grafana links, the built-in page's anchors and the tests use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Viz(StrEnum):
    TIMESERIES = "timeseries"  # x = a time column, one line per series
    BAR = "bar"  # x = a category column, one bar group per series
    TABLE = "table"
    STAT = "stat"  # one row, one big number per value column


@dataclass(frozen=True)
class Panel:
    id: int  # stable within its dashboard (Grafana's panel id)
    key: str  # stable name, used in the built-in page and the tests
    title: str
    sql: str  # one SELECT, with $__ macros and ${variables}; no FORMAT, no ';'
    viz: Viz
    unit: str = "short"  # a Grafana unit id: currencyUSD, short, ms, s, reqps, percent
    description: str = ""
    x: str = "time"  # the x column of a timeseries / bar panel
    series: str | None = None  # the column naming each series (long format), if any
    values: tuple[str, ...] = ()  # the plotted / shown value columns
    width: int = 12  # Grafana grid units (24 = full width)
    height: int = 8

    def __post_init__(self) -> None:
        if ";" in self.sql:
            raise ValueError(f"panel {self.key}: SQL must be one statement without ';'")
        if self.viz in (Viz.TIMESERIES, Viz.BAR, Viz.STAT) and not self.values:
            raise ValueError(f"panel {self.key}: a {self.viz} panel names its value columns")


@dataclass(frozen=True)
class QueryVariable:
    """A dashboard filter whose options come from the ledger (multi-select, with All)."""

    name: str
    label: str
    sql: str  # one column of option values; may use time macros


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    panels: tuple[Panel, ...]
    description: str = ""
    time_from: str = "now-7d"
    time_to: str = "now"
    tags: tuple[str, ...] = ("quotameter",)
    variables: tuple[QueryVariable, ...] = field(default_factory=tuple)

    def panel(self, key: str) -> Panel:
        for panel in self.panels:
            if panel.key == key:
                return panel
        raise KeyError(f"dashboard {self.uid} has no panel {key!r}")
