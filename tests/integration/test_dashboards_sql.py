"""Every panel's SQL, macros expanded, against chDB over a seeded, known ledger."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.billing import SPEND
from dashboards.catalog import DASHBOARDS, config_constants, dashboard
from dashboards.macros import TimeRange, Variables, expand
from dashboards.query import ChdbRunner
from dashboards.sources import PERIOD_END, PERIOD_START, USAGE_LEDGER
from pipeline.history.schema import EVENTS
from quotameter.config import DEFAULT_CONFIG, parse_config
from quotameter.periods import BillingCalendar
from tests.integration.dashboard_seed import (APRIL_FROM, APRIL_TO, CONFIG_OVERRIDES, JANUARY_FROM, JANUARY_TO,
                                              RANGE_FROM, RANGE_TO, seed)

DAY = TimeRange(RANGE_FROM, RANGE_TO, interval_s=86400)
JANUARY = TimeRange(JANUARY_FROM, JANUARY_TO, interval_s=86400)


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


def rows(runner: ChdbRunner, constants: dict[str, str], key: str, time_range: TimeRange = DAY,
         **selected: list[str]) -> list[dict[str, Any]]:
    board_uid, panel_key = key.split(".")
    panel = dashboard(board_uid).panel(panel_key)
    return runner.rows(expand(panel.sql, time_range, Variables(selected=selected, constants=constants)))


def by(rows_: list[dict[str, Any]], column: str) -> dict[str, dict[str, Any]]:
    return {str(r[column]): r for r in rows_}


PANELS = [(d, p) for d in DASHBOARDS for p in d.panels]


def test_every_panel_is_in_the_parametrized_run() -> None:
    assert [f"{d.uid.removeprefix('quotameter-')}.{p.key}" for d, p in PANELS] == [
        "billing.total_spend", "billing.total_requests", "billing.spend_per_customer", "billing.spend_per_model",
        "billing.mtd_vs_budget", "billing.forecast", "billing.top_customers", "billing.spend_over_time",
        "billing.spend_by_attribution", "billing.spend_per_tag",
        "quotas.utilisation_per_customer", "quotas.utilisation_per_tier", "quotas.refusals_by_tier_reason",
        "quotas.refusals_over_time", "quotas.fallbacks", "quotas.queued",
        "operations.traffic", "operations.requests_per_s", "operations.latency", "operations.ttft",
        "operations.upstream_errors", "operations.pipeline_lag",
    ]


@pytest.mark.parametrize("panel", PANELS, ids=lambda dp: f"{dp[0].uid}.{dp[1].key}")
def test_every_panel_runs(runner: ChdbRunner, constants: dict[str, str], panel: tuple) -> None:
    board, definition = panel
    result = runner.rows(expand(definition.sql, DAY, Variables(constants=constants)))
    assert result, f"{board.uid}.{definition.key} returned no rows over the seeded ledger"
    for column in (*definition.values, *([definition.x] if definition.viz in ("timeseries", "bar") else [])):
        assert column in result[0], f"{definition.key}: no column {column!r} in {list(result[0])}"
    # Every column a person sees has a label; a table or stat shows all its columns, a chart may compute more.
    labelled = [f.name for f in definition.fields]
    if definition.viz in ("table", "stat"):
        assert list(result[0]) == labelled, f"{definition.key}: columns {list(result[0])} labelled {labelled}"
    else:
        assert set(labelled) <= set(result[0]), f"{definition.key}: labels for {labelled}, columns {list(result[0])}"
    for field in definition.fields:
        assert field.label != field.name and "_" not in field.label, f"{definition.key}.{field.name}: {field.label!r}"


def test_billing_figures(runner: ChdbRunner, constants: dict[str, str]) -> None:
    # Event 10 is last month and January is before the range: the range keeps both out.
    assert rows(runner, constants, "billing.total_spend") == [{"spend_usd": 0.0338}]
    assert rows(runner, constants, "billing.total_requests") == [{"requests": 6, "refused": 3}]
    assert rows(runner, constants, "billing.spend_per_customer") == [
        {"customer_series": "acme", "spend_usd": 0.0225}, {"customer_series": "beta", "spend_usd": 0.0095},
        {"customer_series": "cito", "spend_usd": 0.0018}]
    # Past the top customers, the rest are one bar, drawn last.
    top_two = dashboard("billing").panel("spend_per_customer").sql.replace("LIMIT 10", "LIMIT 2")
    assert runner.rows(expand(top_two, DAY, Variables(constants=constants))) == [
        {"customer_series": "acme", "spend_usd": 0.0225}, {"customer_series": "beta", "spend_usd": 0.0095},
        {"customer_series": "(all others)", "spend_usd": 0.0018}]
    assert rows(runner, constants, "billing.spend_per_model") == [
        {"model": "gpt-4o", "spend_usd": 0.0225}, {"model": "mock-small", "spend_usd": 0.0095},
        {"model": "gpt-4o-mini", "spend_usd": 0.0018}]
    over_time = rows(runner, constants, "billing.spend_over_time")
    spend: dict[str, float] = {}
    for row in over_time:
        spend[row["customer_series"]] = round(spend.get(row["customer_series"], 0) + row["spend_usd"], 6)
    assert spend == {"acme": 0.0225, "beta": 0.0095, "cito": 0.0018}
    assert {r["t"] for r in over_time if r["customer_series"] == "acme"} == {"2025-03-02 00:00:00", "2025-03-05 00:00:00"}

    budget = by(rows(runner, constants, "billing.mtd_vs_budget"), "customer")
    # 0.0225 of 500 is 0.0045 %: a percentage rounded to two places in SQL read 0 here.
    assert budget["acme"] | {} == {"customer": "acme", "current_tier": "pro", "mtd_spend_usd": 0.0225,
                                   "budget_usd": 500, "budget_used_pct": 0.0045}
    assert (budget["beta"]["budget_usd"], budget["beta"]["budget_used_pct"]) == (1.9, 0.5)  # the customer override
    assert budget["cito"]["budget_used_pct"] == 0.0000036  # 0.0018 of 50000
    forecast = by(rows(runner, constants, "billing.forecast"), "customer")
    assert forecast["acme"]["forecast_usd"] == 0.06975  # 10 of March's 31 days gone: x 3.1
    assert forecast["acme"]["forecast_budget_pct"] == 0.01395
    assert forecast["beta"]["forecast_budget_pct"] == 1.55
    top = rows(runner, constants, "billing.top_customers")
    assert [r["customer"] for r in top] == ["acme", "beta", "cito"]
    assert (top[1]["input_tokens"], top[1]["output_tokens"], top[1]["refused"]) == (51000, 11000, 1)
    # Who the spend was for: answered requests from the ledger, "(none)" where a request named nobody.
    spent_for = {(r["customer"], r["end_user"], r["project"]): (r["requests"], r["spend_usd"])
                 for r in rows(runner, constants, "billing.spend_by_attribution")}
    assert spent_for[("beta", "ana", "search-app")] == (1, 0.009)
    assert spent_for[("beta", "(none)", "(none)")] == (1, 0.0005)
    assert sum(spend for _, spend in spent_for.values()) == pytest.approx(0.0338 - 0.0)  # every answered request once
    # A request counts under each of its tags.
    assert rows(runner, constants, "billing.spend_per_tag") == [
        {"tag": "team=search", "spend_usd": 0.009}, {"tag": "env=prod", "spend_usd": 0.0018},
        {"tag": "team=ops", "spend_usd": 0.0018}]


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
    # The rollups have no API key: selecting one reads the range from the ledger alone.
    assert rows(runner, constants, "billing.total_spend", api_key=["key-beta"]) == [{"spend_usd": 0.0095}]
    assert rows(runner, constants, "billing.total_requests", api_key=["key-acme", "key-cito"]) == [
        {"requests": 4, "refused": 2}]
    assert rows(runner, constants, "quotas.refusals_by_tier_reason", api_key=["key-cito"]) == [
        {"tier": "enterprise", "refusal_reason": "queued", "refusals": 1}]
    assert rows(runner, constants, "billing.total_spend", api_key=["key-beta"], customer=["acme"]) == [{"spend_usd": 0}]


def test_attribution_filters(runner: ChdbRunner, constants: dict[str, str]) -> None:
    # April: delta's request by end user user-7, project checkout, tags team=payments and env=prod;
    # '+cmd…' in project checkout with team=search.
    april = TimeRange(APRIL_FROM, APRIL_TO, interval_s=86400)
    from dashboards.catalog import VARIABLES

    options = {v.name: [next(iter(r.values())) for r in runner.rows(expand(v.sql, april, Variables(constants=constants)))]
               for v in VARIABLES if v.name in ("end_user", "project", "tag")}
    assert options == {"end_user": ["user-7"], "project": ["checkout"], "tag": ["env=prod", "team=payments", "team=search"]}

    def spend(**selected: list[str]) -> object:
        return rows(runner, constants, "billing.total_spend", april, **selected)[0]["spend_usd"]

    assert spend(end_user=["user-7"]) == 0.0000216
    assert spend(project=["checkout"]) == 2.5000216
    assert spend(tag=["team=payments"]) == 0.0000216
    assert spend(tag=["team=search", "env=prod"]) == 2.5000216  # any selected tag
    assert spend(tag=["team=nobody"]) == 0
    assert spend(project=["checkout"], tag=["team=search"]) == 2.5
    assert [r["customer"] for r in rows(runner, constants, "billing.mtd_vs_budget", april, project=["checkout"])] == [
        '+cmd "quoted", x', "delta"]


def test_a_small_share_of_a_budget_is_not_zero(runner: ChdbRunner, constants: dict[str, str]) -> None:
    # delta: $0.0000216 spent of a $0.10 budget, exactly 0.0216 %.
    april = TimeRange(APRIL_FROM, APRIL_TO, interval_s=86400)
    budget = by(rows(runner, constants, "billing.mtd_vs_budget", april, api_key=["key-delta"]), "customer")
    assert budget == {"delta": {"customer": "delta", "current_tier": "pro", "mtd_spend_usd": 0.0000216,
                                "budget_usd": 0.1, "budget_used_pct": 0.0216}}
    util = by(rows(runner, constants, "quotas.utilisation_per_customer", april), "customer")
    assert (util["delta"]["budget_used_pct"], util["delta"]["token_quota_pct"]) == (0.0216, 0.000212)  # 106 of 50M


def test_a_batch_written_twice_is_counted_once(runner: ChdbRunner, constants: dict[str, str]) -> None:
    # January's five events are in the ledger twice (unmerged); its rollups were rebuilt from the
    # deduplicated ledger. The ledger panels read FINAL (filtered first), the usage panels the rollups.
    (raw,) = runner.rows(f"SELECT count() AS n, uniqExact(id) AS ids FROM {EVENTS} WHERE toYYYYMM(time) = 202501")
    assert (raw["n"], raw["ids"]) == (10, 5)
    assert rows(runner, constants, "quotas.refusals_by_tier_reason", JANUARY) == [
        {"tier": "enterprise", "refusal_reason": "queued", "refusals": 1},
        {"tier": "free", "refusal_reason": "rate_limit_requests", "refusals": 1}]
    assert [r["refusals"] for r in rows(runner, constants, "quotas.refusals_over_time", JANUARY)] == [1, 1]
    assert rows(runner, constants, "quotas.fallbacks", JANUARY) == [
        {"t": "2025-01-11 00:00:00", "model": "mock-small", "fallbacks": 1}]
    assert rows(runner, constants, "quotas.queued", JANUARY) == [
        {"t": "2025-01-12 00:00:00", "decision": "refused", "queued": 1}]
    assert rows(runner, constants, "operations.upstream_errors", JANUARY) == [
        {"t": "2025-01-12 00:00:00", "upstream_name": "mock", "errors": 1}]
    assert rows(runner, constants, "operations.traffic", JANUARY) == [{"events": 5, "refused": 2, "upstream_errors": 1}]
    assert rows(runner, constants, "billing.total_spend", JANUARY) == [{"spend_usd": 0.008}]
    assert rows(runner, constants, "billing.total_requests", JANUARY) == [{"requests": 3, "refused": 2}]


# Ranges whose ends fall inside hours and days, so usage() stitches days, hours and ledger rows:
# (from, to, interval s). Event 2 is at 03-05 12:00:00, event 3 one second later, event 16 at 03-12 10:00:30.
ODD_RANGES = [
    ("2025-03-02T10:30:00", "2025-03-05T12:00:00", 60),  # event 2 on the end's edge: in
    ("2025-03-02T09:30:00", "2025-03-05T11:59:59", 3600),  # event 1's hour whole, event 2 out
    ("2025-03-05T12:00:00", "2025-03-05T12:00:01", 1),  # within one hour: the ledger alone
    ("2025-03-01T00:00:00", "2025-03-31T23:59:59", 10800),  # Grafana's "this month"
    ("2025-02-27T10:00:00", "2025-03-09T10:00:00", 7200),  # across a month boundary
    ("2025-01-01T00:00:00", "2025-03-11T00:00:00", 86400),  # days only (and January's rebuilt rollups)
    ("2025-03-05T12:00:01", "2025-03-12T10:00:10", 3600),  # event 3 in, event 2 out; event 16 (10:00:30) out
    ("2025-03-12T10:00:30", "2025-03-12T10:00:30", 60),  # one instant: event 16
]


@pytest.mark.parametrize("start, end, interval_s", ODD_RANGES)
def test_usage_panels_equal_the_deduplicated_ledger(runner: ChdbRunner, constants: dict[str, str], start: str,
                                                     end: str, interval_s: int) -> None:
    time_range = TimeRange(datetime.fromisoformat(start).replace(tzinfo=UTC),
                           datetime.fromisoformat(end).replace(tzinfo=UTC), interval_s=interval_s)

    def ledger(sql: str) -> list[dict[str, Any]]:
        return runner.rows(expand(sql.replace("FROM LEDGER", f"FROM {USAGE_LEDGER}"), time_range,
                                  Variables(constants=constants)))

    in_range = "FROM LEDGER WHERE $__timeFilter(time)"
    assert rows(runner, constants, "billing.total_spend", time_range) == ledger(f"SELECT {SPEND} AS spend_usd {in_range}")
    assert rows(runner, constants, "billing.total_requests", time_range) == ledger(
        f"SELECT sum(requests) AS requests, sum(refused) AS refused {in_range}")
    assert rows(runner, constants, "billing.spend_per_model", time_range) == ledger(
        f"SELECT model, {SPEND} AS spend_usd {in_range} AND model != '' GROUP BY model ORDER BY spend_usd DESC, model")
    assert rows(runner, constants, "billing.spend_over_time", time_range) == ledger(  # fewer than 10 customers
        f"SELECT $__timeInterval(time) AS t, customer AS customer_series, {SPEND} AS spend_usd {in_range} "
        "GROUP BY t, customer_series ORDER BY t, customer_series")
    top = rows(runner, constants, "billing.top_customers", time_range)
    assert [(r["customer"], r["requests"], r["refused"], r["input_tokens"], r["spend_usd"]) for r in top] == [
        (r["customer"], r["requests"], r["refused"], r["input_tokens"], r["spend_usd"]) for r in ledger(
            f"SELECT customer, sum(requests) AS requests, sum(refused) AS refused, sum(input_tokens) AS input_tokens, "
            f"{SPEND} AS spend_usd {in_range} GROUP BY customer ORDER BY spend_usd DESC, customer")]
    month_to_date = ledger(
        f"SELECT customer, {SPEND} AS mtd_spend_usd FROM LEDGER WHERE time >= toStartOfMonth($__toTime, 'UTC') "
        "AND time <= $__toTime GROUP BY customer ORDER BY mtd_spend_usd DESC, customer")
    assert [{k: r[k] for k in ("customer", "mtd_spend_usd")} for r in
            rows(runner, constants, "billing.mtd_vs_budget", time_range)] == month_to_date
    # An API key selected: the same totals from the ledger alone, wherever the range's ends fall.
    keys = ["key-acme", "key-beta"]
    by_key = f"{in_range} AND api_key_id IN ('key-acme', 'key-beta')"
    assert rows(runner, constants, "billing.total_spend", time_range, api_key=keys) == ledger(
        f"SELECT {SPEND} AS spend_usd {by_key}")
    assert rows(runner, constants, "billing.spend_per_model", time_range, api_key=keys) == ledger(
        f"SELECT model, {SPEND} AS spend_usd {by_key} AND model != '' GROUP BY model ORDER BY spend_usd DESC, model")
    rps = {(r["t"], r["decision"]): r["requests_per_s"] for r in
           rows(runner, constants, "operations.requests_per_s", time_range)}
    assert rps == {(r["t"], r["decision"]): round(r["n"] / interval_s, 6) for r in ledger(
        f"SELECT $__timeInterval(time) AS t, if(requests = 1, 'admitted', 'refused') AS decision, count() AS n "
        f"{in_range} GROUP BY t, decision")}


def test_variable_options_are_what_was_used_in_the_range(runner: ChdbRunner, constants: dict[str, str]) -> None:
    from dashboards.catalog import VARIABLES

    options = {v.name: [next(iter(r.values())) for r in runner.rows(expand(v.sql, DAY, Variables(constants=constants)))]
               for v in VARIABLES}
    assert options == {"customer": ["acme", "beta", "cito"], "tier": ["enterprise", "free", "pro"],
                       "model": ["gpt-4o", "gpt-4o-mini", "mock-small"], "api_key": ["key-acme", "key-beta", "key-cito"],
                       "end_user": ["ana"], "project": ["search-app"], "tag": ["env=prod", "team=ops", "team=search"]}


# -- the billing period in SQL: the same calendar as quotameter.periods -------------------------------

# Santiago, anchor 8: 2024-09-08 has no midnight (clocks jump to 01:00); the period starts at the jump.
CALENDARS = [(zone, anchor) for zone in ("UTC", "America/New_York", "Europe/London", "Pacific/Kiritimati",
                                         "Asia/Kolkata", "Pacific/Chatham") for anchor in (1, 15, 28, 31)]
CALENDARS += [("America/Santiago", 8)]


def _calendar_constants(zone: str, anchor: int) -> dict[str, str]:
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document.update(CONFIG_OVERRIDES)
    document["billing"] = {**document.get("billing", {}), "timezone": zone, "anchor_day": anchor}
    return config_constants(parse_config(document))


@pytest.mark.parametrize(("zone", "anchor"), CALENDARS)
def test_period_bounds_in_sql_are_the_calendars(runner: ChdbRunner, zone: str, anchor: int) -> None:
    calendar = BillingCalendar(zone, anchor)
    moments = []
    period = "2024-01"
    for _ in range(26):  # two years: leap February, both DST changes, anchor 31 in short months
        start, _end = calendar.bounds(period)
        moments += [start - timedelta(minutes=1), start, start + timedelta(minutes=1), start + timedelta(days=12)]
        period = calendar.next(period)
    seconds = ", ".join(str(int(m.timestamp())) for m in moments)
    sql = f"""SELECT toUnixTimestamp(at) AS m, toUnixTimestamp({PERIOD_START}) AS s, toUnixTimestamp({PERIOD_END}) AS e
