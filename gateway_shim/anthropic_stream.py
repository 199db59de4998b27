"""A Messages API event stream passing through the shim, tallied on the way
(the counterpart of sse.StreamTally for Anthropic's events).

Whole events are handed on as soon as they are complete, byte for byte,
``event:`` and ``data:`` lines and comments only (``id:`` / ``retry:`` mean
nothing through the shim). Every event is parsed: a Messages stream sends one
event per text delta, and each can change the usage or the open block.
``message_stop`` is held back (``held``) until the request is settled and its
event spooled. Data that is not a JSON object is dropped.

With ``cut_at`` (the output tokens the reservation holds), the delta that
would carry the output past it is not forwarded and ``cut`` is set; the
output is counted exactly only once the stream's bytes could hold more
tokens than ``cut_at`` (a token is at least one byte of text).
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway_shim.anthropic_messages import END_EVENT, StreamState, cut_ending, cut_usage, event_text
from gateway_shim.usage import Usage
from quotameter.events import UsageSource
from quotameter.message_tokens import count_messages_prompt
from quotameter.tokens import count_text

_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
_PASSED = (b"data:", b"event:", b":")


class MessagesTally:
    def __init__(self, cut_at: int | None = None, model: str | None = None) -> None:
        self.cut_at = cut_at
        self.cut = False
        self.state = StreamState()
        self.held = b""
        self.events = 0
        self.dropped = 0
        self.counted_output = 0
        self._count_model = model
        self._texts: list[str] = []
        self._text_bytes = 0
        self._counting = False
        self._pending = b""

    @property
    def done(self) -> bool:
        """``message_stop`` seen: the stream ended as the upstream meant it to."""
        return self.state.ended

    @property
    def model(self) -> str | None:
        return self.state.model

    @property
    def usage(self) -> Usage | None:
        return self.state.usage

    @property
    def text(self) -> str:
        return "".join(self._texts)

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the complete events to forward now."""
        buffer = self._pending + data
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(buffer):
            if self.cut:
                break
            event = buffer[start : end.end()]
            start = end.end()
            forwarded = self._observe(event)
            if forwarded:
                out.append(forwarded)
        self._pending = buffer[start:]
        return b"".join(out)

    def _observe(self, event: bytes) -> bytes | None:
        lines = [line for line in _LINE_END.split(event) if line]
        kept = [line for line in lines if line.startswith(_PASSED)]
        data = [line[5:] for line in kept if line.startswith(b"data:")]
        if not data:
            return event if all(line[:1] == b":" for line in lines) else None  # a keep-alive passes
        if len(kept) != len(lines):
            event = b"\n".join(kept) + b"\n\n"
        self.events += 1
        try:
            parsed: Any = json.loads(b"\n".join(line[1:] if line.startswith(b" ") else line for line in data))
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            self.dropped += 1
            return None
        if self.cut_at is not None and not self._counting and parsed.get("type") == "content_block_delta":
            self._text_bytes += len(event)
            if self._text_bytes > self.cut_at:
                self._counting = True
                self.counted_output = sum(count_text(text, self._count_model) for text in self._texts)
        if self._counting:
            tokens = count_text(event_text(parsed), self._count_model)
            if tokens and self.counted_output + tokens > self.cut_at:  # type: ignore[operator]
                self.cut = True
                return None
            self.counted_output += tokens
        text = self.state.observe(parsed)
        if text:
            self._texts.append(text)
        if parsed.get("type") == END_EVENT:
            self.held += event
            return None
        return event

    def cut_ending(self, message: str) -> bytes:
        """The events ending a stream cut at the budget (anthropic_messages.cut_ending)."""
        return cut_ending(self.state, self.counted_output, message)

    def final_usage(self, body: dict[str, Any] | None) -> Usage:
        """The stream's usage once it is over: as reported when it ended as meant;
        cut or broken off, the reported input and the output the client was sent;
        without a report at all, the shim's own count (``body``: the request)."""
        if self.cut:
            return cut_usage(self.state, self.counted_output)
        usage = self.state.usage
        if usage is not None and self.done:
            return usage
        output = count_text(self.text, self._count_model)
        if usage is not None:
            return cut_usage(self.state, output)
        prompt = count_messages_prompt(body, self._count_model) if body else 0
        return Usage(input_tokens=prompt, output_tokens=output, source=UsageSource.COUNTED)
