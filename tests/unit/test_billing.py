"""Invoice lines, rounding, reconciliation, finality and Stripe meter events: pure logic."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
import yaml

from quotameter import billing, reconcile, stripe_meter
from quotameter.billing import Component
from quotameter.config import DEFAULT_CONFIG, load_config, parse_config

CONFIG = load_config()


def row(customer: str, model: str, version: str, *, requests: int = 1, cost: str, **billed: int) -> dict:
    counts = {name: 0 for name in billing.COUNTS}
    counts.update(requests=requests, events=requests)
    tokens = {billing.BILLED_COLUMNS[c]: billed.get(c.value, 0) for c in Component}
    counts["input_tokens"] = tokens["billed_input_tokens"] + tokens["billed_cached_input_tokens"] + tokens["billed_cache_write_tokens"]
    counts["cached_tokens"] = tokens["billed_cached_input_tokens"]
    counts["output_tokens"] = tokens["billed_output_tokens"] + tokens["billed_reasoning_tokens"]
    counts["reasoning_tokens"] = tokens["billed_reasoning_tokens"]
    # JSONEachRow may quote 64-bit integers: the lines accept both.
    return {"customer": customer, "model": model, "price_version": version, **{k: str(v) for k, v in counts.items()}, **tokens, "cost_usd": cost}


ROWS = [
    # 1500 × 0.15 + 500 × 0.075 + 260 × 0.60 + 40 × 0.60 = 442.5 µ$
    row("acme", "gpt-4o-mini", "gpt-4o-mini@2024-07-18", cost="0.000442500000", input=1500, cached_input=500, output=260, reasoning=40),
    row("acme", "mock-small", "mock-small@1970-01-01", cost="0.000180000000", input=1000, output=200),
    # 1,000,000 × 2.50 + 333,333 × 10.00 = 5.83333 $
    row("beta", "gpt-4o", "gpt-4o@2024-08-06", requests=7, cost="5.833330000000", input=1_000_000, output=333_333),
    # 2,001 × 2.50 = 0.0050025 $: rounds to 0.01 alone
    row("beta", "gpt-4o", "gpt-4o@2099-01-01", cost="0.005002500000", input=2001),
    row("beta", "mock-small", "unpriced", requests=0, cost="0"),  # refused only: left out
]


def invoice(rows=ROWS, final: bool = True) -> billing.Invoice:
    return billing.build_invoice(
        rows, billing.rate_table(CONFIG), month="2025-03", currency="USD",
        period_start="2025-03-01T00:00:00+00:00", period_end="2025-04-01T00:00:00+00:00", final=final,
    )


def test_lines_are_priced_exactly_and_totals_round_once() -> None:
    inv = invoice()
    acme, beta = inv.customers
    assert [(l.model, l.amount) for l in acme.lines] == [("gpt-4o-mini", Decimal("0.000442500000")), ("mock-small", Decimal("0.000180000000"))]
    assert acme.lines[0].amounts[Component.CACHED_INPUT] == Decimal("0.0000375")
    # An unknown price version has no unit prices (reconciliation names it).
    assert beta.lines[1].unit_prices is None
    assert [l.price_version for l in beta.lines] == ["gpt-4o@2024-08-06", "gpt-4o@2099-01-01"]
    assert billing.round_money(Decimal("0.005"), "USD") == Decimal("0.01")  # half up
    assert billing.round_money(Decimal("1234.5"), "JPY") == Decimal("1235")
    assert billing.round_money(Decimal("0.0005"), "KWD") == Decimal("0.001")


def test_customer_total_is_the_exact_sum_rounded_once() -> None:
    rates = billing.rate_table(CONFIG)
    # Three lines of 0.004 $ each: rounded lines sum to 0.00, the total is 0.01.
    rows = [row("c", m, v, cost="0.004000000000", input=1600) for m, v in
            (("gpt-4o", "gpt-4o@2024-08-06"), ("gpt-4o-2024-08-06", "gpt-4o@2024-08-06"), ("x", "gpt-4o@2024-08-06"))]
    inv = billing.build_invoice(rows, rates, month="2025-03", currency="USD", period_start="s", period_end="e", final=True)
    document = billing.invoice_document(inv)
    assert [line["amount_rounded"] for line in document["customers"][0]["lines"]] == ["0.00", "0.00", "0.00"]
    assert (document["customers"][0]["amount"], document["customers"][0]["total"]) == ("0.012000000000", "0.01")


def test_csv_and_json_are_fixed_and_byte_identical() -> None:
    rows = ROWS[:3]
    text = billing.render_csv(invoice(rows))
    assert text == billing.render_csv(invoice(list(reversed(rows))))  # input order does not matter
    lines = text.splitlines()
    assert lines[0].split(",")[:6] == ["record", "customer", "model", "price_version", "currency", "requests"]
    assert lines[1] == (
        "line,acme,gpt-4o-mini,gpt-4o-mini@2024-07-18,USD,1,2000,500,0,300,40,"
        "1500,0.15,500,0.075,0,0.15,260,0.60,40,0.60,0.000442500000,0.00"
    )
    assert lines[3] == "customer_total,acme,,,USD,2,3000,500,0,500,40,2500,,500,,0,,460,,40,,0.000622500000,0.00"
    assert lines[5] == "customer_total,beta,,,USD,7,1000000,0,0,333333,0,1000000,,0,,0,,333333,,0,,5.833330000000,5.83"
    document = json.loads(billing.render_json(invoice(rows)))
    assert billing.render_json(invoice(rows)) == billing.render_json(invoice(list(reversed(rows))))
    assert (document["amount"], document["total"], document["final"]) == ("5.833952500000", "5.83", True)
    assert document["rounding"] == billing.ROUNDING_RULE


def test_reconcile_names_every_difference() -> None:
    inv = invoice(ROWS[:3])
    ledger = {
        "acme": {"requests": 2, "input_tokens": 3000, "output_tokens": 500, "cached_tokens": 500, "reasoning_tokens": 40, "events": 3, "cost_usd": "0.0006225"},
        "beta": {"requests": 7, "input_tokens": 1_000_000, "output_tokens": 333_333, "cached_tokens": 0, "reasoning_tokens": 0, "events": 7, "cost_usd": "5.83333"},
    }
    assert reconcile.reconcile(inv, ledger, ledger) == []
    redis = {**ledger, "acme": {**ledger["acme"], "input_tokens": "3001"}, "ghost": {"requests": "1", "events": "1"}}
    problems = reconcile.reconcile(inv, ledger, redis)
    assert problems == [
        "acme: input_tokens is 3000 in the ledger but 3001 in redis",
        "ghost: requests is 0 in the ledger but 1 in redis",
        "ghost: events is 0 in the ledger but 1 in redis",
    ]
    missing = reconcile.reconcile(inv, ledger, {"acme": ledger["acme"]})
    assert missing == ["beta: has no totals in redis, but the ledger has requests 7, input_tokens 1000000, "
                       "output_tokens 333333, events 7, cost_usd 5.833330000000"]
    # A price that no longer matches what the pipeline recorded, and an unknown version.
    wrong = [dict(ROWS[1], cost_usd="0.000180000001"), ROWS[3]]
    problems = reconcile.reconcile(invoice(wrong), {}, None)
    assert "acme / mock-small / mock-small@1970-01-01: priced from the table 0.000180000000 but the ledger recorded 0.000180000001" in problems
    assert "beta / gpt-4o / gpt-4o@2099-01-01: price version 'gpt-4o@2099-01-01' is not in the config's price table" in problems


def test_a_month_is_final_after_the_grace() -> None:
    end = datetime(2025, 4, 1, tzinfo=UTC)
    assert not reconcile.finality(CONFIG, "2025-03", end - timedelta(days=1)).final
    open_month = reconcile.finality(CONFIG, "2025-03", end + timedelta(hours=47))
    assert not open_month.final and "late-event grace" in open_month.describe()
    assert "2025-04-03T00:00:00+00:00" in open_month.describe()
    assert reconcile.finality(CONFIG, "2025-03", end + timedelta(hours=48)).final
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["pipeline"] = {"late_grace_s": 72 * 3600}  # a longer late-event grace wins
    assert not reconcile.finality(parse_config(document), "2025-03", end + timedelta(hours=48)).final
    with pytest.raises(ValueError, match="YYYY-MM"):
        reconcile.finality(CONFIG, "March", end)


WINDOW_ROWS = [
    {"customer": "acme", "model": "gpt-4o-mini", "window_s": 1741564800, "requests": "3",
     **{billing.BILLED_COLUMNS[c]: str(v) for c, v in zip(Component, (1500, 500, 0, 260, 40))}},
    {"customer": "acme", "model": "meta/llama 3", "window_s": 1741651200, "requests": "1",
     **{billing.BILLED_COLUMNS[c]: str(v) for c, v in zip(Component, (10, 0, 0, 5, 0))}},
]
METERS = {"requests": "qm_requests", "input": "qm_input_{model}", "output": "qm_output"}


def test_stripe_events_are_whole_deterministic_and_complete() -> None:
    events = stripe_meter.meter_events(WINDOW_ROWS, METERS, {"acme": "cus_123"}, stripe_meter.Window.DAY)
    again = stripe_meter.meter_events(list(reversed(WINDOW_ROWS)), METERS, {"acme": "cus_123"}, stripe_meter.Window.DAY)
    assert stripe_meter.render_jsonl(events) == stripe_meter.render_jsonl(again)
    assert [(e.event_name, e.value) for e in events] == [
        ("qm_input_gpt-4o-mini", 1500), ("qm_output", 260), ("qm_requests", 3),
        ("qm_input_meta_llama_3", 10), ("qm_output", 5), ("qm_requests", 1),
    ]
    body = json.loads(events[0].to_json())
    assert body == {
        "event_name": "qm_input_gpt-4o-mini",
        "identifier": events[0].identifier,
        "payload": {"model": "gpt-4o-mini", "stripe_customer_id": "cus_123", "value": "1500"},
        "timestamp": 1741564800,
    }
    identifiers = [e.identifier for e in events]
    assert len(set(identifiers)) == len(identifiers) and all(len(i) <= stripe_meter.MAX_IDENTIFIER for i in identifiers)
    hourly = stripe_meter.meter_events(WINDOW_ROWS, METERS, {"acme": "cus_123"}, stripe_meter.Window.HOUR)
    assert not set(identifiers) & {e.identifier for e in hourly}
    assert stripe_meter.totals(events)[("acme", "input")] == 1510


def test_stripe_refuses_unmapped_customers_and_old_windows() -> None:
    with pytest.raises(stripe_meter.MissingStripeCustomer, match="no Stripe customer for acme"):
        stripe_meter.meter_events(WINDOW_ROWS, METERS, {}, stripe_meter.Window.DAY)
    events = stripe_meter.meter_events(WINDOW_ROWS, METERS, {"acme": "cus_123"}, stripe_meter.Window.DAY)
    first = datetime.fromtimestamp(1741564800, UTC)
    bad, oldest, newest = stripe_meter.out_of_range(events, first + timedelta(days=20))
    assert bad == [] and newest == first + timedelta(days=20, minutes=5)
    bad, oldest, _ = stripe_meter.out_of_range(events, first + timedelta(days=35))
    assert {e.timestamp for e in bad} == {1741564800} and oldest == first + timedelta(hours=1)
    bad, _, _ = stripe_meter.out_of_range(events, first - timedelta(hours=1))
    assert len(bad) == len(events)  # all in the future
