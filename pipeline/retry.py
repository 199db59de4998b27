"""Retrying a step of the usage agent or the ledger sink that depends on the
ledger or the broker, and giving up the hard way.

A step that cannot complete must not ack its events (that would lose them),
and an agent stuck forever helps nobody: after RETRY_S the process exits
without committing, and its supervisor (or ``quotameter up``) restarts it;
the events are redelivered to whoever owns their partitions then.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from pipeline.history.store import HistoryError

RETRY_S = 30.0
EXIT_UNAVAILABLE = 75  # EX_TEMPFAIL
T = TypeVar("T")
log = logging.getLogger(__name__)


async def retrying(
    what: str, call: Callable[[], Awaitable[T]], errors: tuple[type[Exception], ...] = (HistoryError,)
) -> T:
    """``call()``, retried with backoff on ``errors``; after RETRY_S exit unacked."""
    deadline = time.monotonic() + RETRY_S
    delay_s = 0.2
    while True:
        try:
            return await call()
        except errors as exc:
            if time.monotonic() >= deadline:
                log.critical("%s failing for %.0fs, exiting without committing: %s", what, RETRY_S, exc)
                os._exit(EXIT_UNAVAILABLE)
            log.error("%s failed (retrying in %.1fs): %s", what, delay_s, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 5.0)
