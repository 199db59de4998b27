"""Values as a person reads them: money to the cent, percentages to two
decimals, counts with thousands separators. Exact values stay beside them
(the page's tooltips, the CSV).

Money arrives as exact decimal text (``query.exact_decimals``); everything is
rounded from a ``Decimal``, never from a binary float.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from dashboards.model import Field, Unit

CENT = Decimal("0.01")
NO_VALUE = "–"
_SUFFIX = {Unit.MS: " ms", Unit.SECONDS: " s", Unit.PER_SECOND: " req/s", Unit.PERCENT: " %"}


def as_decimal(value: Any) -> Decimal | None:
    """``value`` (JSON text, int or float) as a Decimal; a float by its shortest repr, not its binary value."""
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        return Decimal(str(value))
    except InvalidOperation:
        return None


def _trimmed(amount: Decimal, places: int) -> str:
    text = f"{amount.quantize(Decimal(1).scaleb(-places), ROUND_HALF_UP):,f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def money(amount: Decimal) -> str:
    """To the cent; a non-zero amount under half a cent reads ``<$0.01``, never ``$0.00``."""
    cents = amount.quantize(CENT, ROUND_HALF_UP)
    if cents == 0 and amount != 0:
        return "<$0.01" if amount > 0 else "-<$0.01"
    return f"{'-' if cents < 0 else ''}${abs(cents):,.2f}"


def exact_money(amount: Decimal) -> str:
    """Every digit the ledger holds (trailing zeros after the cents dropped)."""
    text = f"{abs(amount).normalize():,f}"
    if "." not in text:
        text += ".00"
    elif len(text.split(".")[1]) < 2:
        text += "0"
    return f"{'-' if amount < 0 else ''}${text}"


def percent(value: Decimal) -> str:
    """To two decimals; a non-zero share under 0.005 % reads ``<0.01 %``, never ``0 %``."""
    if value != 0 and value.quantize(CENT, ROUND_HALF_UP) == 0:
        return "<0.01 %" if value > 0 else "-<0.01 %"
    return _trimmed(value, 2) + " %"


def number(value: Decimal) -> str:
    """Whole numbers with separators; fractions to two decimals, or two significant digits below 1."""
    if value == value.to_integral_value():
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return _trimmed(value, 2)
    places = max(2, -value.adjusted() + 1)  # two significant digits
    return _trimmed(value, places)


def display(value: Any, field: Field) -> tuple[str, str]:
    """(the text shown, the exact value for a tooltip, or "" when the text is exact)."""
    if value is None:
        return NO_VALUE, ""
    amount = None if field.unit in (Unit.TEXT, Unit.TIME) else as_decimal(value)
    if amount is None:
        return str(value), ""
    if field.is_money:
        text, exact = money(amount), exact_money(amount)
    elif field.unit is Unit.PERCENT:
        text, exact = percent(amount), f"{amount.normalize():f} %"
    else:
        suffix = _SUFFIX.get(field.unit, "")
        text, exact = number(amount) + suffix, f"{amount.normalize():f}" + suffix
    return text, "" if text.replace(",", "") == exact.replace(",", "") else exact
