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

What an upstream may get wrong, and what the tally makes of it:

- Data that is not a JSON object (``data: not json``, ``data: 42``), other
  than [DONE], is dropped: no OpenAI stream carries it, and the official
  clients fail on it mid-stream. Chunks that are never parsed are judged by
  their first and last byte (``{`` … ``}``), which is what garbage fails.
  Unknown members of a chunk pass on untouched.
- Only ``data:`` and ``event:`` lines and comments reach the client. ``id:``
  and ``retry:`` are reconnection hints, meaningless through the shim (a
  reconnection is a new request), and the official Python client, once it
  has seen an ``id:``, reads every later keep-alive as an event with empty
  data, and fails on it; unknown fields mean nothing. An event left without
  data is dropped; a comment-only one (a keep-alive) passes as it is.
- Two usage chunks: the last one counts (OpenAI sends one, after the last
  choice; a later one can only be a correction).
- One huge event: its bytes are kept aside, unscanned, until an event end
  arrives, so an event of N bytes costs O(N), however it is split.

All of the above is chat's (``[DONE]``, usage chunks, unparsed chunks). The
events of any other dialect (dialects/) are parsed one by one and read
through it: model, usage, text, and the terminal event, held back as
``[DONE]`` is.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway_shim.dialects import Dialect
from gateway_shim.dialects.chat import CHAT
from gateway_shim.usage import Usage, completion_text, model_from, usage_from
from quotameter.tokens import count_text

# A blank line ends an event. Atomic groups keep "\r\n" from counting as two newlines.
_EVENT_END = re.compile(rb"(?>\r\n|\r|\n)(?>\r\n|\r|\n)")
_LINE_END = re.compile(rb"\r\n|\r|\n")
# Inside a JSON string a quote is escaped, so this only matches the member itself.
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null')
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')
DONE = b"[DONE]"


def event_data(event: bytes) -> bytes | None:
    """The data of one event (its ``data:`` lines joined), or None if it has none."""
    lines = [line[5:] for line in _LINE_END.split(event) if line.startswith(b"data:")]
    if not lines:
        return None
    return b"\n".join(line[1:] if line.startswith(b" ") else line for line in lines)


