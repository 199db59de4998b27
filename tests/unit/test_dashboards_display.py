"""What a person reads: money to the cent from exact decimals, shares that are
never 0 when something was used, CSV a spreadsheet shows and never runs."""

from __future__ import annotations

import csv
import io
from decimal import Decimal

import pytest

from dashboards.csv_export import panel_csv, safe_text
from dashboards.display import display, money, percent
from dashboards.model import Field, Panel, Unit, Viz

USD = Field("spend_usd", "Spend", Unit.USD)
PCT = Field("budget_used_pct", "Budget used", Unit.PERCENT)
COUNT = Field("requests", "Requests")


@pytest.mark.parametrize(("exact", "shown", "tooltip"), [
    ("0.0000216", "<$0.01", "$0.0000216"),  # never $0.00 for a spend
    ("0.004999999999", "<$0.01", "$0.004999999999"),
    ("0.005", "$0.01", "$0.005"),  # half a cent rounds up
    ("0.0338", "$0.03", "$0.0338"),
    ("0", "$0.00", ""),
    ("500", "$500.00", ""),
    ("1.9", "$1.90", ""),
    ("1234567.895", "$1,234,567.90", "$1,234,567.895"),
    ("12345.678901234567", "$12,345.68", "$12,345.678901234567"),  # more digits than a float holds
    ("-0.25", "-$0.25", ""),
])
def test_money_to_the_cent_with_the_exact_value_beside(exact: str, shown: str, tooltip: str) -> None:
    assert display(exact, USD) == (shown, tooltip)


def test_money_is_rounded_from_the_decimal_text_not_a_float() -> None:
    # As a binary float 1.005 is 1.00499999999999989…, which rounds to $1.00.
    assert money(Decimal("1.005")) == "$1.01"
    assert display("2.675", USD)[0] == "$2.68"


@pytest.mark.parametrize(("value", "shown", "tooltip"), [
    ("0.0045", "<0.01 %", "0.0045 %"),  # 0.0225 of 500: rounded to two places in SQL this read 0
    ("0.0216", "0.02 %", "0.0216 %"),
    ("0.5", "0.5 %", ""),
    ("62", "62 %", ""),
    ("24.691357802469", "24.69 %", "24.691357802469 %"),
    ("0", "0 %", ""),
    (None, "–", ""),  # no budget
])
def test_percentages(value: str | None, shown: str, tooltip: str) -> None:
    assert display(value, PCT) == (shown, tooltip)
    if value not in (None, "0"):
        assert percent(Decimal(value)) != "0 %"


def test_counts_and_text() -> None:
    assert display(51000, COUNT) == ("51,000", "")
    assert display(5000000000, COUNT) == ("5,000,000,000", "")
    assert display("=SUM(1,2)", Field("customer", "Customer", Unit.TEXT)) == ("=SUM(1,2)", "")  # the page escapes HTML
    assert display(0.000012, Field("rps", "Requests per second", Unit.PER_SECOND)) == ("0.000012 req/s", "")


@pytest.mark.parametrize(("text", "safe"), [
    ("=SUM(1,2)", "'=SUM(1,2)"), ("+1", "'+1"), ("-2+3", "'-2+3"), ("@evil", "'@evil"), ("\t=1", "'\t=1"),
    ("\r=1", "'\r=1"), ("  =1", "'  =1"), ("acme", "acme"), ("a=b", "a=b"), ("", ""),
])
def test_text_a_spreadsheet_would_run_is_quoted(text: str, safe: str) -> None:
    assert safe_text(text) == safe


def test_csv_quotes_text_and_keeps_numbers_exact() -> None:
    panel = Panel(id=1, key="k", title="t", sql="SELECT 1", viz=Viz.TABLE,
                  fields=(Field("customer", "Customer", Unit.TEXT), USD, PCT, COUNT))
    rows = [{"customer": 'a, "b"\n=c', "spend_usd": "12345.678901234567", "budget_used_pct": None, "requests": 3},
            {"customer": "-x", "spend_usd": "-1.5", "budget_used_pct": "0.0045", "requests": 0}]
    text = panel_csv(panel, rows)
    assert text == ('Customer,Spend (USD),Budget used (%),Requests\r\n'
                    '"a, ""b""\n=c",12345.678901234567,,3\r\n'
                    "'-x,-1.5,0.0045,0\r\n")  # a negative amount stays a number
    assert list(csv.reader(io.StringIO(text, newline="")))[1] == ['a, "b"\n=c', "12345.678901234567", "", "3"]
