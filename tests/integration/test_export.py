"""``quotameter export`` against a ledger a real worker wrote from real Kafka events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import redis

from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import (
    ACME_EVENTS,
    PERIOD,
    http_json,
    ledger_has,
    make_event,
    produce,
    redis_usage,
    start_worker,
    wait_for,
)

AFTER_GRACE = "2025-04-03T01:00:00"  # 2025-03 ended 2025-04-01, final 48 h later; 2025-03-10 is 24 days back
BETA = make_event("beta-1", "beta", model="gpt-4o", input_tokens=12345, output_tokens=678, cached_tokens=1000)
EXPECTED_CSV = """\
record,customer,model,price_version,currency,requests,input_tokens,cached_tokens,cache_write_tokens,output_tokens,reasoning_tokens,billed_input_tokens,price_input_per_million,billed_cached_input_tokens,price_cached_input_per_million,billed_cache_write_tokens,price_cache_write_per_million,billed_output_tokens,price_output_per_million,billed_reasoning_tokens,price_reasoning_per_million,amount_exact,amount_rounded
line,acme,gpt-4o-mini,gpt-4o-mini@2024-07-18,USD,1,2000,500,0,300,40,1500,0.15,500,0.075,0,0.15,260,0.60,40,0.60,0.000442500000,0.00
line,acme,mock-small,mock-small@1970-01-01,USD,1,1000,0,0,200,0,1000,0.10,0,0.10,0,0.10,200,0.40,0,0.40,0.000180000000,0.00
customer_total,acme,,,USD,2,3000,500,0,500,40,2500,,500,,0,,460,,40,,0.000622500000,0.00
line,beta,gpt-4o,gpt-4o@2024-08-06,USD,1,12345,1000,0,678,0,11345,2.50,1000,1.25,0,2.50,678,10.00,0,10.00,0.036392500000,0.04
customer_total,beta,,,USD,1,12345,1000,0,678,0,11345,,1000,,0,,678,,0,,0.036392500000,0.04
"""
STRIPE = {"billing": {"stripe": {"customers": {"acme": "cus_acme", "beta": "cus_beta"},
                                 "meters": {"requests": "qm_requests", "input": "qm_input", "output": "qm_output"}}}}


def export(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUOTAMETER_CONFIG": str(path)}
    return subprocess.run(
        [sys.executable, "-m", "quotameter", "export", "--month", PERIOD, *args],
        env=env, capture_output=True, text=True, timeout=60,
    )


async def seeded(config_factory, cli_process):
    config, path = config_factory(STRIPE)
    worker = start_worker(cli_process, config, path, "worker")
    dup = ACME_EVENTS[0]
    await produce(config, [*ACME_EVENTS, BETA, dup])  # dup: a retried send, same id
    wait_for(ledger_has(config, "acme", 3), what="acme in the ledger")
    wait_for(ledger_has(config, "beta", 1), what="beta in the ledger")
    wait_for(lambda: redis_usage(config, "acme").get("events") == "3" and redis_usage(config, "beta").get("events") == "1",
             what="Redis totals")
    # The export reads FINAL; the ledger itself must hold the retried send once.
    status, body = http_json(f"{config.services.worker_url}/query",
                             "SELECT count() AS rows, uniqExact(id) AS ids FROM quotameter.events")
    assert status == 200 and body["rows"] == [{"rows": 4, "ids": 4}], body
    return config, path, worker


async def test_export_is_exact_reconciled_and_byte_identical(config_factory, cli_process, tmp_path: Path) -> None:
    config, path, worker = await seeded(config_factory, cli_process)

    first = export(path, "--format", "csv", "--now", AFTER_GRACE)
    assert first.returncode == 0, first.stderr
    assert first.stdout == EXPECTED_CSV
    assert "reconciled 2025-03" in first.stderr and "ledger = lines = redis for 2 customer(s)" in first.stderr
    assert "cost_usd=0.037015000000" in first.stderr

    outputs = {}
    for run in ("a", "b"):
        for fmt in ("csv", "json", "stripe"):
            out = tmp_path / run / f"export.{fmt}"
            result = export(path, "--format", fmt, "--out", str(out), "--now", AFTER_GRACE)
            assert result.returncode == 0, result.stderr
            assert result.stdout == ""  # stdout stays clean with --out
            outputs[run, fmt] = out.read_bytes()
    for fmt in ("csv", "json", "stripe"):
        assert outputs["a", fmt] == outputs["b", fmt]
    assert outputs["a", "csv"].decode() == EXPECTED_CSV
    document = json.loads(outputs["a", "json"])
    assert (document["final"], document["amount"], document["total"]) == (True, "0.037015000000", "0.04")
    assert [c["amount"] for c in document["customers"]] == ["0.000622500000", "0.036392500000"]

    # Stripe: whole numbers summing to the lines, stable identifiers, timestamps in range.
    events = [json.loads(line) for line in outputs["a", "stripe"].decode().splitlines()]
    now = datetime(2025, 4, 3, 1, tzinfo=UTC)
    assert all(now - timedelta(days=35) <= datetime.fromtimestamp(e["timestamp"], UTC) <= now for e in events)
    assert all(e["payload"]["value"].isdigit() for e in events)
    sums: dict[tuple[str, str], int] = {}
    for e in events:
        key = (e["payload"]["stripe_customer_id"], e["event_name"])
        sums[key] = sums.get(key, 0) + int(e["payload"]["value"])
    assert sums == {("cus_acme", "qm_requests"): 2, ("cus_acme", "qm_input"): 2500, ("cus_acme", "qm_output"): 460,
                    ("cus_beta", "qm_requests"): 1, ("cus_beta", "qm_input"): 11345, ("cus_beta", "qm_output"): 678}
    assert len({e["identifier"] for e in events}) == len(events)
    assert {e["timestamp"] for e in events} == {int(datetime(2025, 3, 10, tzinfo=UTC).timestamp())}  # daily windows
    hourly = export(path, "--format", "stripe", "--stripe-window", "hour", "--now", AFTER_GRACE)
    assert {json.loads(line)["timestamp"] for line in hourly.stdout.splitlines()} == {int(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())}

    # Too late for Stripe: refused, naming the oldest timestamp it still accepts.
    late = export(path, "--format", "stripe", "--now", "2025-04-20T00:00:00")
    assert late.returncode == 3 and late.stdout == ""
    assert "oldest timestamp accepted is 2025-03-16T01:00:00+00:00" in late.stderr
    assert export(path, "--format", "stripe", "--now", "2025-04-20T00:00:00", "--force").returncode == 0

    # An open month: refused without --force, marked not final with it.
    early = export(path, "--format", "json", "--now", "2025-04-02T00:00:00")
    assert early.returncode == 3 and "2025-03 is open" in early.stderr and "--force" in early.stderr
    forced = export(path, "--format", "json", "--now", "2025-04-02T00:00:00", "--force")
    assert forced.returncode == 0 and json.loads(forced.stdout)["final"] is False
    assert "warning:" in forced.stderr

    # A redelivered event changes nothing. The April marker shares acme's
    # partition, so once it is in the ledger the duplicate before it was processed.
    await produce(config, [ACME_EVENTS[1], make_event("acme-april", "acme", input_tokens=1, output_tokens=1).model_copy(
        update={"time": datetime(2025, 4, 1, 1, tzinfo=UTC)})])
    wait_for(lambda: http_json(f"{config.services.worker_url}/usage?customer=acme&period=2025-04")[1]["events"] == 1,
             what="the April marker")
    again = export(path, "--format", "csv", "--now", AFTER_GRACE)
    assert again.returncode == 0, again.stderr
    assert again.stdout == EXPECTED_CSV

    # Without a worker the export opens the ledger read-only: same bytes.
    assert worker.stop(timeout_s=20, sig=signal.SIGTERM) == 0
    direct = export(path, "--format", "json", "--now", AFTER_GRACE)
    assert direct.returncode == 0, direct.stderr
    assert direct.stdout.encode() == outputs["a", "json"] and "no worker running" in direct.stderr


async def test_export_fails_loudly_when_redis_differs(config_factory, cli_process, tmp_path: Path) -> None:
    config, path, _ = await seeded(config_factory, cli_process)
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    try:
        client.hincrby(RedisKeys(config.services.redis_prefix).usage("acme", PERIOD), "input_tokens", 7)
    finally:
        client.close()
    out = tmp_path / "export.csv"
    result = export(path, "--format", "csv", "--out", str(out), "--now", AFTER_GRACE)
    assert result.returncode == 4
    assert "reconciliation failed" in result.stderr
    assert "acme: input_tokens is 3000 in the ledger but 3007 in redis" in result.stderr
    assert "beta" not in result.stderr.split("totals:")[0]  # only the numbers that differ
    assert not out.exists() and result.stdout == ""

    # Unmapped customer: a clear error naming it.
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    client.hincrby(RedisKeys(config.services.redis_prefix).usage("acme", PERIOD), "input_tokens", -7)
    client.close()
    env_path = tmp_path / "nomap.yaml"
    env_path.write_text(path.read_text().replace("beta: cus_beta", ""))
    missing = export(env_path, "--format", "stripe", "--now", AFTER_GRACE)
    assert missing.returncode == 1 and "no Stripe customer for beta" in missing.stderr
