"""Macro and template-variable expansion, with the plugin's semantics and safe quoting."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dashboards.macros import ALL, MacroError, TimeRange, Variables, expand, nice_interval_s, parse_time, quote_literal

RANGE = TimeRange(datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 2, tzinfo=UTC), interval_s=3600)
FROM_S, TO_S = 1740787200, 1740873600


def test_time_macros_follow_the_plugin() -> None:
    sql = "SELECT $__timeInterval(time) AS t, $__interval_s FROM x WHERE $__timeFilter(time) AND a < $__toTime"
    assert expand(sql, RANGE) == (
        "SELECT toStartOfInterval(toDateTime(time), INTERVAL 3600 second) AS t, 3600 FROM x "
        f"WHERE time >= toDateTime({FROM_S}) AND time <= toDateTime({TO_S}) AND a < toDateTime({TO_S})"
    )
    assert expand("$__fromTime $__fromTime_ms $__toTime_ms", RANGE) == (
        f"toDateTime({FROM_S}) fromUnixTimestamp64Milli({FROM_S}000) fromUnixTimestamp64Milli({TO_S}000)"
    )
    assert expand("$__timeFilter_ms(ts)", RANGE) == (
        f"ts >= fromUnixTimestamp64Milli({FROM_S}000) AND ts <= fromUnixTimestamp64Milli({TO_S}000)"
    )
    assert expand("$__dateFilter(d)", RANGE) == "d >= toDate('2025-03-01') AND d <= toDate('2025-03-02')"


def test_interval_is_derived_and_rounded_when_not_given() -> None:
    week = TimeRange(datetime(2025, 3, 1, tzinfo=UTC), datetime(2025, 3, 8, tzinfo=UTC))
    assert week.effective_interval_s == 3600  # 604800 s / 300 points = 2016 s → the next nice step
    assert nice_interval_s(0.2) == 1


def test_variables_are_quoted_lists_and_all_drops_the_condition() -> None:
    sql = "WHERE $__conditionalAll(customer IN (${customer}), $customer) AND tier IN ($tier) AND m = [[model]]"
    variables = Variables(selected={"customer": ["acme", "beta"], "tier": ["pro"], "model": ["gpt-4o"]})
    assert expand(sql, RANGE, variables) == (
        "WHERE customer IN ('acme','beta') AND tier IN ('pro') AND m = 'gpt-4o'"
    )
    all_customers = Variables(selected={"customer": ALL, "tier": ["pro"], "model": ["x"]})
    assert expand(sql, RANGE, all_customers).startswith("WHERE 1=1 AND tier IN ('pro')")


def test_all_outside_conditional_all_expands_to_every_option() -> None:
    variables = Variables(selected={"tier": ALL}, options={"tier": ["free", "pro"]})
    assert expand("tier IN (${tier:singlequote})", RANGE, variables) == "tier IN ('free','pro')"
    with pytest.raises(MacroError, match="conditionalAll"):
        expand("tier IN ($tier)", RANGE, Variables(selected={"tier": ALL}))


def test_a_variable_cannot_inject_sql() -> None:
    evil = "x') OR 1=1 --\\"
    out = expand("customer IN (${customer})", RANGE, Variables(selected={"customer": [evil]}))
    assert out == "customer IN ('x\\') OR 1=1 --\\\\')"
    assert quote_literal("a\nb'c") == "'a\\nb\\'c'"


def test_variable_values_are_not_read_as_macros() -> None:
    out = expand("c = $customer", RANGE, Variables(selected={"customer": ["$__timeFilter(x)"]}))
    assert out == "c = '$__timeFilter(x)'"


def test_constants_are_pasted_as_they_are() -> None:
    out = expand("${tier_budget_usd}[tier]", RANGE, Variables(constants={"tier_budget_usd": "map('pro', '1')"}))
    assert out == "map('pro', '1')[tier]"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("$__timeFilter(a, b)", "one column"),
        ("$__timeFilter", "needs a column"),
        ("$__nope", "unknown macro"),
        ("$who", "unknown template variable"),
        ("${customer:raw}", "not supported"),
        ("$__conditionalAll(a = 1)", "takes"),
    ],
)
def test_misuse_is_a_clear_error(sql: str, message: str) -> None:
    with pytest.raises(MacroError, match=message):
        expand(sql, RANGE, Variables(selected={"customer": ["a"]}))


def test_grafana_times() -> None:
    now = datetime(2025, 3, 15, 12, 30, tzinfo=UTC)
    assert parse_time("now", now) == now
    assert parse_time("now-6h", now) == datetime(2025, 3, 15, 6, 30, tzinfo=UTC)
    assert parse_time("now-1M", now) == datetime(2025, 2, 15, 12, 30, tzinfo=UTC)
    assert parse_time("now/M", now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_time("2025-03-01T00:00:00Z", now) == datetime(2025, 3, 1, tzinfo=UTC)
    assert parse_time("1740787200000", now) == datetime(2025, 3, 1, tzinfo=UTC)
    with pytest.raises(MacroError):
        parse_time("yesterday", now)
