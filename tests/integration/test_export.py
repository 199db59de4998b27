"""``quotameter export`` against a ledger a real worker wrote from real Kafka events."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from quotameter.export import ExportRefused, run_export
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

# 2025-03 ended 2025-04-01, final 48 h later; 2025-03-10 is 24 days back. The CLI judges by
# the clock (2025-03 is long final, and too old for Stripe): times of our choosing go in-process.
AFTER_GRACE = datetime(2025, 4, 3, 1, tzinfo=UTC)
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


def export(path: Path, *args: str, month: str = PERIOD) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "QUOTAMETER_CONFIG": str(path)}
    return subprocess.run(
        [sys.executable, "-m", "quotameter", "export", "--month", month, *args],
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

    first = export(path, "--format", "csv")
    assert first.returncode == 0, first.stderr
    assert first.stdout == EXPECTED_CSV
    assert "reconciled 2025-03" in first.stderr and "ledger = lines = redis for 2 customer(s)" in first.stderr
    assert "cost_usd=0.037015000000" in first.stderr

    outputs = {}
    for run in ("a", "b"):
        for fmt in ("csv", "json"):
            out = tmp_path / run / f"export.{fmt}"
            result = export(path, "--format", fmt, "--out", str(out))
            assert result.returncode == 0, result.stderr
            assert result.stdout == ""  # stdout stays clean with --out
            outputs[run, fmt] = out.read_bytes()
        outputs[run, "stripe"] = run_export(config, PERIOD, "stripe", AFTER_GRACE).text.encode()
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
    hourly = run_export(config, PERIOD, "stripe", AFTER_GRACE, window="hour")
    assert {json.loads(line)["timestamp"] for line in hourly.text.splitlines()} == {int(datetime(2025, 3, 10, 12, tzinfo=UTC).timestamp())}

    # Too late for Stripe: refused, naming the oldest timestamp it still accepts.
    with pytest.raises(ExportRefused, match=r"oldest timestamp accepted is 2025-03-16T01:00:00\+00:00"):
        run_export(config, PERIOD, "stripe", datetime(2025, 4, 20, tzinfo=UTC))
    assert run_export(config, PERIOD, "stripe", datetime(2025, 4, 20, tzinfo=UTC), force=True).text
    # The CLI has the clock only: 2025-03 is far too old for Stripe now.
    late = export(path, "--format", "stripe")
    assert late.returncode == 3 and late.stdout == "" and "oldest timestamp accepted" in late.stderr

    # An open period: refused, unless exported as a draft, marked not final (never as Stripe events).
    early_at = datetime(2025, 4, 2, tzinfo=UTC)
    with pytest.raises(ExportRefused, match="2025-03 is open.*--draft"):
        run_export(config, PERIOD, "json", early_at)
    with pytest.raises(ExportRefused, match="draft"):
        run_export(config, PERIOD, "stripe", early_at, draft=True)
    draft = run_export(config, PERIOD, "json", early_at, draft=True)
    assert json.loads(draft.text)["final"] is False and any("draft" in w for w in draft.warnings)
    draft_csv = run_export(config, PERIOD, "csv", early_at, draft=True).text.splitlines()
    assert draft_csv[1].startswith("draft,") and draft_csv[2:] == EXPECTED_CSV.splitlines()[1:]
    # From the command line, the clock decides: the current period is open.
    current = config.billing.calendar.current(datetime.now(UTC))
    open_now = export(path, "--format", "json", month=current)
    assert open_now.returncode == 3 and f"{current} is open" in open_now.stderr and "--draft" in open_now.stderr
    drafted = export(path, "--format", "json", "--draft", month=current)
    assert drafted.returncode == 0, drafted.stderr
    assert json.loads(drafted.stdout)["final"] is False and "warning:" in drafted.stderr
    assert export(path, "--format", "stripe", "--draft", month=current).returncode == 2
    # No option tells the export another time: nothing but the clock makes a period final.
    assert export(path, "--format", "json", "--now", "2099-01-01T00:00:00", month=current).returncode == 2

    # A redelivered event changes nothing. The April marker shares acme's
    # partition, so once it is in the ledger the duplicate before it was processed.
    await produce(config, [ACME_EVENTS[1], make_event("acme-april", "acme", input_tokens=1, output_tokens=1).model_copy(
        update={"time": datetime(2025, 4, 1, 1, tzinfo=UTC)})])
    wait_for(lambda: http_json(f"{config.services.worker_url}/usage?customer=acme&period=2025-04")[1]["events"] == 1,
             what="the April marker")
    again = export(path, "--format", "csv")
    assert again.returncode == 0, again.stderr
    assert again.stdout == EXPECTED_CSV

    # Without a worker the export opens the ledger read-only: same bytes.
    assert worker.stop(timeout_s=20, sig=signal.SIGTERM) == 0
    direct = export(path, "--format", "json")
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
    result = export(path, "--format", "csv", "--out", str(out))
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
    missing = export(env_path, "--format", "stripe", "--force")
    assert missing.returncode == 1 and "no Stripe customer for beta" in missing.stderr
