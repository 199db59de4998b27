"""A panel's rows as CSV, for a spreadsheet: a header of labels, the exact
values (money as the ledger's decimal text, never rounded), RFC 4180 quoting.

Customer ids, model names and tags are chosen by customers. A spreadsheet
runs a cell starting with ``=``, ``+``, ``-`` or ``@`` (or a tab or carriage
return before one) as a formula, so such text cells are written behind a
single quote, which the spreadsheet shows as text. Numeric columns come from
the panel's own SQL and are written as they are (a negative amount stays a
number).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from typing import Any

from dashboards.model import Panel, Unit

FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_UNIT_IN_HEADER = {Unit.USD: " (USD)", Unit.PERCENT: " (%)", Unit.MS: " (ms)", Unit.SECONDS: " (s)",
                   Unit.TIME: " (UTC)"}


def safe_text(text: str) -> str:
    """``text`` as a spreadsheet will show it, never run it."""
    return "'" + text if text.lstrip(" ").startswith(FORMULA_START) else text


def _cell(value: Any, is_text: bool) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value)
    return safe_text(text) if is_text else text


def panel_csv(panel: Panel, rows: Iterable[Mapping[str, Any]]) -> str:
    """The panel's fields, in order, with their labels as the header."""
    out = io.StringIO()
    writer = csv.writer(out, quoting=csv.QUOTE_MINIMAL, lineterminator="\r\n")
    writer.writerow([safe_text(f.label + _UNIT_IN_HEADER.get(f.unit, "")) for f in panel.fields])
    text_columns = [(f.name, f.unit in (Unit.TEXT, Unit.TIME)) for f in panel.fields]
    for row in rows:
        writer.writerow([_cell(row.get(name), is_text) for name, is_text in text_columns])
    return out.getvalue()
