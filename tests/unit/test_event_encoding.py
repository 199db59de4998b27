"""The shim's direct event encoding: the same bytes as the model's, for every value it takes."""

import random
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from pydantic import ValidationError
from pydantic_core import PydanticSerializationError

from quotameter.events import (
    Decision,
    RequestData,
    UsageEvent,
    UsageSource,
    decode_event,
    encode_event,
    encode_request_event,
    new_event_id,
)

BASE = {"api_key_id": "a1b2c3d4e5f6", "tier": "pro", "route": "/v1/chat/completions", "status": 200,
        "decision": Decision.ADMITTED}


def _both(id_: str = "0190a0b0-0000-7000-8000-000000000000", source: str = "shim-1", subject: str = "acme",
          time: datetime = datetime(2026, 11, 28, 12, 0, 1, 500000, tzinfo=UTC), **data: object) -> tuple[bytes, bytes]:
    fields = {**BASE, **data}
    modelled = {**fields, "tags": dict(fields["tags"]) or None} if "tags" in fields else fields
    model = UsageEvent(id=id_, source=source, subject=subject, time=time, data=RequestData(**modelled))
    fast = encode_request_event(id_, source, subject, time, **fields)
    assert fast.id == model.id and fast.customer_id == model.customer_id and fast.time_ms == model.time_ms
    return fast.value, encode_event(model)


def test_typical_events_encode_identically() -> None:
    fast, model = _both(model_requested="gpt-4o-mini", model_served="gpt-4o-mini-2024-07-18", upstream="http://u/v1",
                        input_tokens=12, output_tokens=30, usage_source=UsageSource.UPSTREAM, streamed=True,
                        latency_ms=41.5, ttft_ms=9.25, request_bytes=120, response_bytes=800)
    assert fast == model
    assert decode_event(fast).data.input_tokens == 12
    for extra in ({"reason": "fallback", "queued_ms": 12.345}, {"decision": Decision.REFUSED, "status": 429},
                  {"time": datetime(2026, 1, 1, tzinfo=UTC)}, {"reasoning_tokens": 3, "cached_tokens": 4}):
        fast, model = _both(**extra)
        assert fast == model


def test_random_values_encode_identically() -> None:
    rng = random.Random(7)
    alphabet = "aZ09 -_/.:\"\\\n\t\x00\x1f\x7fé€😀\u2028"
    for _ in range(3000):
        def text() -> str:
            return "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))

        def printable() -> str:
            return "".join(rng.choice("aZ09 -_/.:\"\\é€😀',;=") for _ in range(rng.randint(1, 12))).strip() or "u"

        def tag() -> str:
            return rng.choice("aZ09") + "".join(rng.choice("aZ09_.-") for _ in range(rng.randint(0, 3)))

        def number() -> float:
            return round(rng.choice([rng.random(), rng.random() * 1000, rng.random() * 1e7, 0.0]), rng.choice([3, 6]))

        fast, model = _both(
            id_=new_event_id(), source=text(), subject=text(),
            time=datetime(2026, 1, 1, tzinfo=UTC) + timedelta(microseconds=rng.randint(0, 10**13) * rng.choice([0, 1])),
            api_key_id=text(), tier=text(), route=text(), status=rng.choice([200, 429, 500, 502]),
            decision=rng.choice(list(Decision)), reason=rng.choice([None, text()]),
            model_requested=rng.choice([None, text()]), model_served=rng.choice([None, text()]),
            upstream=rng.choice([None, text()]), input_tokens=rng.randint(0, 10**9), output_tokens=rng.randint(0, 10**6),
            cached_tokens=rng.randint(0, 9), reasoning_tokens=rng.randint(0, 9), usage_source=rng.choice(list(UsageSource)),
            streamed=rng.choice([True, False]), latency_ms=number(), ttft_ms=rng.choice([None, number()]),
            request_bytes=rng.randint(0, 10**6), response_bytes=rng.randint(0, 10**6),
            queued_ms=rng.choice([None, number()]),
            **rng.choice([{}, {"end_user": printable(), "project": rng.choice([None, printable()]),
                               "tags": tuple(sorted({tag(): tag() for _ in range(rng.randint(0, 3))}.items()))}]),
        )
        assert fast == model


def test_attribution_encodes_identically_and_bad_values_are_refused_as_the_model_does() -> None:
    fast, model = _both(end_user="o'brien \"x\", é 😀", project="p-1", tags=(("feature", "a:b/c"), ("team", "search")))
    assert fast == model and b'"tags":{"feature":"a:b/c","team":"search"}' in fast
    assert decode_event(fast).data.tags == {"feature": "a:b/c", "team": "search"}
    for bad in ({"end_user": "x" * 257}, {"end_user": "a\nb"}, {"project": ""}, {"tags": (("te am", "x"),)},
                {"tags": tuple((f"k{n}", "v") for n in range(17))}):
        with pytest.raises(ValidationError):
            encode_request_event("0190a0b0-0000-7000-8000-000000000000", "s", "c", datetime(2026, 1, 1, tzinfo=UTC),
                                 **{**BASE, **bad})


@pytest.mark.parametrize("odd", [
    {"latency_ms": 1.1e-05}, {"latency_ms": 1e16}, {"latency_ms": 3}, {"ttft_ms": 2e-7},
    {"upstream_cost_usd": Decimal("0.000019800000")}, {"status": True}, {"decision": "admitted"},
    {"time": datetime(2026, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))},
])
def test_values_outside_the_direct_encoding_go_through_the_model(odd: dict) -> None:
    fast, model = _both(**odd)
    assert fast == model
    decoded = decode_event(fast)
    name, value = next(iter(odd.items()))
    assert (decoded.time if name == "time" else getattr(decoded.data, name)) == value


def test_a_value_the_model_cannot_serialize_is_refused_by_both_paths() -> None:
    odd = {**BASE, "api_key_id": "\ud800"}  # a lone surrogate: not encodable as UTF-8
    at = datetime(2026, 11, 28, tzinfo=UTC)
    model = UsageEvent(id="id-1", source="shim", subject="acme", time=at, data=RequestData(**odd))
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        encode_event(model)
    with pytest.raises(PydanticSerializationError, match="surrogates not allowed"):
        encode_request_event("id-1", "shim", "acme", at, **odd)


@pytest.mark.parametrize("bad", [{"input_tokens": -1}, {"latency_ms": -1.0}, {"status": "x"}])
def test_invalid_values_are_refused_as_the_model_refuses_them(bad: dict) -> None:
    with pytest.raises(ValidationError):
        encode_request_event("id-1", "shim", "acme", datetime.now(UTC), **{**BASE, **bad})
    with pytest.raises(ValidationError):
        encode_request_event("", "shim", "acme", datetime.now(UTC), **BASE)
