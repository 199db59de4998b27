"""Server-sent events passing through the shim, tallied on the way.

The tally cuts the upstream's bytes into whole events and hands each one on
as soon as it is complete, byte for byte, never waiting for the stream to
end. On the way it notes the served model, the usage chunk and the generated
text (to count tokens if the usage chunk never comes).

When the shim itself asked for ``stream_options.include_usage``, the client
must see what it would have seen without it: the usage-only chunk
(``choices: []``) is dropped and the ``"usage":null`` the upstream then adds
to every chunk is cut out. A fragment left at the end of a cut stream is
not an event: it is neither forwarded nor counted.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway_shim.usage import Usage, completion_text, model_from, usage_from

# A blank line ends an event. Atomic groups keep "\r\n" from counting as two newlines.
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# Inside a JSON string a quote is escaped, so this only matches the member itself.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null')
DONE = b"[DONE]"


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its ``data:`` lines joined), or None if it has none."""
    lines = [line[5:] for line in _LINE_END.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


class StreamTally:
    def __init__(self, hide_usage: bool = False) -> None:
        self.hide_usage = hide_usage
        self.usage: Usage | None = None
        self.model: str | None = None
        self.done = False  # [DONE] seen: the stream ended as the upstream meant it to
        self.events = 0
        self._text: list[str] = []
        self._pending = b""

    @property
    def text(self) -> str:
        return "".join(self._text)

    @property
    def pending_bytes(self) -> int:
        return len(self._pending)

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the complete events to forward now."""
        buffer = self._pending + data if self._pending else data
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(buffer):
            event = buffer[start : end.end()]
            start = end.end()
            forwarded = self._observe(event)
            if forwarded:
                out.append(forwarded)
        self._pending = buffer[start:]
        return b"".join(out)

    def _observe(self, event: bytes) -> bytes | None:
        data = event_data(event)
        if data is None:
            return event  # comments / keep-alives pass through
        self.events += 1
        if data.strip() == DONE:
            self.done = True
            return event
        try:
            chunk: Any = json.loads(data)
        except ValueError:
            return event  # not ours to judge: pass it on, count nothing from it
        if self.model is None:
            self.model = model_from(chunk)
        usage = usage_from(chunk)
        if usage is not None:
            self.usage = usage
        text = completion_text(chunk)
        if text:
            self._text.append(text)
        if self.hide_usage:
            if usage is not None and chunk.get("choices") == []:
                return None
            return _NULL_USAGE.sub(b"", event)
        return event
