"""The Grafana JSON: the ClickHouse plugin's query model, stable uids, variables;
the service-health dashboard's PromQL on the Prometheus datasource."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dashboards.catalog import DASHBOARDS, FOLDER_UID, PROMETHEUS_DASHBOARDS, config_constants
from dashboards.grafana import PLUGIN_ID, build_all, write_all
from dashboards.model import Panel, PromQuery, Viz
from quotameter.config import DEFAULT_CONFIG, load_config, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def _built() -> dict[str, dict]:
    return build_all(config_constants(load_config(DEFAULT_CONFIG)))


def _ledger_dashboards() -> dict[str, dict]:
    return {uid: d for uid, d in _built().items() if uid in {b.uid for b in DASHBOARDS}}


def test_four_dashboards_with_stable_uids() -> None:
    built = _built()
    assert list(built) == ["quotameter-billing", "quotameter-quotas", "quotameter-operations",
                           "quotameter-service-health"]
    for uid, document in built.items():
        assert document["uid"] == uid
        ids = [p["id"] for p in document["panels"]]
        assert len(ids) == len(set(ids))
    assert _built() == built  # the same inputs give the same JSON


def test_every_target_uses_the_clickhouse_query_model() -> None:
    for document in _ledger_dashboards().values():
        for panel in document["panels"]:
            assert panel["datasource"] == {"type": PLUGIN_ID, "uid": "quotameter-clickhouse"}
            (target,) = panel["targets"]
            assert target["datasource"] == {"type": PLUGIN_ID, "uid": "quotameter-clickhouse"}
            assert target["editorType"] == "sql"
            assert target["refId"] == "A"
            if panel["type"] == "timeseries":
                assert (target["queryType"], target["format"]) == ("timeseries", 0)
                assert "$__timeInterval(time)" in target["rawSql"]
            else:
                assert (target["queryType"], target["format"]) == ("table", 1)
            assert "quotameter.usage_hourly_store" in target["rawSql"] or "quotameter.events" in target["rawSql"]
            assert panel["fieldConfig"]["defaults"]["unit"]


def test_template_variables_and_config_constants() -> None:
    document = _built()["quotameter-billing"]
    variables = {v["name"]: v for v in document["templating"]["list"]}
    for name in ("customer", "tier", "model", "api_key", "end_user", "project", "tag"):
        assert variables[name]["type"] == "query"
        assert variables[name]["multi"] and variables[name]["includeAll"]
        assert variables[name]["current"]["value"] == "$__all"
        assert variables[name]["datasource"]["type"] == PLUGIN_ID
    assert variables["tier_budget_usd"]["type"] == "constant"
    assert variables["tier_budget_usd"]["hide"] == 2
    assert "'pro', '500'" in variables["tier_budget_usd"]["query"]
    panel_sql = " ".join(p["targets"][0]["rawSql"] for p in document["panels"])
    assert "$__conditionalAll(customer IN (${customer}), $customer)" in panel_sql


def test_every_column_is_shown_by_its_label() -> None:
    # The same Field definitions the built-in page reads, as Grafana field overrides.
    built = _built()
    for board in DASHBOARDS:
        drawn = {p["id"]: p for p in built[board.uid]["panels"]}
        for panel in board.panels:
            overrides = {o["matcher"]["options"]: {q["id"]: q["value"] for q in o["properties"]}
                         for o in drawn[panel.id]["fieldConfig"]["overrides"]}
            assert list(overrides) == [f.name for f in panel.fields], panel.key
            for field in panel.fields:
                # a long series panel names each line by its series (a customer), not by the value's label
                label = f"${{__field.labels.{panel.series}}}" if panel.series and field.name in panel.values else field.label
                assert overrides[field.name]["displayName"] == label, (panel.key, field.name)
    billing = {p["title"]: p for p in built["quotameter-billing"]["panels"]}
    budget = {o["matcher"]["options"]: o["properties"] for o in billing["Period to date against budget"]["fieldConfig"]["overrides"]}
    assert {"id": "unit", "value": "percent"} in budget["budget_used_pct"]  # a share, in a table of dollars
    per_customer = billing["Spend per customer"]
    assert per_customer["type"] == "barchart" and per_customer["options"]["xField"] == "customer_series"
    assert per_customer["fieldConfig"]["defaults"]["custom"]["axisSoftMin"] == 0
    assert per_customer["fieldConfig"]["defaults"]["custom"]["axisLabel"] == "Spend"
    assert billing["Spend per model"]["type"] == "barchart"


def test_customer_overrides_reach_the_constants() -> None:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["customers"] = {"o'neil": {"monthly_budget_usd": "12.50"}}
    constants = config_constants(parse_config(document))
    assert constants["customer_budget_usd"] == "CAST(map('o\\'neil', '12.5'), 'Map(String, String)')"


def test_write_all_writes_one_file_per_dashboard(tmp_path: Path) -> None:
    paths = write_all(tmp_path / "out", config_constants(load_config(DEFAULT_CONFIG)))
    assert sorted(p.name for p in paths) == sorted(f"{d.uid}.json" for d in (*DASHBOARDS, *PROMETHEUS_DASHBOARDS))
    assert json.loads(paths[0].read_text())["uid"] == DASHBOARDS[0].uid


def test_provisioning_matches_the_dashboards() -> None:
    datasource = yaml.safe_load((DEPLOY / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (source,) = datasource["datasources"]
    assert (source["type"], source["uid"]) == (PLUGIN_ID, "quotameter-clickhouse")
    prometheus = yaml.safe_load((DEPLOY / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    (source,) = prometheus["datasources"]
    assert (source["type"], source["uid"]) == ("prometheus", "quotameter-prometheus")
    provider = yaml.safe_load((DEPLOY / "provisioning" / "dashboards" / "quotameter.yaml").read_text())
    assert provider["providers"][0]["folderUid"] == FOLDER_UID
    # The checked-in JSON is what `quotameter dashboards build` writes for the example config.
    for uid, document in _built().items():
        stored = json.loads((DEPLOY / "dashboards" / f"{uid}.json").read_text())
        assert stored == document, f"deploy/grafana/dashboards/{uid}.json is stale: rebuild it"


def test_service_health_is_promql_on_the_prometheus_datasource() -> None:
    (board,) = PROMETHEUS_DASHBOARDS
    document = _built()[board.uid]
    source = {"type": "prometheus", "uid": "quotameter-prometheus"}
    assert [v["name"] for v in document["templating"].get("list", [])] == []  # no ClickHouse constants
    drawn = {p["id"]: p for p in document["panels"]}
    assert sorted(drawn) == sorted(p.id for p in board.panels)
    for panel in board.panels:
        json_panel = drawn[panel.id]
        assert json_panel["datasource"] == source, panel.key
        targets = json_panel["targets"]
        assert [(t["refId"], t["expr"], t["legendFormat"]) for t in targets] == [
            (ref, q.expr, q.legend) for ref, q in zip("ABCDEFGH", panel.promql, strict=False)], panel.key
        for target in targets:
            assert target["datasource"] == source
            assert "rawSql" not in target
            # a stat shows the value now; a time series the range
            assert (target["instant"], target["range"]) == ((True, False) if panel.viz is Viz.STAT else (False, True))
            assert ("$__rate_interval" in target["expr"]) == ("rate(" in target["expr"]), target["expr"]
    exprs = " ".join(q.expr for p in board.panels for q in p.promql)
    for series in ("quotameter_shim_requests_total", "quotameter_shim_admission_duration_seconds_bucket",
                   "quotameter_shim_added_duration_seconds_bucket", "quotameter_shim_upstream_duration_seconds_bucket",
                   "quotameter_shim_upstream_errors_total", "quotameter_shim_tokens_total", "quotameter_shim_spool_depth",
                   "quotameter_shim_spool_age_seconds", "quotameter_worker_consumer_lag",
                   "quotameter_worker_freshness_seconds_bucket", "quotameter_worker_ledger_insert_duration_seconds_bucket",
                   "quotameter_worker_ledger_insert_failures_total", "quotameter_shim_fail_mode_decisions_total",
                   "quotameter_shim_inflight"):
        assert series in exprs, f"no panel reads {series}"


def test_a_panel_is_sql_or_promql() -> None:
    for sql, promql in (("", ()), ("SELECT 1 AS n", (PromQuery("up", "{{job}}"),))):
        try:
            Panel(id=1, key="k", title="t", sql=sql, promql=promql, viz=Viz.TABLE)
        except ValueError as exc:
            assert "either sql or promql" in str(exc)
        else:
            raise AssertionError(f"accepted sql={sql!r} promql={promql!r}")
