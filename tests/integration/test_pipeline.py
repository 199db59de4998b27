"""The pipeline worker against a real broker, redis-server and chDB ledger."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import redis

from pipeline.history.chdb_store import ChdbHistory
from pipeline.history.reader import ledger_usage
from pipeline.history.store import QueryRejected
from quotameter.aggregate import price_batch
from quotameter.errors import QuotameterError
from quotameter.periods import BillingCalendar
from quotameter.pricing import PriceTable
from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import (
    ACME_EVENTS,
    ACME_TOTALS,
    PERIOD,
    health_status,
    http_json,
    ledger_has,
    make_event,
    produce,
    read_topic,
    start_worker,
    subset,
    wait_for,
    worker_usage,
)

UTC_MONTHS = BillingCalendar("UTC", 1)


async def test_worker_meters_events_into_redis_and_the_ledger(config_factory, cli_process) -> None:
    config, path = config_factory()
    worker = start_worker(cli_process, config, path, "worker")
    dup = make_event("dup-1", "dupco", input_tokens=10, output_tokens=10)
    await produce(
        config,
        [
            ("acme", b"{not json"),
            ("acme", json.dumps({"specversion": "1.0", "id": "broken"}).encode()),
            *ACME_EVENTS,
            dup,
        ],
    )
    await produce(config, [dup])  # a retried send: same id, a later offset
    # Again once the first is in the ledger: a later batch, which only the
    # window of recent ids and the ledger lookup can catch.
    wait_for(ledger_has(config, "dupco", 1), what="dupco in the ledger")
    await produce(config, [dup])
    # Same key, so the same partition, after the copy: once its row is in the
    # ledger, any row the copy would have made is there too.
    await produce(config, [make_event("dup-after", "dupco", input_tokens=1, output_tokens=1)])

    usage = wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")
    assert subset(usage) == ACME_TOTALS
    assert subset(ledger_usage(config, "acme", PERIOD)) == ACME_TOTALS

    # Redis holds the same totals, as absolute values.
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    key = RedisKeys(config.services.redis_prefix).usage("acme", PERIOD)
    stored = wait_for(lambda: client.hgetall(key), what="the Redis usage hash")
    assert {name: stored[name] for name in ACME_TOTALS} == {k: str(v) for k, v in ACME_TOTALS.items()}
    assert int(stored["updated_ms"]) > 0

    # The malformed events went to the dead-letter topic with their reason, and processing went on.
    dead = await read_topic(config.services.kafka_bootstrap, f"{config.services.events_topic}.dlq", 2)
    reasons = [dict(record.headers)["quotameter-dlq-reason"].decode() for record in dead]
    assert [record.value for record in dead] == [b"{not json", json.dumps({"specversion": "1.0", "id": "broken"}).encode()]
    assert "Invalid JSON" in reasons[0] and "data: Field required" in reasons[1]
    assert all(record.key == b"acme" for record in dead)

    # The duplicate counts once: checked on the raw rows, since FINAL would
    # collapse a second row the sink should never have written.
    wait_for(ledger_has(config, "dupco", 2), what="dupco in the ledger")
    status, body = http_json(
        f"{config.services.worker_url}/query",
        "SELECT count() AS rows, uniqExact(id) AS ids, sum(input_tokens) AS input FROM quotameter.events WHERE customer = 'dupco'",
    )
    assert status == 200 and body["rows"] == [{"rows": 2, "ids": 2, "input": 11}], body
    dup_usage = ledger_usage(config, "dupco", PERIOD)
    assert (dup_usage["requests"], dup_usage["events"], dup_usage["cost_usd"]) == (2, 2, "0.000005500000")
    key = RedisKeys(config.services.redis_prefix).usage("dupco", PERIOD)
    stored = wait_for(lambda: (h := client.hgetall(key)) and int(h["events"]) >= 2 and h, what="dupco in Redis")
    assert (stored["requests"], stored["events"], stored["input_tokens"], stored["output_tokens"]) == ("2", "2", "11", "11")

    # /query is read-only.
    status, body = http_json(f"{config.services.worker_url}/query", "DROP TABLE quotameter.events")
    assert status == 400 and "SELECT" in body["error"]
    status, body = http_json(f"{config.services.worker_url}/usage?customer=acme&period=March")
    assert status == 400


async def test_stopped_worker_leaves_the_ledger_readable_and_a_restart_finds_it(config_factory, cli_process) -> None:
    config, path = config_factory()
    worker = start_worker(cli_process, config, path, "worker-1")
    await produce(config, ACME_EVENTS)
    wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")

    assert worker.stop(timeout_s=20, sig=signal.SIGTERM) == 0
    assert health_status(config) is None
    # No worker: ledger_usage opens the chDB directory itself (and releases it).
    assert subset(ledger_usage(config, "acme", PERIOD)) == ACME_TOTALS

    # Tansu numbers a fresh group's first generation 0, and aiokafka sends no
    # LeaveGroup for generation 0: this restart waits for worker-1's session
    # (10 s) to expire, so it takes ~20 s instead of ~7 s.
    worker = start_worker(cli_process, config, path, "worker-2")
    assert subset(worker_usage(config, "acme")) == ACME_TOTALS
    await produce(config, [make_event("acme-4", "acme", input_tokens=10, output_tokens=5)])
    # Its partitions may come only once worker-1's session has expired: up to 10 s more.
    usage = wait_for(ledger_has(config, "acme", 4), timeout_s=45, what="the new event in the ledger")
    assert (usage["requests"], usage["input_tokens"], usage["cost_usd"]) == (3, 3010, "0.000625500000")
    # Redis continues from the recovered tables: exactly the ledger's totals.
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    key = RedisKeys(config.services.redis_prefix).usage("acme", PERIOD)
    stored = wait_for(lambda: (h := client.hgetall(key)) and int(h["events"]) >= 4 and h, what="Redis")
    assert subset(stored) == {k: str(v) for k, v in subset(usage).items()}
    assert stored["cost_micro_usd"] == "626"  # 625.5 µ$ rounded up
    assert worker.stop(timeout_s=20) == 0


def test_ledger_usage_names_both_causes_when_nothing_answers(config_factory) -> None:
    config, _ = config_factory()
    with pytest.raises(QuotameterError) as caught:
        ledger_usage(config, "acme", PERIOD)
    message = str(caught.value)
    assert config.services.worker_url in message and "no chDB ledger" in message


def test_chdb_ledger_counts_a_retried_batch_once(tmp_path: Path) -> None:
    prices = PriceTable([])
    batch = price_batch(ACME_EVENTS, prices)
    store = ChdbHistory(tmp_path / "history")
    try:
        store.insert_events(batch)
        store.insert_events(batch)  # the sink retried after a crash
        usage = store.usage("acme", PERIOD, UTC_MONTHS)
        assert (usage["requests"], usage["refused"], usage["events"], usage["input_tokens"]) == (2, 1, 3, 3000)
        assert store.usage("acme", "2025-04", UTC_MONTHS)["events"] == 0
        with pytest.raises(QueryRejected):
            store.query("DELETE FROM quotameter.events WHERE 1")
        # Both copies are stored (no merge ran): usage() above is what collapsed them.
        assert store.query("SELECT count() AS n, uniqExact(id) AS ids FROM quotameter.events") == [{"n": 6, "ids": 3}]
    finally:
        store.close()
