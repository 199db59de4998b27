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


def test_every_token_kind_has_its_rate():
    price = ModelPrice(
        model="reasoner",
        input_per_million_usd=Decimal("1"),
        output_per_million_usd=Decimal("4"),
        cached_input_per_million_usd=Decimal("0.5"),
        cache_write_per_million_usd=Decimal("1.25"),
        reasoning_per_million_usd=Decimal("8"),
    )
    cost = PriceTable([price]).cost(
        "reasoner", date(2026, 1, 1),
        input_tokens=1000, cached_tokens=200, cache_write_tokens=100, output_tokens=500, reasoning_tokens=300,
    )
    # 700×1 + 200×0.5 + 100×1.25 + 200×4 + 300×8 micro-USD
    assert cost.usd == Decimal("0.004125")


def test_sub_kinds_never_exceed_their_parent():
    cost = PriceTable(PRICES).cost("gpt-4o-mini", date(2025, 1, 1), input_tokens=10, output_tokens=0, cached_tokens=50)
    assert cost.usd == Decimal("0.00000075")  # all 10 priced as cached, none negative


def test_default_price_covers_unknown_models_and_says_so():
    from quotameter.config import Rates
    from quotameter.pricing import DEFAULT_PRICE_VERSION

    table = PriceTable(PRICES, default=Rates(input_per_million_usd=Decimal("1"), output_per_million_usd=Decimal("2")))
    cost = table.cost("mystery", date(2026, 1, 1), input_tokens=1_000_000, output_tokens=1_000_000)
    assert cost.usd == Decimal("3") and cost.price_version == DEFAULT_PRICE_VERSION


def test_whole_pico_rates_and_finer_rates_price_alike():
    # Rates of up to six decimals are priced in integers, finer ones in
    # Decimal: both give the quantized Decimal of the exact sum.
    import random

    rng = random.Random(7)
    for decimals in (0, 2, 6, 9, 12):
        rates = [Decimal(rng.randrange(0, 10**8)).scaleb(-decimals) for _ in range(5)]
        price = ModelPrice(
            model="m", input_per_million_usd=rates[0], output_per_million_usd=rates[1],
            cached_input_per_million_usd=rates[2], cache_write_per_million_usd=rates[3],
            reasoning_per_million_usd=rates[4],
        )
        table = PriceTable([price])
        for _ in range(200):
            tokens = [rng.randrange(0, 10**rng.randrange(1, 9)) for _ in range(5)]
            cost = table.cost("m", date(2025, 1, 1), input_tokens=tokens[0], output_tokens=tokens[1],
                              cached_tokens=tokens[2], cache_write_tokens=tokens[3], reasoning_tokens=tokens[4])
            cached = min(tokens[2], tokens[0])
            write = min(tokens[3], tokens[0] - cached)
            reasoning = min(tokens[4], tokens[1])
            micro = ((tokens[0] - cached - write) * rates[0] + cached * rates[2] + write * rates[3]
                     + (tokens[1] - reasoning) * rates[1] + reasoning * rates[4])
            expected = (micro / Decimal(1_000_000)).quantize(Decimal("1e-12"))
            assert str(cost.usd) == str(expected), (decimals, rates, tokens)