FROM (SELECT toDateTime(arrayJoin([{seconds}]), 'UTC') AS at) ORDER BY m""".replace("$__toTime", "at")
    got = runner.rows(expand(sql, DAY, Variables(constants=_calendar_constants(zone, anchor))))
    want = []
    for moment in moments:
        start, end = calendar.bounds(calendar.period_of(moment))
        want.append({"m": int(moment.timestamp()), "s": int(start.timestamp()), "e": int(end.timestamp())})
    assert got == want


@pytest.mark.parametrize(("zone", "anchor", "range_to"), [
    ("Asia/Kolkata", 5, RANGE_TO),  # starts 2025-03-04 18:30 UTC: a half hour, inside a UTC day
    ("America/New_York", 27, datetime(2025, 3, 20, tzinfo=UTC)),  # 2025-02 from 02-27 05:00 UTC holds event 10
    ("Pacific/Kiritimati", 3, RANGE_TO),  # +14: starts 2025-03-02 10:00 UTC, event 1's very hour
    ("Europe/London", 31, RANGE_TO),  # 2025-02: Feb 28 - Mar 31 (BST by then), not a month from Feb 28
])
def test_period_to_date_panels_follow_the_calendar(runner: ChdbRunner, zone: str, anchor: int, range_to: datetime) -> None:
    calendar = BillingCalendar(zone, anchor)
    constants = _calendar_constants(zone, anchor)
    time_range = TimeRange(RANGE_FROM, range_to, interval_s=86400)
    start, end = calendar.bounds(calendar.period_of(range_to))
    expected = runner.rows(
        f"SELECT customer, toString(sum(cost_usd)) AS spend FROM {EVENTS} FINAL"
        f" WHERE time >= fromUnixTimestamp64Milli({int(start.timestamp()) * 1000}, 'UTC')"
        f" AND time <= fromUnixTimestamp64Milli({int(range_to.timestamp()) * 1000}, 'UTC') GROUP BY customer")
    exact = {r["customer"]: Decimal(r["spend"]) for r in expected}
    spend = {c: float(s) for c, s in exact.items()}
    budget = by(rows(runner, constants, "billing.mtd_vs_budget", time_range), "customer")
    assert {c: r["mtd_spend_usd"] for c, r in budget.items()} == spend
    elapsed_s, period_s = int((range_to - start).total_seconds()), int((end - start).total_seconds())
    forecast = by(rows(runner, constants, "billing.forecast", time_range), "customer")
    assert {c: r["forecast_usd"] for c, r in forecast.items()} == {  # Decimal(38, 12) division truncates
        c: float((s * period_s / elapsed_s).quantize(Decimal("1e-12"), ROUND_DOWN)) for c, s in exact.items()}
    util = by(rows(runner, constants, "quotas.utilisation_per_customer", time_range), "customer")
    assert {c: r["mtd_spend_usd"] for c, r in util.items()} == spend
