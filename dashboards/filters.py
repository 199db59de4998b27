"""The dashboards' filters: one ``Dimension`` per thing a person can filter
usage by. Each becomes a template variable (a Grafana variable and a select on
the built-in page) and a condition in every panel's SQL.

Adding a dimension is one line in ``DIMENSIONS``. A dimension the rollups do
not group by (``in_rollups=False``) still filters exactly: while it selects
anything but All, ``sources.usage`` reads the whole range from the ledger
instead of the rollups.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.history.schema import EVENTS

# The model served, else the one requested (the rollups' ``model``).
MODEL = "coalesce(model_served, model_requested, '')"
# A request's tags as 'key=value' strings: one filter value per tag.
TAG_PAIRS = "arrayMap((k, v) -> concat(k, '=', v), mapKeys(tags), mapValues(tags))"


@dataclass(frozen=True)
class Dimension:
    name: str  # the template variable
    label: str
    ledger_expr: str  # its value on a ledger row: a String, or an Array(String) when ``many``
    in_rollups: bool = False  # the rollups group by it, under ``name``
    many: bool = False  # a row has several values (tags): it matches when any is selected


DIMENSIONS = (
    Dimension("customer", "Customer", "customer", in_rollups=True),
    Dimension("tier", "Tier", "tier", in_rollups=True),
    Dimension("model", "Model", MODEL, in_rollups=True),
    Dimension("api_key", "API key", "api_key_id"),
    Dimension("end_user", "End user", "end_user"),
    Dimension("project", "Project", "project"),
    Dimension("tag", "Tag", TAG_PAIRS, many=True),
)


def _condition(column: str, name: str, many: bool = False) -> str:
    if many:
        return f"$__conditionalAll(hasAny({column}, [${{{name}}}]), ${name})"
    return f"$__conditionalAll({column} IN (${{{name}}}), ${name})"


def rollup_filters() -> str:
    """On the rollups' columns; false while a ledger-only dimension selects anything."""
    return "\n  AND ".join(
        _condition(d.name, d.name) if d.in_rollups else f"$__conditionalAll(0, ${d.name})" for d in DIMENSIONS
    )


def ledger_filters() -> str:
    """On the ledger's own columns (usable in PREWHERE, before any alias exists)."""
    return "\n  AND ".join(_condition(d.ledger_expr, d.name, d.many) for d in DIMENSIONS)


def ledger_only_selected() -> str:
    """True while a dimension the rollups lack selects anything but All."""
    parts = [f"NOT ($__conditionalAll(0, ${d.name}))" for d in DIMENSIONS if not d.in_rollups]
    return " OR ".join(parts) or "0"


def ledger_options_sql(dimension: Dimension) -> str:
    """The values a dimension took in the range, read from the ledger (unfiltered)."""
    value = f"arrayJoin({dimension.ledger_expr})" if dimension.many else dimension.ledger_expr
    return (f"SELECT DISTINCT {value} AS {dimension.name} FROM {EVENTS} "
            f"PREWHERE $__timeFilter(time) WHERE {dimension.name} != '' ORDER BY {dimension.name}")
