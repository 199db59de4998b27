"""Grafana dashboard JSON, built with grafana-foundation-sdk.

The SDK has no builder for ClickHouse queries, so ``ClickHouseQuery`` is a
small ``Dataquery`` whose JSON is the grafana-clickhouse-datasource (v4)
query model: ``editorType: sql``, ``rawSql``, ``queryType`` and sqlds'
``format`` (0 time series, 1 table). Long-format time series (time, series,
value) are turned wide by the plugin itself.

A panel of PromQL is drawn with the SDK's Prometheus query builder, one target
per expression, on the Prometheus datasource.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from grafana_foundation_sdk.builders import barchart, prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders import dashboard as gdash
from grafana_foundation_sdk.cog import builder as cogbuilder
from grafana_foundation_sdk.cog import variants as cogvariants
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as model

from dashboards.catalog import DASHBOARDS, FOLDER_TITLE, FOLDER_UID, PROMETHEUS_DASHBOARDS
from dashboards.macros import ALL
from dashboards.model import Dashboard, Panel, QueryVariable, Unit, Viz

PLUGIN_ID = "grafana-clickhouse-datasource"
PLUGIN_VERSION = "4.0.0"
DEFAULT_DATASOURCE_UID = "quotameter-clickhouse"  # the uids deploy/grafana provisions
DEFAULT_PROMETHEUS_UID = "quotameter-prometheus"
FORMAT_TIMESERIES = 0
FORMAT_TABLE = 1


class ClickHouseQuery(cogvariants.Dataquery):
    def __init__(self, ref_id: str, raw_sql: str, query_type: str, fmt: int, datasource_uid: str) -> None:
        self.ref_id, self.raw_sql, self.query_type, self.fmt = ref_id, raw_sql, query_type, fmt
        self.datasource_uid = datasource_uid

    def to_json(self) -> dict[str, Any]:
        return {
            "refId": self.ref_id,
            "datasource": {"type": PLUGIN_ID, "uid": self.datasource_uid},
            "editorType": "sql",
            "rawSql": self.raw_sql,
            "queryType": self.query_type,
            "format": self.fmt,
            "pluginVersion": PLUGIN_VERSION,
        }


class ClickHouseQueryBuilder(cogbuilder.Builder[cogvariants.Dataquery]):
    def __init__(self, query: ClickHouseQuery) -> None:
        self._query = query

    def build(self) -> ClickHouseQuery:
        return self._query


def _panel_builder(panel: Panel) -> Any:
    if panel.viz is Viz.TIMESERIES:
        return timeseries.Panel().fill_opacity(10)
    if panel.viz is Viz.STAT:
        return stat.Panel()
    if panel.viz is Viz.BAR:
        builder = barchart.Panel().x_field(panel.x)
        if panel.series:  # long rows (x, series, value) → one column per series
            builder = builder.with_transformation(
                model.DataTransformerConfig(
                    id_val="groupingToMatrix",
                    options={"columnField": panel.series, "rowField": panel.x, "valueField": panel.values[0]},
                )
            )
        return builder
    return table.Panel()


def _field_overrides(builder: Any, panel: Panel) -> Any:
    """Each column's label (and unit, where it is not the panel's) as Grafana field overrides,
    so a table header, legend or stat reads "Budget used", not ``budget_used_pct``."""
    for field in panel.fields:
        if panel.series and field.name in panel.values:
            # Long rows turned wide: one field per series, named by the series column's label value.
            label = f"${{__field.labels.{panel.series}}}"
        else:
            label = field.label
        properties = [model.DynamicConfigValue(id_val="displayName", value=label)]
        if field.unit not in (Unit.TEXT, Unit.TIME) and field.unit != panel.unit:
            properties.append(model.DynamicConfigValue(id_val="unit", value=str(field.unit)))
        builder = builder.override_by_name(field.name, properties)
    return builder


def _axis(builder: Any, panel: Panel) -> Any:
    """The value axis: titled when it shows one column, never below zero for money and counts."""
    if panel.viz not in (Viz.TIMESERIES, Viz.BAR):
        return builder
    units = {panel.field(v).unit for v in panel.values}
    if len(panel.values) == 1:
        builder = builder.axis_label(panel.field(panel.values[0]).label)
    if units <= {Unit.USD, Unit.COUNT, Unit.PERCENT, Unit.PER_SECOND}:
        builder = builder.axis_soft_min(0)
    return builder


def build_prometheus_panel(panel: Panel, prometheus_uid: str) -> Any:
    source = model.DataSourceRef(type_val="prometheus", uid=prometheus_uid)
    builder = (
        _panel_builder(panel)
        .id(panel.id)
        .title(panel.title)
        .description(panel.description)
        .datasource(source)
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    for ref_id, query in zip("ABCDEFGH", panel.promql, strict=False):
        target = prometheus.Dataquery().ref_id(ref_id).expr(query.expr).legend_format(query.legend).datasource(source)
        builder = builder.with_target(target.instant() if panel.viz is Viz.STAT else target.range())
    return _axis(builder, panel)


def build_panel(panel: Panel, datasource_uid: str, prometheus_uid: str = DEFAULT_PROMETHEUS_UID) -> Any:
    if panel.is_prometheus:
        return build_prometheus_panel(panel, prometheus_uid)
    is_series = panel.viz is Viz.TIMESERIES
    query = ClickHouseQuery(
        "A", panel.sql, "timeseries" if is_series else "table", FORMAT_TIMESERIES if is_series else FORMAT_TABLE,
        datasource_uid,
    )
    builder = (
        _panel_builder(panel)
        .id(panel.id)
        .title(panel.title)
        .description(panel.description)
        .datasource(model.DataSourceRef(type_val=PLUGIN_ID, uid=datasource_uid))
        .with_target(ClickHouseQueryBuilder(query))
        .unit(panel.unit)
        .span(panel.width)
        .height(panel.height)
    )
    return _axis(_field_overrides(builder, panel), panel)


def build_variable(variable: QueryVariable, datasource_uid: str) -> Any:
    return (
        gdash.QueryVariable(variable.name)
        .label(variable.label)
        .datasource(model.DataSourceRef(type_val=PLUGIN_ID, uid=datasource_uid))
        .query(variable.sql)
        .multi(True)
        .include_all(True)
        .refresh(model.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(model.VariableSort.ALPHABETICAL_ASC)
        .current(model.VariableOption(selected=True, text="All", value=ALL))
    )


def build_dashboard(dashboard: Dashboard, constants: dict[str, str], datasource_uid: str,
                    prometheus_uid: str = DEFAULT_PROMETHEUS_UID) -> dict[str, Any]:
    """The dashboard's JSON model (the ``dashboard`` object of Grafana's API)."""
    builder = (
        gdash.Dashboard(dashboard.title)
        .uid(dashboard.uid)
        .description(dashboard.description)
        .tags(list(dashboard.tags))
        .time(dashboard.time_from, dashboard.time_to)
        .timezone("utc")
        .refresh("1m")
        .editable()
    )
    for variable in dashboard.variables:
        builder = builder.with_variable(build_variable(variable, datasource_uid))
    if not all(p.is_prometheus for p in dashboard.panels):  # SQL literals, for the ledger's panels only
        for name, value in constants.items():
            builder = builder.with_variable(gdash.ConstantVariable(name).value(value))
    for panel in dashboard.panels:
        builder = builder.with_panel(build_panel(panel, datasource_uid, prometheus_uid))
    return json.loads(json.dumps(builder.build(), cls=JSONEncoder))


def build_all(constants: dict[str, str], datasource_uid: str = DEFAULT_DATASOURCE_UID,
              prometheus_uid: str = DEFAULT_PROMETHEUS_UID) -> dict[str, dict[str, Any]]:
    """The ledger's dashboards (ClickHouse), then the service's (Prometheus)."""
    return {d.uid: build_dashboard(d, constants, datasource_uid, prometheus_uid)
            for d in (*DASHBOARDS, *PROMETHEUS_DASHBOARDS)}


def write_all(out_dir: Path, constants: dict[str, str], datasource_uid: str = DEFAULT_DATASOURCE_UID,
              prometheus_uid: str = DEFAULT_PROMETHEUS_UID) -> list[Path]:
    """One ``<uid>.json`` per dashboard in ``out_dir`` (created), stable bytes for the same inputs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for uid, document in build_all(constants, datasource_uid, prometheus_uid).items():
        path = out_dir / f"{uid}.json"
        path.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


__all__ = ["FOLDER_TITLE", "FOLDER_UID", "build_all", "build_dashboard", "write_all"]
