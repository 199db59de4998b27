"""The ClickHouse datasource's macros and Grafana's template variables, expanded
for the built-in dashboard, tests and benchmarks.

Semantics follow the grafana-clickhouse-datasource plugin (v4):

    $__fromTime / $__toTime            toDateTime(<unix seconds>)
    $__fromTime_ms / $__toTime_ms      fromUnixTimestamp64Milli(<unix ms>)
    $__timeFilter(col)                 col >= toDateTime(from) AND col <= toDateTime(to)   (both ends inclusive)
    $__timeFilter_ms(col)              the same with fromUnixTimestamp64Milli
    $__dateFilter(col)                 col >= toDate('YYYY-MM-DD') AND col <= toDate('YYYY-MM-DD')
    $__timeInterval(col)               toStartOfInterval(toDateTime(col), INTERVAL <n> second), n = max(interval, 1 s)
    $__interval_s                      n
    $__conditionalAll(cond, $var)      cond, or 1=1 when $var selects All (applied before variables)

Template variables: ``$name``, ``${name}``, ``${name:format}`` and ``[[name]]``.
Unlike Grafana (which pastes a single value raw), every value is written as
an escaped ClickHouse string literal, a multi-value selection as a comma
separated list of them: ``customer IN (${customer})``. A value can never
close its quotes, so a request parameter cannot inject SQL. Constants are
SQL fragments this package generates from the config (never from a
request) and are pasted as they are.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from quotameter.errors import QuotameterError

ALL = "$__all"  # Grafana's value for an "All" selection

# Grafana's nice intervals (kbn.roundInterval), in seconds.
_NICE_INTERVALS_S = (1, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400,
                     604800, 2592000)
DEFAULT_MAX_DATA_POINTS = 300
_SAFE_FORMATS = {"", "singlequote", "sqlstring", "csv"}


class MacroError(QuotameterError):
    """A panel's SQL uses a macro or variable wrongly (bad arguments, an
    unknown variable or format). Fix the panel definition it names."""


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_s: int = 0  # 0: derived from the range and DEFAULT_MAX_DATA_POINTS

    def __post_init__(self) -> None:
        if self.start.tzinfo is None or self.end.tzinfo is None:
            raise MacroError("a time range needs time-zone aware datetimes")
        if self.end < self.start:
            raise MacroError(f"the time range ends ({self.end.isoformat()}) before it starts ({self.start.isoformat()})")

    @property
    def effective_interval_s(self) -> int:
        if self.interval_s > 0:
            return self.interval_s
        return nice_interval_s((self.end - self.start).total_seconds() / DEFAULT_MAX_DATA_POINTS)


def nice_interval_s(raw_s: float) -> int:
    """The smallest nice interval (1s, 5s, … 1h … 30d) not below ``raw_s``; at least 1 s."""
    for step in _NICE_INTERVALS_S:
        if raw_s <= step:
            return step
    return int(math.ceil(raw_s / 86400) * 86400)


def quote_literal(value: str) -> str:
    """A ClickHouse string literal: backslashes and quotes escaped, control characters too."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    escaped = escaped.replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t").replace("\0", "\\0")
    return f"'{escaped}'"


@dataclass(frozen=True)
class Variables:
    """Template variable values: a selection is a list of strings or ``ALL``.

    ``options`` lists every value of a variable, used when a panel pastes an
    All selection outside ``$__conditionalAll``; ``constants`` are trusted SQL
    fragments (from the config, never from a request).
    """

    selected: Mapping[str, Sequence[str] | str] = field(default_factory=dict)
    options: Mapping[str, Sequence[str]] = field(default_factory=dict)
    constants: Mapping[str, str] = field(default_factory=dict)

    def is_all(self, name: str) -> bool:
        value = self.selected.get(name, ALL)
        return value == ALL or (not isinstance(value, str) and len(value) == 0)

    def sql_for(self, name: str, fmt: str) -> str:
        if name in self.constants:
            return self.constants[name]
        if name not in self.selected and name not in self.options:
            raise MacroError(f"unknown template variable ${name}")
        if fmt not in _SAFE_FORMATS:
            raise MacroError(f"format {fmt!r} of ${name} is not supported here (use ${{{name}}} or ${{{name}:singlequote}})")
        if self.is_all(name):
            if name not in self.options:
                raise MacroError(f"${name} selects All: wrap its condition in $__conditionalAll(…, ${name})")
            values: Sequence[str] = self.options[name]
        else:
            raw = self.selected[name]
            values = [raw] if isinstance(raw, str) else raw
        if not values:
            return "NULL"  # IN (NULL) matches nothing, as an empty selection should
        return ",".join(quote_literal(str(v)) for v in values)


