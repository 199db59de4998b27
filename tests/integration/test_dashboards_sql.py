"""Every panel's SQL, macros expanded, against chDB over a seeded, known ledger."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.catalog import DASHBOARDS, config_constants, dashboard
from dashboards.macros import TimeRange, Variables, expand
from dashboards.query import ChdbRunner
from quotameter.config import DEFAULT_CONFIG, parse_config
from tests.integration.dashboard_seed import CONFIG_OVERRIDES, RANGE_FROM, RANGE_TO, seed

DAY = TimeRange(RANGE_FROM, RANGE_TO, interval_s=86400)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChdbRunner]:
    path = tmp_path_factory.mktemp("dash-sql") / "history"
    seed(path)
    opened = ChdbRunner(path)  # read-only, as the dashboard opens it with no worker running
    yield opened
    opened.close()


@pytest.fixture(scope="module")
def constants() -> dict[str, str]:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document.update(CONFIG_OVERRIDES)
    return config_constants(parse_config(document))


def rows(runner: ChdbRunner, constants: dict[str, str], key: str, **selected: list[str]) -> list[dict[str, Any]]:
    board_uid, panel_key = key.split(".")
    panel = dashboard(board_uid).panel(panel_key)
    return runner.rows(expand(panel.sql, DAY, Variables(selected=selected, constants=constants)))


def by(rows_: list[dict[str, Any]], column: str) -> dict[str, dict[str, Any]]:
    return {str(r[column]): r for r in rows_}


@pytest.mark.parametrize("panel", [(d, p) for d in DASHBOARDS for p in d.panels], ids=lambda dp: f"{dp[0].uid}.{dp[1].key}")
def test_every_panel_runs(runner: ChdbRunner, constants: dict[str, str], panel: tuple) -> None:
    board, definition = panel
    result = runner.rows(expand(definition.sql, DAY, Variables(constants=constants)))
    assert result, f"{board.uid}.{definition.key} returned no rows over the seeded ledger"
    for column in (*definition.values, *([definition.x] if definition.viz in ("timeseries", "bar") else [])):
        assert column in result[0], f"{definition.key}: no column {column!r} in {list(result[0])}"


def test_billing_figures(runner: ChdbRunner, constants: dict[str, str]) -> None:
    # Event 1 is stored twice and event 10 is last month: FINAL and the range keep both out.
    assert rows(runner, constants, "billing.total_spend") == [{"spend_usd": 0.0338}]
    assert rows(runner, constants, "billing.total_requests") == [{"requests": 6, "refused": 3}]
    per_customer = rows(runner, constants, "billing.spend_per_customer")
    spend: dict[str, float] = {}
    for row in per_customer:
        spend[row["customer_series"]] = round(spend.get(row["customer_series"], 0) + row["spend_usd"], 6)
    assert spend == {"acme": 0.0225, "beta": 0.0095, "cito": 0.0018}
    assert {r["t"] for r in per_customer if r["customer_series"] == "acme"} == {"2025-03-02 00:00:00", "2025-03-05 00:00:00"}

    budget = by(rows(runner, constants, "billing.mtd_vs_budget"), "customer")
    assert budget["acme"] | {} == {"customer": "acme", "current_tier": "pro", "mtd_spend_usd": 0.0225,
                                   "budget_usd": 500, "budget_used_pct": 0}
    assert (budget["beta"]["budget_usd"], budget["beta"]["budget_used_pct"]) == (1.9, 0.5)  # the customer override
    forecast = by(rows(runner, constants, "billing.forecast"), "customer")
    assert forecast["acme"]["forecast_usd"] == 0.06975  # 10 of March's 31 days gone: x 3.1
    assert forecast["beta"]["forecast_budget_pct"] == 1.55
    top = rows(runner, constants, "billing.top_customers")
    assert [r["customer"] for r in top] == ["acme", "beta", "cito"]
    assert (top[1]["input_tokens"], top[1]["output_tokens"], top[1]["refused"]) == (51000, 11000, 1)


def test_quota_figures(runner: ChdbRunner, constants: dict[str, str]) -> None:
    util = by(rows(runner, constants, "quotas.utilisation_per_customer"), "customer")
    assert (util["beta"]["mtd_tokens"], util["beta"]["token_quota"], util["beta"]["token_quota_pct"]) == (
        62000, 100000, 62)
    tiers = by(rows(runner, constants, "quotas.utilisation_per_tier"), "tier")
    assert tiers["free"]["token_quota_pct"] == 62 and tiers["pro"]["tokens"] == 4500
    refusals = {(r["tier"], r["refusal_reason"]): r["refusals"] for r in rows(runner, constants, "quotas.refusals_by_tier_reason")}
    assert refusals == {("enterprise", "queued"): 1, ("free", "quota_tokens"): 1, ("pro", "rate_limit_requests"): 1}
    assert rows(runner, constants, "quotas.fallbacks") == [{"t": "2025-03-06 00:00:00", "model": "mock-small", "fallbacks": 1}]
    assert {r["decision"]: r["queued"] for r in rows(runner, constants, "quotas.queued")} == {"admitted": 1, "refused": 1}


def test_operations_figures(runner: ChdbRunner, constants: dict[str, str]) -> None:
    assert rows(runner, constants, "operations.traffic") == [{"events": 9, "refused": 3, "upstream_errors": 1}]
    rps = {(r["t"], r["decision"]): r["requests_per_s"] for r in rows(runner, constants, "operations.requests_per_s")}
    assert rps[("2025-03-05 00:00:00", "refused")] == round(1 / 86400, 6)
    latency = by(rows(runner, constants, "operations.latency"), "t")
    assert latency["2025-03-02 00:00:00"]["p99_ms"] == 100 and "2025-03-09 00:00:00" not in latency  # refusals left out
    assert [r["p50_ms"] for r in rows(runner, constants, "operations.ttft")] == [40, 60, 80]
    assert rows(runner, constants, "operations.upstream_errors") == [
        {"t": "2025-03-08 00:00:00", "upstream_name": "mock", "errors": 1}]
    lag = by(rows(runner, constants, "operations.pipeline_lag"), "t")
    assert lag["2025-03-02 00:00:00"]["max_lag_s"] == 2 and lag["2025-03-05 00:00:00"]["max_lag_s"] == 4


def test_template_variables_filter(runner: ChdbRunner, constants: dict[str, str]) -> None:
    assert rows(runner, constants, "billing.total_spend", customer=["beta", "cito"]) == [{"spend_usd": 0.0113}]
    assert rows(runner, constants, "billing.total_spend", tier=["pro"]) == [{"spend_usd": 0.0225}]
    assert rows(runner, constants, "billing.total_spend", model=["mock-small"]) == [{"spend_usd": 0.0095}]
    assert rows(runner, constants, "billing.total_spend", customer=["x') OR ('1'='1"]) == [{"spend_usd": 0}]
