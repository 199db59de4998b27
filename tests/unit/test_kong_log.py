"""Kong http-log entries mapped to usage events (gateway_shim/kong_log.py).

The fixtures (tests/fixtures/kong/) were written from Kong Gateway 3.8+
documentation (HTTP Log plugin, kong.log.serialize, AI Gateway audit log
reference), not captured from a running Kong."""

import copy
import json
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from gateway_shim.errors import InvalidEvents, MalformedRequest, PayloadTooLarge, UnsupportedMediaType
from gateway_shim.kong_log import JSON, CustomerFrom, KongSettings, parse_kong_log
from quotameter.events import decode_event

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kong"
BY_USERNAME = KongSettings(CustomerFrom.CONSUMER_USERNAME, tier="kong-pro")
BY_HEADER = KongSettings(CustomerFrom.HEADER, tier="kong-pro")


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def raw(value: Any) -> bytes:
    return json.dumps(value).encode()


def test_one_entry_maps_every_field() -> None:
    text = (FIXTURES / "chat-consumer.json").read_bytes()  # as Kong sent it: the cost's digits are exact
    batch = parse_kong_log(JSON, text, 10, BY_USERNAME)
    assert batch.skipped == 0
    [encoded] = batch.events
    event = decode_event(encoded.value)
    # Kong's request id, not a random one: a resend of the entry is the same event.
    assert encoded.id == event.id == str(uuid.uuid5(uuid.uuid5(uuid.NAMESPACE_URL, "urn:quotameter:kong-request-id"),
                                                    "8c3e1fd0b1a24d6f9e2a7b5c4d3e2f10"))
    assert encoded.customer_id == event.subject == "acme"
    assert encoded.time_ms == 1764610000123 and event.time.isoformat() == "2025-12-01T17:26:40.123000+00:00"
    assert event.source == "kong" and event.type == "quotameter.request.v1"
    data = event.data
    assert (data.input_tokens, data.output_tokens) == (28, 117)
    assert (data.model_requested, data.model_served) == ("gpt-4o-mini", "gpt-4o-mini-2024-07-18")
    assert data.upstream == "openai" and data.usage_source == "upstream" and data.decision == "admitted"
    assert (data.status, data.route, data.latency_ms) == (200, "/openai/v1/chat/completions", 1190.0)
    assert (data.request_bytes, data.response_bytes, data.streamed) == (412, 1204, False)
    assert data.api_key_id == "3f1b7a52-7c1e-4e7d-9a0e-2b8c6d4e5f01"  # the credential's id, never its secret
    assert data.tier == "kong-pro"
    assert data.upstream_cost_usd == Decimal("0.00007440")
    assert b"OpenAI/Python" not in encoded.value  # headers are read, never copied


def test_custom_id_names_the_customer_when_configured() -> None:
    [encoded] = parse_kong_log(JSON, raw(fixture("chat-consumer.json")), 10,
                               KongSettings(CustomerFrom.CONSUMER_CUSTOM_ID, tier="")).events
    assert encoded.customer_id == "cust-0042"


def test_a_batch_keeps_its_order_and_skips_entries_without_ai_usage() -> None:
    batch = parse_kong_log(JSON, raw(fixture("batch.json")), 10, BY_USERNAME)
    assert batch.skipped == 1  # the /status route: no ai section
    streamed, embedding = (decode_event(e.value) for e in batch.events)
    assert (streamed.subject, streamed.data.input_tokens, streamed.data.output_tokens) == ("globex", 310, 902)
    assert streamed.data.streamed is True and streamed.data.latency_ms == 2416.0
    assert (embedding.subject, embedding.data.input_tokens, embedding.data.output_tokens) == ("acme", 64, 0)
    assert embedding.data.route == "/openai/v1/embeddings"
    assert embedding.data.upstream_cost_usd is None  # Kong's 0: no price set on the route
    assert len({e.id for e in batch.events}) == 2


def test_the_audit_references_spelling_of_the_counts_is_read() -> None:
    [encoded] = parse_kong_log(JSON, raw(fixture("audit-doc-spelling.json")), 10, BY_USERNAME).events
    data = decode_event(encoded.value).data
    assert (data.input_tokens, data.output_tokens, data.upstream) == (52, 19, "azure")


def test_header_mode_takes_the_checks_customer_event_id_and_tier() -> None:
    [encoded] = parse_kong_log(JSON, raw(fixture("checked.json")), 10, BY_HEADER).events
    event = decode_event(encoded.value)
    assert (encoded.id, encoded.customer_id) == ("0193a1b2-c3d4-7e5f-8a6b-7c8d9e0f1a2b", "initech")
    assert event.data.tier == "pro" and (event.data.input_tokens, event.data.output_tokens) == (11, 5)
    assert event.data.api_key_id == ""  # Kong authenticated no consumer: the check did


