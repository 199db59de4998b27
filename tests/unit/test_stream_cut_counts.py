"""A stream's cut at its reservation, counted lazily: the tokens of a text are
counted only once its bytes (a token is at least one byte) might not fit, and
the cut falls on the same event as counting every text one by one would."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway_shim import sse
from gateway_shim.sse import StreamTally
from quotameter.tokens import count_text

MODEL = "mock-small"


def _event(text: str) -> bytes:
    chunk = {"id": "c-1", "object": "chat.completion.chunk", "model": MODEL,
             "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _eager(texts: list[str], cut_at: int) -> tuple[int, int]:
    """Events passed on and tokens counted when each text is counted as it comes."""
    total = 0
    for passed, text in enumerate(texts):
        tokens = count_text(text, MODEL)
        if total + tokens > cut_at:
            return passed, total
        total += tokens
    return len(texts), total


_TEXTS = st.lists(st.sampled_from([" word", "Hello", " ünïcødé", " 東京", "12345678", " a b c", "!", " tokenization"]),
                  min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(texts=_TEXTS, cut_at=st.integers(min_value=1, max_value=80), read=st.integers(min_value=1, max_value=400))
def test_the_cut_falls_where_counting_each_text_puts_it(texts: list[str], cut_at: int, read: int) -> None:
    stream = b"".join(_event(text) for text in texts) + b"data: [DONE]\n\n"
    tally = StreamTally(cut_at=cut_at, model=MODEL)
    forwarded = b"".join(tally.feed(stream[i:i + read]) for i in range(0, len(stream), read))
    passed, counted = _eager(texts, cut_at)
    assert forwarded.startswith(b"".join(_event(text) for text in texts[:passed]))
    assert tally.cut == (passed < len(texts))
    assert tally.text == "".join(texts[:passed])
    assert tally.counted_output == (counted if tally.cut or tally._counting else 0)


def test_texts_whose_bytes_fit_are_not_counted(monkeypatch) -> None:  # noqa: ANN001
    # 10 one-token words (50 bytes of text) in 1.5 KB of chunks, against a 60-token reservation:
    # the chunks' bytes pass it, so every chunk is read, but no text needs a count.
    calls = []
    monkeypatch.setattr(sse, "count_text", lambda text, model=None: calls.append(text) or count_text(text, model))
    tally = StreamTally(cut_at=60, model=MODEL)
    tally.feed(b"".join(_event(" word") for _ in range(10)) + b"data: [DONE]\n\n")
    assert tally._counting and not tally.cut and calls == []
    assert tally.counted_output == 10 and len(calls) == 10  # counted when asked, each text on its own
