"""What a dashboard is, independent of how it is drawn: panels of SQL with
the ClickHouse datasource's macros, a visualisation, and a ``Field`` (human
label and unit) for every column the SQL returns; or panels of PromQL on the
Prometheus datasource, whose series are named by their queries' legends.

Both renderers read these: ``dashboards.grafana`` (Grafana JSON) and
``dashboards.server`` (the built-in page). A panel's ``uid`` and ``id`` are
stable: Grafana links, the built-in page's anchors and the tests use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Unit(StrEnum):
    """Grafana unit ids; the built-in page formats the same ones."""

    USD = "currencyUSD"  # exact decimal text, shown to the cent
    PERCENT = "percent"  # 0-100
    COUNT = "short"
    MS = "ms"
    SECONDS = "s"
    PER_SECOND = "reqps"
    TEXT = "string"  # names and ids, some of them chosen by customers
    TIME = "dateTimeAsIso"


@dataclass(frozen=True)
class Field:
    """One column a panel's SQL returns: what a person reads instead of its name."""

    name: str  # the SQL alias
    label: str  # column header, legend, axis title, stat caption
    unit: Unit = Unit.COUNT

    @property
    def is_money(self) -> bool:
        return self.unit is Unit.USD


class Viz(StrEnum):
    TIMESERIES = "timeseries"  # x = a time column, one line per series
    BAR = "bar"  # x = a category column, one bar group per series
    TABLE = "table"
    STAT = "stat"  # one row, one big number per value column


@dataclass(frozen=True)
class PromQuery:
    """One PromQL expression of a Prometheus panel (Grafana's macros allowed: $__rate_interval)."""

    expr: str
    legend: str  # Grafana's legendFormat: "p99", "{{outcome}}"


@dataclass(frozen=True, kw_only=True)
class Panel:
    id: int  # stable within its dashboard (Grafana's panel id)
    key: str  # stable name, used in the built-in page and the tests
    title: str
    sql: str = ""  # one SELECT, with $__ macros and ${variables}; no FORMAT, no ';'
    promql: tuple[PromQuery, ...] = ()  # instead of sql: a panel on the Prometheus datasource
    viz: Viz
    unit: str = "short"  # a Grafana unit id: currencyUSD, short, ms, s, reqps, percent
    description: str = ""
    x: str = "time"  # the x column of a timeseries / bar panel
    series: str | None = None  # the column naming each series (long format), if any
    values: tuple[str, ...] = ()  # the plotted / shown value columns
    width: int = 12  # Grafana grid units (24 = full width)
    height: int = 8
    fields: tuple[Field, ...] = ()  # every column the SQL returns, in order

    def __post_init__(self) -> None:
        if bool(self.sql) == bool(self.promql):
            raise ValueError(f"panel {self.key}: either sql or promql")
        if self.promql:
            return  # series come from the queries, named by their legends
        if ";" in self.sql:
            raise ValueError(f"panel {self.key}: SQL must be one statement without ';'")
        if self.viz in (Viz.TIMESERIES, Viz.BAR, Viz.STAT) and not self.values:
            raise ValueError(f"panel {self.key}: a {self.viz} panel names its value columns")
        named = {f.name for f in self.fields}
        drawn = (*self.values, *((self.x,) if self.viz in (Viz.TIMESERIES, Viz.BAR) else ()),
                 *((self.series,) if self.series else ()))
        if missing := [c for c in drawn if c not in named]:
            raise ValueError(f"panel {self.key}: no Field (label, unit) for {missing}")

    @property
    def is_prometheus(self) -> bool:
        return bool(self.promql)

    def field(self, name: str) -> Field:
        for candidate in self.fields:
            if candidate.name == name:
                return candidate
        raise KeyError(f"panel {self.key} has no field {name!r}")

    @property
    def decimal_columns(self) -> tuple[str, ...]:
        """Money and percentages: Decimals in SQL, to be read as exact text."""
        return tuple(f.name for f in self.fields if f.unit in (Unit.USD, Unit.PERCENT))


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
