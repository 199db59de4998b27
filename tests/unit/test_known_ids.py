"""The dedupe's ledger lookup: which ids the ledger holds, and where each
row came from, on both stores and whatever characters an id holds."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pytest

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.store import HistoryStore
from quotameter.aggregate import PricedEvent, price_event
from quotameter.events import RequestData, UsageEvent
from quotameter.pricing import PriceTable
from tests.unit.test_clickhouse_store import engine_store

AT = datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
AWKWARD_IDS = ["plain", "it's", 'a"quote', "back\\slash", "tab\there", "new\nline", "ünï-ｃode", "x" * 128, "\\N", "[1,2]"]


def row(event_id: str, customer: str, partition: int, offset: int) -> PricedEvent:
    event = UsageEvent(id=event_id, source="t", subject=customer, time=AT, data=RequestData(
        api_key_id="k", tier="pro", route="/v1/chat/completions", status=200, decision="admitted",
        input_tokens=10, output_tokens=5))
    return dataclasses.replace(price_event(event, PriceTable([])), partition=partition, offset=offset)


def fill(store: HistoryStore) -> None:
    store.insert_events([row(event_id, "acme", 1, 100 + n) for n, event_id in enumerate(AWKWARD_IDS)])
    store.insert_events([row("other-only", "other", 2, 7), row("plain", "other", 3, 9)])


def check(store: HistoryStore) -> None:
    asked = [*AWKWARD_IDS, "missing", "other-only"]
    assert store.known_ids(["acme"], asked) == {event_id: (1, 100 + n) for n, event_id in enumerate(AWKWARD_IDS)}
    # Another customer's id is not this one's: the customer is part of the key.
    assert store.known_ids(["other"], asked) == {"other-only": (2, 7), "plain": (3, 9)}
    assert store.known_ids(["nobody"], asked) == {}
    assert store.known_ids(["acme"], []) == {}
    many = [f"absent-{n}" for n in range(5000)] + ["tab\there"]
    assert store.known_ids(["acme", "other"], many) == {"tab\there": (1, 104)}


@pytest.mark.parametrize("reopen_read_only", [False, True])
def test_chdb_knows_exactly_the_ids_it_holds(tmp_path: Path, reopen_read_only: bool) -> None:
    store = ChdbHistory(tmp_path / "h")
    try:
        fill(store)
        if reopen_read_only:  # the CLI's store: ids as literals, no Python() table function
            store.close()
            store = ChdbHistory(tmp_path / "h", read_only=True)
        check(store)
    finally:
        store.close()


def test_a_clickhouse_server_knows_exactly_the_ids_it_holds(tmp_path: Path) -> None:
    store = engine_store(tmp_path / "engine")
    try:
        fill(store)
        check(store)
    finally:
        store.close()
