"""Logs: one JSON object per line for log shippers, or the plain console
format ``make run`` shows a person.

Every line written while a request is handled carries its id, customer and
key id (``request_context``), and the current span's trace and span ids, so
one refused request can be found across the access log, the shim's warnings
and its trace. Keys and secrets are never passed here: a key's id names it.

JSON fields: ``time`` (UTC, ISO 8601, ms), ``level``, ``logger``,
``message``, then ``request_id``, ``customer``, ``key_id``, ``trace_id``,
``span_id`` when known, then the line's own fields (an access line's
status, outcome, tokens…), then ``exc_info`` for an exception.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace
from pythonjsonlogger.json import JsonFormatter

from quotameter.config import Telemetry

CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "quotameter.access"

_request: ContextVar[dict[str, str] | None] = ContextVar("quotameter_request", default=None)
_access = logging.getLogger(ACCESS_LOGGER)
_access_enabled = True


@contextmanager
def request_context(request_id: str, customer: str | None = None, key_id: str | None = None) -> Iterator[None]:
    """Add the request's id, customer and key id to every line logged inside."""
    fields = {"request_id": request_id}
    if customer:
        fields["customer"] = customer
    if key_id:
        fields["key_id"] = key_id
    token = _request.set(fields)
    try:
        yield
    finally:
        _request.reset(token)


def access(**fields: Any) -> None:
    """One access-log line: ``<method> <path> <status> <outcome>`` and ``fields``."""
    if not _access_enabled or not _access.isEnabledFor(logging.INFO):
        return
    message = f"{fields.get('method', '-')} {fields.get('path', '-')} {fields.get('status', '-')} {fields.get('outcome', '-')}"
    # One per request: made and handled directly, without Logger.info's look-up of
    # the caller's frame (neither format shows it).
    _access.handle(_access.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, message, (), None, extra={"fields": fields}))


class _Context(logging.Filter):
    """Puts the request's fields and the current span's ids on the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.context = _request.get()
        span = trace.get_current_span().get_span_context()
        record.trace = (f"{span.trace_id:032x}", f"{span.span_id:016x}") if span.is_valid else None
        return True


class _Json(JsonFormatter):
    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        log_data["time"] = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        log_data["level"] = record.levelname
        log_data["logger"] = record.name
        log_data["message"] = record.getMessage()
        context = getattr(record, "context", None)
        if context:
            log_data.update(context)
        ids = getattr(record, "trace", None)
        if ids:
            log_data["trace_id"], log_data["span_id"] = ids
        fields = getattr(record, "fields", None)
        if fields:
            log_data.update(fields)
        if record.exc_info:
            log_data["exc_info"] = self.formatException(record.exc_info)
        elif record.exc_text:
            log_data["exc_info"] = record.exc_text


class _Console(logging.Formatter):
    """The console line, with an access line's fields as ``key=value``."""

    _second: tuple[int, str] = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        # The date and time are formatted once per second, not once per line.
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if self._second[0] != second:
            self._second = (second, time.strftime(self.default_time_format, self.converter(record.created)))
        return self.default_msec_format % (self._second[1], record.msecs)

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = getattr(record, "fields", None)
        if fields:
            extra = " ".join(f"{k}={v}" for k, v in fields.items() if k not in ("method", "path", "status", "outcome")
                             and v not in (None, ""))
            line = f"{line} {extra}" if extra else line
        return line


def formatter(config: Telemetry) -> logging.Formatter:
    return _Json() if config.log_format == "json" else _Console(CONSOLE_FORMAT)


def configure(config: Telemetry, service: str, level: int = logging.INFO) -> None:
    """The root logger writes ``config.log_format`` lines to stderr; replaces
    any handler set before (logging.basicConfig, a library's)."""
    global _access_enabled
    _access_enabled = config.access_log
    # Neither format shows a line's thread or process: records skip looking them up.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(config))
    handler.addFilter(_Context())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("telemetry").debug("logging as %s for %s", config.log_format, service)
