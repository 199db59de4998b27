from datetime import date
from decimal import Decimal

from quotameter.config import ModelPrice
from quotameter.pricing import UNPRICED, PriceTable

PRICES = [
    ModelPrice(
        model="gpt-4o-mini",
        aliases=["gpt-4o-mini-2024-07-18"],
        effective_from=date(2024, 7, 18),
        input_per_million_usd=Decimal("0.15"),
        output_per_million_usd=Decimal("0.60"),
        cached_input_per_million_usd=Decimal("0.075"),
    ),
    ModelPrice(
        model="gpt-4o-mini",
        effective_from=date(2026, 1, 1),
        input_per_million_usd=Decimal("0.10"),
        output_per_million_usd=Decimal("0.40"),
    ),
]


def test_cost_is_exact_to_the_pico_dollar():
    cost = PriceTable(PRICES).cost("gpt-4o-mini", date(2025, 6, 1), input_tokens=7, output_tokens=3)
    # 7 × 0.15 + 3 × 0.60 = 2.85 micro-USD
    assert cost.usd == Decimal("0.000002850000")
    assert cost.price_version == "gpt-4o-mini@2024-07-18"


def test_cached_input_uses_its_own_rate():
    cost = PriceTable(PRICES).cost(
        "gpt-4o-mini-2024-07-18", date(2025, 6, 1), input_tokens=1000, output_tokens=0, cached_tokens=400
    )
    assert cost.usd == Decimal("0.000120000000")  # 600 × 0.15 + 400 × 0.075 micro-USD


def test_effective_dates_pick_the_price_in_force():
    table = PriceTable(PRICES)
    assert table.cost("gpt-4o-mini", date(2025, 12, 31), input_tokens=1_000_000, output_tokens=0).usd == Decimal("0.15")
    assert table.cost("gpt-4o-mini", date(2026, 1, 1), input_tokens=1_000_000, output_tokens=0).usd == Decimal("0.10")
    assert table.lookup("gpt-4o-mini", date(2024, 1, 1)) is None


def test_unknown_model_is_flagged_not_dropped():
    cost = PriceTable(PRICES).cost("mystery", date(2026, 1, 1), input_tokens=5, output_tokens=5)
    assert cost.usd == 0 and cost.price_version == UNPRICED and not cost.priced


def test_a_million_small_costs_sum_exactly():
    table = PriceTable(PRICES)
    one = table.cost("gpt-4o-mini", date(2025, 1, 1), input_tokens=1, output_tokens=1).usd
    assert sum([one] * 1_000_000, Decimal(0)) == Decimal("0.75")
