"""A checked admission's report without usage, counted from the delivered text
(gateway_shim/counted_reports.py), and the text read beside the event (cloudevents.py)."""

import json

from gateway_shim.cloudevents import BATCH, STRUCTURED, parse_reports
from gateway_shim.counted_reports import Delivered, counted_report, delivered_from, output_tokens
from quotameter.embedded.mock_llm import completion_pieces
from quotameter.events import decode_event
from quotameter.tokens import count_text
from tests.unit.test_cloudevents import body, event

TEXT = "Dites « bonjour » en 日本語 ✓ " + "".join(completion_pieces(20))
UNUSED = {"input_tokens": 0, "output_tokens": 0, "usage_source": "none", "model_served": "gpt-4o-mini"}


def reported(id: str = "ev-1", text: str | None = TEXT, total: object = None, **data: object) -> dict:
    item = event(id, **{**UNUSED, **data})
    if text is not None:
        item["deliveredtext"] = text
    if total is not None:
        item["deliveredbytes"] = total
    return item


def test_a_report_without_usage_is_counted_and_never_carries_the_text() -> None:
    (events, delivered) = parse_reports(BATCH, body([reported(), reported("ev-2", text=None)]), 10)
    assert delivered == [Delivered(TEXT, len(TEXT.encode())), None]
    counted = counted_report(events[0], 17, None, delivered[0])
    data = decode_event(counted.value).data
    assert (data.input_tokens, data.output_tokens, data.usage_source) == (17, count_text(TEXT, "gpt-4o-mini"), "counted")
    assert counted[:3] == events[0][:3] and "bonjour" not in counted.value.decode()
    # Nothing delivered (the client left before the first token): the prompt alone.
    data = decode_event(counted_report(events[1], 17, None, None).value).data
    assert (data.input_tokens, data.output_tokens, data.usage_source) == (17, 0, "counted")


def test_reports_with_usage_or_without_an_answer_are_left_as_they_are() -> None:
    (events, delivered) = parse_reports(BATCH, body([
        reported("upstream", input_tokens=5, output_tokens=0, usage_source="upstream"),
        reported("tokens-given", input_tokens=0, output_tokens=3),  # usage_source none, tokens believed
        reported("model-failed", status=502),
        reported("refused", decision="refused", status=429),
    ]), 10)
    for event_, text in zip(events, delivered, strict=True):
        assert counted_report(event_, 17, "mock-small", text) is event_, event_.id


def test_only_the_start_kept_is_scaled_to_all_that_was_delivered() -> None:
    start = "".join(completion_pieces(10))  # 10 tokens, one word each
    total = len(start.encode()) * 3 + 1
    delivered = delivered_from(reported(text=start, total=str(total)))
    assert delivered == Delivered(start, total)
    assert output_tokens(delivered, "mock-small") == 31  # ceil(10 * (3 n + 1) / n)
    # A count that is no count (or smaller than the text) is ignored: the text alone.
    for bad in ("12.5", "-3", "", "1e9", "٣٣", 2):
        assert output_tokens(delivered_from(reported(text=start, total=bad)), "mock-small") == 10, bad


def test_a_half_escape_is_counted_not_refused() -> None:
    raw = body(reported(text="ok")).replace(b'"ok"', b'"ok \\ud83d"')
    ([event_], [delivered]) = parse_reports(STRUCTURED, raw, 10)
    assert delivered is not None and delivered.text == "ok ?"
    assert decode_event(counted_report(event_, 1, None, delivered).value).data.output_tokens == count_text("ok ?")
    assert json.loads(event_.value)["data"]["usage_source"] == "none"