def _call_args(sql: str, open_paren: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose ``(`` is at ``open_paren``,
    and the index just past its ``)``. Nested parentheses and quoted strings are skipped."""
    depth, args, start, i, quote = 0, [], open_paren + 1, open_paren, ""
    while i < len(sql):
        ch = sql[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'\"`":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append(sql[start:i].strip())
                return args, i + 1
        elif ch == "," and depth == 1:
            args.append(sql[start:i].strip())
            start = i + 1
        i += 1
    raise MacroError(f"unbalanced parentheses after {sql[max(0, open_paren - 30):open_paren]!r}")


_CONDITIONAL_ALL = "$__conditionalAll("
_VAR_IN_ARG = re.compile(r"^\$\{?(\w+)(?::\w+)?\}?$")


def _apply_conditional_all(sql: str, variables: Variables) -> str:
    # Right to left, as the plugin does, so nested calls resolve inside out.
    index = sql.rfind(_CONDITIONAL_ALL)
    while index != -1:
        args, end = _call_args(sql, index + len(_CONDITIONAL_ALL) - 1)
        if len(args) != 2:
            raise MacroError(f"$__conditionalAll takes (condition, $variable), got {len(args)} arguments")
        match = _VAR_IN_ARG.match(args[1])
        if not match:
            raise MacroError(f"$__conditionalAll's second argument must be a variable, got {args[1]!r}")
        phrase = "1=1" if variables.is_all(match.group(1)) else args[0]
        sql = sql[:index] + phrase + sql[end:]
        index = sql.rfind(_CONDITIONAL_ALL)
    return sql


def _seconds(moment: datetime) -> int:
    return int(moment.timestamp())


def _millis(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


_COLUMN_MACROS = {
    "timeFilter": lambda c, r: f"{c} >= toDateTime({_seconds(r.start)}) AND {c} <= toDateTime({_seconds(r.end)})",
    "timeFilter_ms": lambda c, r: (
        f"{c} >= fromUnixTimestamp64Milli({_millis(r.start)}) AND {c} <= fromUnixTimestamp64Milli({_millis(r.end)})"
    ),
    "dateFilter": lambda c, r: (
        f"{c} >= toDate('{r.start.astimezone(UTC):%Y-%m-%d}') AND {c} <= toDate('{r.end.astimezone(UTC):%Y-%m-%d}')"
    ),
    "timeInterval": lambda c, r: f"toStartOfInterval(toDateTime({c}), INTERVAL {r.effective_interval_s} second)",
    "timeInterval_ms": lambda c, r: (
        f"toStartOfInterval(toDateTime64({c}, 3), INTERVAL {r.effective_interval_s * 1000} millisecond)"
    ),
}
_VALUE_MACROS = {
    "fromTime_ms": lambda r: f"fromUnixTimestamp64Milli({_millis(r.start)})",
    "toTime_ms": lambda r: f"fromUnixTimestamp64Milli({_millis(r.end)})",
    "fromTime": lambda r: f"toDateTime({_seconds(r.start)})",
    "toTime": lambda r: f"toDateTime({_seconds(r.end)})",
    "interval_s": lambda r: str(r.effective_interval_s),
}
_MACRO = re.compile(r"\$__(\w+)")
_VARIABLE = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\[\[(\w+)(?::(\w+))?\]\]|\$(\w+)")


def _apply_time_macros(sql: str, time_range: TimeRange) -> str:
    out, pos = [], 0
    for match in _MACRO.finditer(sql):
        if match.start() < pos:
            continue
        name = match.group(1)
        out.append(sql[pos:match.start()])
        if name in _COLUMN_MACROS:
            paren = match.end()
            if paren >= len(sql) or sql[paren] != "(":
                raise MacroError(f"$__{name} needs a column: $__{name}(column)")
            args, end = _call_args(sql, paren)
            if len(args) != 1 or not args[0]:
                raise MacroError(f"$__{name} takes one column, got {args!r}")
            out.append(_COLUMN_MACROS[name](args[0], time_range))
            pos = end
        elif name in _VALUE_MACROS:
            out.append(_VALUE_MACROS[name](time_range))
            pos = match.end()
            if sql.startswith("()", pos):  # $__fromTime() is accepted too
                pos += 2
        else:
            raise MacroError(f"unknown macro $__{name}")
    out.append(sql[pos:])
    return "".join(out)


def _apply_variables(sql: str, variables: Variables) -> str:
    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3) or match.group(5)
        fmt = match.group(2) or match.group(4) or ""
        return variables.sql_for(name, fmt)

    return _VARIABLE.sub(substitute, sql)


def expand(sql: str, time_range: TimeRange, variables: Variables | None = None) -> str:
    """``sql`` with conditionalAll, then the time macros, then the variables expanded."""
    variables = variables or Variables()
    sql = _apply_conditional_all(sql, variables)
    sql = _apply_time_macros(sql, time_range)
    return _apply_variables(sql, variables)


def parse_time(text: str, now: datetime) -> datetime:
    """A Grafana-style time: ``now``, ``now-6h`` (s m h d w M y), ``now/M`` (start of
    month, UTC), epoch milliseconds, or an ISO 8601 timestamp (UTC if naive)."""
    text = text.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, UTC)
    match = re.fullmatch(r"now(?:-(\d+)([smhdwMy]))?(/M)?", text)
    if match:
        moment = now
        if match.group(1):
            amount, unit = int(match.group(1)), match.group(2)
            if unit == "M":
                moment = _add_months(moment, -amount)
            elif unit == "y":
                moment = _add_months(moment, -12 * amount)
            else:
                seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit]
                moment = moment - timedelta(seconds=amount * seconds)
        if match.group(3):
            moment = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return moment
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise MacroError(f"cannot read the time {text!r} (now, now-7d, now/M, epoch ms or ISO 8601)") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _add_months(moment: datetime, months: int) -> datetime:
    index = moment.year * 12 + moment.month - 1 + months
    year, month = divmod(index, 12)
    day = min(moment.day, [31, 29 if year % 4 == 0 and (year % 100 or year % 400 == 0) else 28, 31, 30, 31, 30,
                           31, 31, 30, 31, 30, 31][month])
    return moment.replace(year=year, month=month + 1, day=day)