def test_header_mode_without_a_check_event_id_derives_it_from_kongs_request_id() -> None:
    entry = fixture("checked.json")
    del entry["request"]["headers"]["x-quotameter-event-id"]
    del entry["request"]["id"]  # an older Kong: the x-kong-request-id response header instead
    [encoded] = parse_kong_log(JSON, raw(entry), 10, BY_HEADER).events
    again = copy.deepcopy(entry)
    again["started_at"] += 5000  # Kong's retry of the same request
    assert parse_kong_log(JSON, raw(again), 10, BY_HEADER).events[0].id == encoded.id
    entry["response"]["headers"]["x-kong-request-id"] = "another-request"
    assert parse_kong_log(JSON, raw(entry), 10, BY_HEADER).events[0].id != encoded.id


def test_consumer_modes_ignore_the_quotameter_headers_a_client_could_send() -> None:
    entry = fixture("chat-consumer.json")
    entry["request"]["headers"].update({"x-quotameter-event-id": "chosen", "x-quotameter-customer": "someone-else"})
    [encoded] = parse_kong_log(JSON, raw(entry), 10, BY_USERNAME).events
    assert (encoded.customer_id, encoded.id != "chosen") == ("acme", True)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: e["ai"]["proxy"]["usage"].update(prompt_tokens=-3), "entries[1].ai.proxy.usage.prompt_tokens"),
        (lambda e: e["ai"]["proxy"]["usage"].update(completion_tokens="12"), "entries[1].ai.proxy.usage.completion_tokens"),
        (lambda e: e["ai"]["proxy"]["usage"].update(cost=-1), "entries[1].ai.proxy.usage.cost"),
        (lambda e: e.pop("consumer"), "entries[1].consumer"),
        (lambda e: e["consumer"].update(username=None), "entries[1].consumer.username"),
        (lambda e: e.pop("started_at"), "entries[1].started_at"),
        (lambda e: e["response"].update(status="200"), "entries[1].response.status"),
        (lambda e: e["request"].pop("uri"), "entries[1].request.uri"),
        (lambda e: e["ai"]["proxy"]["meta"].update(response_model=7), "entries[1].ai.proxy.meta.response_model"),
        (lambda e: e["latencies"].update(request=-1), "entries[1].latencies.request"),
        (lambda e: e["ai"].update(proxy=[]), "entries[1].ai.proxy"),
    ],
)
def test_a_bad_entry_is_named_with_its_index_and_nothing_is_taken(change: Any, field: str) -> None:
    entries = [fixture("chat-consumer.json") for _ in range(3)]
    change(entries[1])
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw(entries), 10, BY_USERNAME)
    assert caught.value.param == field
    assert str(caught.value).startswith(f"{field}: ") and str(caught.value).endswith("none of the request was taken.")


def test_without_request_ids_an_entry_is_refused_rather_than_billed_twice() -> None:
    entry = fixture("chat-consumer.json")
    del entry["request"]["id"]
    del entry["response"]["headers"]["x-kong-request-id"]
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw(entry), 10, BY_USERNAME)
    assert caught.value.param == "entries[0].request.id"


def test_a_start_time_written_as_a_float_is_read_to_the_millisecond() -> None:
    text = (FIXTURES / "chat-consumer.json").read_text().replace('"started_at": 1764610000123', '"started_at": 1.764610000123e+12')
    [encoded] = parse_kong_log(JSON, text.encode(), 10, BY_USERNAME).events
    assert encoded.time_ms == 1764610000123


def test_header_mode_refuses_an_event_id_no_check_could_have_issued() -> None:
    entry = fixture("checked.json")
    entry["request"]["headers"]["x-quotameter-event-id"] = "x" * 129
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw(entry), 10, BY_HEADER)
    assert caught.value.param == "entries[0].request.headers.x-quotameter-event-id"


def test_header_mode_needs_the_checks_customer() -> None:
    entry = fixture("checked.json")
    entry["request"]["headers"]["x-quotameter-customer"] = ["initech", "someone-else"]
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw([entry]), 10, BY_HEADER)
    assert caught.value.param == "entries[0].request.headers.x-quotameter-customer"
    del entry["request"]["headers"]["x-quotameter-customer"]
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw([entry]), 10, BY_HEADER)
    assert caught.value.param == "entries[0].request.headers.x-quotameter-customer"


def test_entries_without_usage_counts_are_skipped() -> None:
    entry = fixture("chat-consumer.json")
    entry["ai"]["proxy"]["usage"] = {"time_per_token": 0}  # the provider failed: nothing counted
    other = fixture("chat-consumer.json")
    del other["ai"]
    batch = parse_kong_log(JSON, raw([entry, other]), 10, BY_USERNAME)
    assert (batch.events, batch.skipped) == ([], 2)


def test_the_body_itself_is_checked() -> None:
    with pytest.raises(UnsupportedMediaType):
        parse_kong_log("text/plain", raw(fixture("chat-consumer.json")), 10, BY_USERNAME)
    with pytest.raises(MalformedRequest):
        parse_kong_log(JSON, b'{"request": ', 10, BY_USERNAME)
    with pytest.raises(PayloadTooLarge):
        parse_kong_log(JSON, raw([fixture("chat-consumer.json")] * 3), 2, BY_USERNAME)
    with pytest.raises(InvalidEvents) as caught:
        parse_kong_log(JSON, raw([fixture("chat-consumer.json"), "not an entry"]), 10, BY_USERNAME)
    assert caught.value.param == "entries[1]"
