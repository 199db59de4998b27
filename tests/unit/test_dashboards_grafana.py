"""The Grafana JSON: the ClickHouse plugin's query model, stable uids, variables."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from dashboards.catalog import DASHBOARDS, FOLDER_UID, config_constants
from dashboards.grafana import PLUGIN_ID, build_all, write_all
from quotameter.config import DEFAULT_CONFIG, load_config, parse_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "grafana"


def _built() -> dict[str, dict]:
    return build_all(config_constants(load_config(DEFAULT_CONFIG)))


def test_three_dashboards_with_stable_uids() -> None:
    built = _built()
    assert list(built) == ["quotameter-billing", "quotameter-quotas", "quotameter-operations"]
    for uid, document in built.items():
        assert document["uid"] == uid
        ids = [p["id"] for p in document["panels"]]
        assert len(ids) == len(set(ids))
    assert _built() == built  # the same inputs give the same JSON


def test_every_target_uses_the_clickhouse_query_model() -> None:
    for document in _built().values():
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
    assert sorted(p.name for p in paths) == sorted(f"{d.uid}.json" for d in DASHBOARDS)
    assert json.loads(paths[0].read_text())["uid"] == DASHBOARDS[0].uid


def test_provisioning_matches_the_dashboards() -> None:
    datasource = yaml.safe_load((DEPLOY / "provisioning" / "datasources" / "clickhouse.yaml").read_text())
    (source,) = datasource["datasources"]
    assert (source["type"], source["uid"]) == (PLUGIN_ID, "quotameter-clickhouse")
    provider = yaml.safe_load((DEPLOY / "provisioning" / "dashboards" / "quotameter.yaml").read_text())
    assert provider["providers"][0]["folderUid"] == FOLDER_UID
    # The checked-in JSON is what `quotameter dashboards build` writes for the example config.
    for uid, document in _built().items():
        stored = json.loads((DEPLOY / "dashboards" / f"{uid}.json").read_text())
        assert stored == document, f"deploy/grafana/dashboards/{uid}.json is stale: rebuild it"
