"""Consumer lag per partition of the events topic, read from Faust's consumer.

    lag = highwater - committed

``highwater`` is the offset the next produced record will get, as the last
fetch response reported it (aiokafka's ``highwater``); ``committed`` is the
offset this worker last committed (Faust's ``_committed_offset``, kept in
memory and updated on each commit, so reading it costs no round trip: the
gauge is called synchronously on every scrape). Both name the *next* offset,
so a worker that committed everything reports 0. Events are committed only
after their ledger rows are written (pipeline.ledger_sink), so this lag is
what a crash now would make the group read again.

A partition not committed yet by the group counts from offset 0 (the
embedded broker keeps every record; on a broker whose retention dropped the
first records, the lag reads high until the first commit, about a second
after the first batch). A partition with no fetch yet is not reported.

Faust internals read here: ``Consumer._committed_offset`` (a dict TP →
offset) and ``Consumer.highwater``; checked against faust-streaming 0.15.3
and aiokafka 0.14 (tests/integration/test_worker_telemetry.py).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)


def lag_of(consumer: Any, topic: str) -> Iterator[tuple[str, int, int]]:
    """(topic, partition, lag) for each partition of ``topic`` assigned to ``consumer``."""
    try:
        assigned = [tp for tp in consumer.assignment() if tp.topic == topic]
    except Exception:  # not started, or stopping: nothing assigned to report
        return
    committed_offsets = consumer._committed_offset
    for tp in sorted(assigned, key=lambda tp: tp.partition):
        try:
            highwater = consumer.highwater(tp)
        except Exception as exc:  # revoked since assignment() above
            log.debug("no highwater for %s: %s", tp, exc)
            continue
        if highwater is None:
            continue
        committed = committed_offsets.get(tp) or 0
        yield topic, tp.partition, max(0, highwater - committed)
