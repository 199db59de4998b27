"""The access line is written once per request: it skips what neither format
shows (the caller's frame, the thread and process), and the console's time is
formatted once per second, each line still stamped with its own time."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest

from quotameter.config import Telemetry
from telemetry import logs


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    flags = logging.logThreads, logging.logProcesses, logging.logMultiprocessing
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.logThreads, logging.logProcesses, logging.logMultiprocessing = flags
    logs._access_enabled = True


def test_an_access_line_does_not_look_up_its_caller(
    capsys: pytest.CaptureFixture[str], restore_logging: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    logs.configure(Telemetry(), "quotameter-shim")

    def no_frames(*args: object, **kwargs: object) -> None:
        raise AssertionError("the access line looked up its caller's frame")

    monkeypatch.setattr(logging.Logger, "findCaller", no_frames)
    with logs.request_context("ev-1", "acme", "key-9"):
        logs.access(method="POST", path="/v1/chat/completions", status=200, outcome="admitted", reason="", tier="pro")
    line = capsys.readouterr().err.strip()
    assert line.endswith("INFO quotameter.access: POST /v1/chat/completions 200 admitted tier=pro"), line


def test_records_skip_thread_and_process_once_configured(restore_logging: None) -> None:
    logs.configure(Telemetry(), "quotameter-shim")
    record = logging.getLogger("x").makeRecord("x", logging.INFO, "", 0, "m", (), None)
    assert (record.threadName, record.processName, record.process) == (None, None, None)


def test_the_console_time_is_each_line_s_own(restore_logging: None) -> None:
    formatter = logs.formatter(Telemetry())
    stamps = []
    for created in (1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5, 1_800_000_000.5):
        record = logging.LogRecord("x", logging.INFO, "", 0, "m", (), None)
        record.created, record.msecs = created, (created % 1) * 1000
        stamps.append(formatter.format(record).split(" INFO ")[0])
    expected = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c)) + f",{int((c % 1) * 1000):03d}"
                for c in (1_800_000_000.25, 1_800_000_000.75, 1_800_000_001.5, 1_800_000_000.5)]
    assert stamps == expected