class StreamTally:
    """``cut_at``: the output tokens the stream may carry (its reservation);
    the event that would carry it past is not forwarded, and ``cut`` is set.

    Most chunks are never parsed: only the first (the served model), any that
    carries a ``usage`` object, and, once the stream's bytes could hold more
    tokens than ``cut_at``, every chunk from then on. The text of the rest is
    read from the kept raw data only if the shim must count it itself.
    """

    def __init__(
        self, hide_usage: bool = False, cut_at: int | None = None, model: str | None = None, hold_done: bool = False,
        dialect: Dialect = CHAT,
    ) -> None:
        self.dialect = dialect
        self.last_event: dict[str, Any] | None = None  # the last parsed event passed on (not chat's)
        self._fast = dialect.fast_chunks  # chat: [DONE], usage chunks, chunks left unparsed
        self.hide_usage = hide_usage
        # hold_done: keep the [DONE] event back (in ``held``) for the relay to
        # write once the request's event is spooled (see proxy._relay_stream).
        self.hold_done = hold_done
        self.held = b""
        # With hold_done, the usage chunk too (OpenAI's last, choices empty): a
        # client that has it holds the whole answer and counts it as served.
        # Released before any event that follows it after all.
        self.held_usage = b""
        self.cut_at = cut_at
        self.cut = False
        self._counted = 0  # exact tokens of the texts counted so far
        self._unsure: list[str] = []  # texts passed on, not counted yet: at most a token per byte each
        self._unsure_bytes = 0
        self.chunk_id: str | None = None
        self._count_model = model
        self.usage: Usage | None = None
        self.model: str | None = None
        self.done = False  # [DONE] (the dialect's terminal event) seen: the stream ended as the upstream meant it to
        self.events = 0
        self._texts: list[str | bytes] = []  # text of parsed chunks, raw data of the others
        self._raw_bytes = 0
        self._counting = False  # exact token counts from here on (cut_at is near)
        self._pending = b""  # the start of an event not complete yet
        self._more: list[bytes] = []  # bytes read since, without an event end
        self._more_bytes = 0
        self._tail = b""  # the last bytes read: an event end may straddle two reads
        self.dropped = 0  # data events that were not JSON objects

    @property
    def text(self) -> str:
        return "".join(piece if isinstance(piece, str) else _text_of(piece) for piece in self._texts)

    @property
    def counted_output(self) -> int:
        """The output tokens counted against ``cut_at`` (the texts of every event passed on, once counting began)."""
        self._count_unsure()
        return self._counted

    @property
    def pending_bytes(self) -> int:
        """Bytes of an event not complete yet."""
        return len(self._pending) + self._more_bytes

    def feed(self, data: bytes) -> bytes:
        """Take upstream bytes; return the complete events to forward now."""
        if self._pending:
            # No event end among the new bytes (nor across the seam): keep them
            # aside, unjoined, so a huge event is not rescanned at every read.
            if not _EVENT_END.search(self._tail + data):
                self._more.append(data)
                self._more_bytes += len(data)
                self._tail = (self._tail + data)[-3:]
                return b""
            buffer = b"".join((self._pending, *self._more, data))
            self._more.clear()
            self._more_bytes = 0
        else:
            buffer = data
        out = self._feed_lf(buffer) if b"\r" not in buffer else self._feed_any(buffer)
        self._tail = self._pending[-3:]
        return out

    def _feed_any(self, buffer: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        for end in _EVENT_END.finditer(buffer):
            if self.cut:
                break
            event = buffer[start : end.end()]
            start = end.end()
            forwarded = self._observe(event)
            if forwarded:
                out.append(self._released(forwarded))
        self._pending = buffer[start:]
        return b"".join(out)

    def _feed_lf(self, buffer: bytes) -> bytes:
        """``feed`` for a buffer whose lines all end in "\n" (what servers send):
        the same events, cut by ``bytes.split``. A run of plain chunks (one
        ``data:`` line, no usage, no [DONE], no cut to watch, model known) is
        noted and forwarded in one piece, with ``"usage":null`` cut out of the
        run at once (the pattern cannot span two events: each starts "data:")."""
        pieces = buffer.split(b"\n\n")
        tail = pieces.pop()  # not ended by a blank line yet
        out: list[bytes] = []
        run: list[bytes] = []  # plain chunks, without their blank line
        texts = self._texts
        for i, piece in enumerate(pieces):
            if self.cut:
                self._pending = b"\n\n".join(pieces[i:]) + b"\n\n" + tail
                if run:
                    out.append(self._forward_run(run))
                return b"".join(out)
            if piece.startswith(b"data: ") and b"\n" not in piece:
                data = piece[6:]
                if (
                    self._fast and self.cut_at is None and self.model is not None and _object_like(data)
                    and b"[DONE]" not in data and not _USAGE_OBJECT.search(data)
                ):
                    self.events += 1
                    texts.append(data)
                    run.append(piece)
                    continue
                if run:
                    out.append(self._forward_run(run))
                    run = []
                forwarded = self._observe_data(piece + b"\n\n", data)
            else:
                if run:
                    out.append(self._forward_run(run))
                    run = []
                # A named event ("event: x" then one "data: " line, as the Responses API and
                # Anthropic send): what _observe would make of it, without its regex.
                name, _, data = piece.partition(b"\n")
                if name.startswith(b"event:") and data.startswith(b"data: ") and b"\n" not in data:
                    forwarded = self._observe_data(piece + b"\n\n", data[6:])
                else:
                    forwarded = self._observe(piece + b"\n\n")
            if forwarded:
                out.append(self._released(forwarded))
        if run:
            out.append(self._forward_run(run))
        self._pending = tail
        return b"".join(out)

    def _forward_run(self, run: list[bytes]) -> bytes:
        events = b"\n\n".join(run) + b"\n\n"
        return self._released(_NULL_USAGE.sub(b"", events) if self.hide_usage else events)

    def _released(self, events: bytes) -> bytes:
        """``events``, after a usage chunk held back before them (more came after it)."""
        if self.held_usage:
            events, self.held_usage = self.held_usage + events, b""
        return events

    def _observe(self, event: bytes) -> bytes | None:
        lines = [line for line in _LINE_END.split(event) if line]
        kept = [line for line in lines if line.startswith(_PASSED)]
        data = [line[5:] for line in kept if line.startswith(b"data:")]
        if not data:
            return event if all(line[:1] == b":" for line in lines) else None  # a keep-alive passes
        if len(kept) != len(lines):
            event = b"\n".join(kept) + b"\n\n"
        return self._observe_data(event, b"\n".join(line[1:] if line.startswith(b" ") else line for line in data))

    def _observe_data(self, event: bytes, data: bytes) -> bytes | None:
        self.events += 1
        if not self._fast:
            return self._observe_event(event, data)
        if data.strip() == DONE:
            self.done = True
            if self.hold_done:
                self.held += event
                return None
            return event
        if self.cut_at is not None and not self._counting:
            # A token is at least one byte of text, and JSON never shortens
            # text: while the raw bytes fit in cut_at, no count can pass it.
            self._raw_bytes += len(data)
            if self._raw_bytes > self.cut_at:
                self._start_counting()
        if (
            self.model is not None and not self._counting and _object_like(data)
            and not _USAGE_OBJECT.search(data)
        ):
            self._texts.append(data)
            return _NULL_USAGE.sub(b"", event) if self.hide_usage else event
        return self._observe_parsed(event, data)

    def _start_counting(self) -> None:
        self._counting = True
        self._texts = [piece if isinstance(piece, str) else _text_of(piece) for piece in self._texts]
        self._unsure = [piece for piece in self._texts if piece]  # counted once they might not fit
        self._unsure_bytes = sum(len(piece.encode()) for piece in self._unsure)

    def _fits(self, text: str) -> bool:
        """Whether ``text`` (the next event's) still fits in ``cut_at``. A token is at
        least one byte: while the bytes of the texts not counted yet fit, so do their
        tokens, and counting waits; past that, each text is counted on its own, as it
        would have been one by one, so the cut falls on the same event."""
        size = len(text.encode())
        if self._counted + self._unsure_bytes + size <= self.cut_at:  # type: ignore[operator]
            self._unsure.append(text)
            self._unsure_bytes += size
            return True
        self._count_unsure()
        tokens = count_text(text, self._count_model)
        if self._counted + tokens > self.cut_at:  # type: ignore[operator]
            return False
        self._counted += tokens
        return True

    def _count_unsure(self) -> None:
        if self._unsure:
            self._counted += sum(count_text(piece, self._count_model) for piece in self._unsure)
            self._unsure.clear()
            self._unsure_bytes = 0

    def _observe_parsed(self, event: bytes, data: bytes) -> bytes | None:
        try:
            chunk: Any = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            self.dropped += 1  # garbage: neither forwarded nor counted
            return None
        if self.model is None:
            self.model = model_from(chunk)
            if isinstance(chunk, dict) and isinstance(chunk.get("id"), str):
                self.chunk_id = chunk["id"]
        usage = usage_from(chunk)
        if usage is not None:
            self.usage = usage
        text = completion_text(chunk)
        if text:
            if self._counting and not self._fits(text):
                self.cut = True
                return None
            self._texts.append(text)
        if usage is not None and chunk.get("choices") == []:
            if self.hide_usage:
                return None
            if self.hold_done:
                self.held_usage += event
                return None
        if self.hide_usage:
            return _NULL_USAGE.sub(b"", event)
        return event


    def _observe_event(self, event: bytes, data: bytes) -> bytes | None:
        """One event of a dialect without chat's fast paths: parsed, and read through it."""
        try:
            chunk: Any = json.loads(data)
        except ValueError:
            chunk = None
        if not isinstance(chunk, dict):
            self.dropped += 1
            return None
        dialect = self.dialect
        if self.model is None:
            self.model = dialect.event_model(chunk)
        if self.chunk_id is None:
            self.chunk_id = dialect.event_id(chunk)
        self.usage = dialect.event_usage(chunk, self.usage)
        text = dialect.event_text(chunk)
        if text:
            if self.cut_at is not None:
                if not self._counting:
                    self._raw_bytes += len(text.encode())  # tokens <= bytes: no count passes cut_at before this does
                    if self._raw_bytes > self.cut_at:
                        self._start_counting()
                if self._counting and not self._fits(text):
                    self.cut = True
                    return None
            self._texts.append(text)
        if dialect.event_ends(chunk):
            self.done = True
            if self.hold_done:
                self.held += event
                return None
        self.last_event = chunk  # what a cut's ending may have to close (dialects.CutStream)
        return event


_FIELDS = (b"data:", b":", b"event:", b"id:", b"retry:")
_PASSED = (b"data:", b"event:", b":")  # the lines an event keeps (a comment starts with ":")


def looks_like_events(head: bytes) -> bool:
    """Whether an answer starting with ``head`` is an event stream, whatever its Content-Type says."""
    return head.lstrip().startswith(_FIELDS)


def _object_like(data: bytes) -> bool:
    """Whether ``data`` can be a JSON object (a cheap test, for chunks not parsed)."""
    return data[:1] == b"{" and data.rstrip()[-1:] == b"}"


def _text_of(data: bytes) -> str:
    try:
        return completion_text(json.loads(data))
    except ValueError:
        return ""
