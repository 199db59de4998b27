"""A request's worst case before it runs (tokens and micro-USD, what admission
reserves), and the price of what it used once it ran.

Prices are looked up once per model and day and kept: admission reads the
output rate as exact decimal text, the settle prices usage in micro-USD.

A prompt of ``PROMPT_BOUND_BYTES`` or more is not counted before admission:
a bound from its body's size is reserved instead (``prompt_bound``). Every
counted text is in the body, a token covers at least one byte of it, and a
message's framing tokens are fewer than its JSON's bytes, so the size bounds
the count (about 4x over for English); a nested object's text is counted as
ASCII JSON, where a non-ASCII byte becomes up to three (escaped, a character
is six or twelve), so those count three times. Counting costs 20-50 µs per
KB on the event loop (bpe-openai holds the GIL: 3.4 ms for 68 KB of short
words here), and the settle puts the upstream's reported count in its place
anyway. When the
bound does not fit (a token limit's refusal, a fallback, an output cut), the
enforcer counts and asks again; the rate-limit headers of an answer admitted
on the bound show it as what the request holds until it ends.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import UTC, date, datetime
from decimal import Decimal

from gateway_shim.admission import Estimate
from gateway_shim.routes import ProxiedRequest
from gateway_shim.usage import Usage
from quotameter.config import Config
from quotameter.policy import Policy, micro_usd
from quotameter.pricing import PriceTable


PROMPT_BOUND_BYTES = 8 * 1024  # below it, counting costs less than a second admission would
_ASCII = bytes(range(128))


def prompt_bound(body: bytes) -> int:
    """At least the prompt tokens ``count_prompt`` finds in the JSON ``body`` (see above)."""
    return len(body) if body.isascii() else len(body) + 2 * len(body.translate(None, _ASCII))


class Estimator:
    def __init__(self, config: Config) -> None:
        self.default_price = config.default_price
        self.prices = PriceTable(config.prices, config.default_price)
        self._rates: dict[tuple[str | None, date], tuple[Decimal, Decimal, str]] = {}

    def _model_rates(self, model: str | None, today: date) -> tuple[Decimal, Decimal, str]:
        """(input, output) micro-USD per token (= USD per 1M tokens) for the model today,
        and the output rate as exact decimal text (what the admission script reads)."""
        rates = self._rates.get((model, today))
        if rates is None:
            price = self.prices.lookup(model, today) or self.default_price
            in_rate, out_rate = (price.input_per_million_usd, price.output_per_million_usd) if price else (Decimal(0), Decimal(0))
            rates = (in_rate, out_rate, format(out_rate, "f"))
            if len(self._rates) > 50_000:
                self._rates.clear()
            self._rates[(model, today)] = rates
        return rates

    def estimate(self, policy: Policy, proxied: ProxiedRequest, streams: bool) -> tuple[Estimate, bool]:
        """The request's worst case, and whether it named its own max_tokens."""
        body = proxied.body
        if body is None:
            return Estimate(0, 0, 0, "0"), False
        dialect = proxied.dialect
        explicit = dialect.max_output(body)
        choices = dialect.choices(body)
        output = (explicit or policy.default_max_tokens) * choices if streams or "messages" in body else 0
        counts_tokens = policy.reserves or policy.user_day_tokens is not None or any(
            rule.unit.value == "tokens" for rule in (*policy.rates, *policy.user_rates))
        input_tokens, bounded = 0, False
        if counts_tokens:  # a huge body's prompt was counted as it was read, off the event loop
            input_tokens = proxied.prompt_tokens
            if input_tokens is None:
                # Not with a batch queue: a request there may wait and ask again, marked running.
                if len(proxied.upstream_body) >= PROMPT_BOUND_BYTES and policy.queue is None:
                    input_tokens, bounded = prompt_bound(proxied.upstream_body), True
                else:
                    input_tokens = dialect.count_prompt(body, proxied.model)
        today = datetime.now(UTC).date()
        in_rate, _, out_rate_text = self._model_rates(proxied.model, today)
        fallback = policy.fallback
        fb_budget, fb_in, fb_rate = -1, 0, "0"
        if fallback is not None and policy.period_budget_micro_usd is not None:
            fb_in_rate, _, fb_rate = self._model_rates(fallback.model, today)
            fb_budget = policy.period_budget_micro_usd + micro_usd(fallback.extra_budget_usd)
            fb_in = math.ceil(input_tokens * fb_in_rate)
        cuttable = (policy.tier.cut_streams and (explicit is None or dialect.cap_required) and choices == 1
                    and output > 0)
        return (
            Estimate(
                input_tokens=input_tokens,
                output_tokens=output,
                input_micro_usd=math.ceil(input_tokens * in_rate),
                output_rate=out_rate_text,
                cuttable=cuttable,
                fallback_budget_micro_usd=fb_budget,
                fallback_input_micro_usd=fb_in,
                fallback_output_rate=fb_rate,
                bounded=bounded,
            ),
            explicit is not None,
        )

    def counted(self, estimate: Estimate, policy: Policy, proxied: ProxiedRequest) -> Estimate:
        """``estimate`` with the prompt's count where its bound was."""
        assert proxied.body is not None
        count = proxied.dialect.count_prompt(proxied.body, proxied.model)
        today = datetime.now(UTC).date()
        fallback_input = estimate.fallback_input_micro_usd
        if policy.fallback is not None and estimate.fallback_budget_micro_usd >= 0:
            fallback_input = math.ceil(count * self._model_rates(policy.fallback.model, today)[0])
        return dataclasses.replace(
            estimate, input_tokens=count, input_micro_usd=math.ceil(count * self._model_rates(proxied.model, today)[0]),
            fallback_input_micro_usd=fallback_input, bounded=False,
        )

    def cost_micro_usd(self, model: str | None, day: date, usage: Usage) -> int:
        """What ``usage`` of ``model`` cost on ``day``, in integer micro-USD."""
        cost = self.prices.cost(
            model, day, input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
            cached_tokens=usage.cached_tokens, cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
        )
        return micro_usd(cost.usd)
