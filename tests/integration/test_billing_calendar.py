"""One billing calendar in every reader: events a minute either side of period
boundaries, through the real shim, worker, Redis and ledger, land in the same
period wherever they are read — the shim's enforcement, the worker's window
totals in Redis, the ledger's period totals, ``quotameter usage``,
``/v1/usage`` and the export, which reconciles them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import openai
import pytest

from pipeline.history.reader import ledger_usage
from quotameter.events import UsageEvent
from quotameter.export import run_export
from tests.integration.enforcement_helpers import shim_factory  # noqa: F401 - fixture
from tests.integration.pipeline_helpers import http_json, make_event, produce, redis_usage, start_worker, wait_for

ADMIN = "admin-token-for-calendar-tests"
QUOTA = 1000  # tokens per period: the current period's events use exactly this much


def at(event: UsageEvent, moment: datetime) -> UsageEvent:
    return event.model_copy(update={"time": moment})


def usage_command(path: Path, *args: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "quotameter", "usage", "--customer", "acme", "--json", *args],
        env={**os.environ, "QUOTAMETER_CONFIG": str(path)}, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


async def v1_usage(base_url: str, query: str) -> dict:
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base_url}/usage?customer=acme{query}", headers={"Authorization": f"Bearer {ADMIN}"}) as response:
            assert response.status == 200, await response.text()
            return await response.json()


@pytest.mark.parametrize(
    ("zone", "anchor"),
    [
        ("America/New_York", 15),  # the reported case: December 1 belongs to the period named 2026-11
        ("Asia/Kolkata", 31),  # +5:30, and anchor 31 clamped in 30-day months
        ("Pacific/Kiritimati", 1),  # +14: the period starts the UTC day before
    ],
)
async def test_every_reader_puts_boundary_events_in_the_same_period(
    shim_factory, cli_process, tmp_path: Path, zone: str, anchor: int  # noqa: F811
) -> None:
    shim = await shim_factory(
        {"pro": {"monthly_tokens": QUOTA}},
        shim={"admin_token": ADMIN},
        billing={"timezone": zone, "anchor_day": anchor},
    )
    config, path = shim.config, tmp_path / "config.yaml"
    calendar = config.billing.calendar
    current = calendar.current(datetime.now(UTC))
    previous = calendar.previous(current)
    oldest = calendar.previous(previous)
    current_start, current_end = calendar.bounds(current)
    previous_start, _ = calendar.bounds(previous)
    minute = timedelta(minutes=1)
    # Input tokens 1, 10, 100, 1000: each period's total says which events it holds.
    events = [
        at(make_event("cal-0", "acme", input_tokens=1), previous_start - minute),
        at(make_event("cal-1", "acme", input_tokens=10), previous_start + minute),
        at(make_event("cal-2", "acme", input_tokens=100), current_start - minute),
        at(make_event("cal-3", "acme", input_tokens=QUOTA), current_start + minute),
    ]
    expected = {oldest: 1, previous: 110, current: QUOTA}

    start_worker(cli_process, config, path, "worker")
    await produce(config, events)

    # The worker's window totals in Redis and the ledger's period totals (its /usage and the reader).
    for period, tokens in expected.items():
        wait_for(lambda p=period, t=tokens: redis_usage(config, "acme", p).get("input_tokens") == str(t),
                 what=f"Redis totals of {period}")
        wait_for(lambda p=period, t=tokens: http_json(f"{config.services.worker_url}/usage?customer=acme&period={p}")[1]
                 .get("input_tokens") == t, what=f"ledger totals of {period}")
        assert ledger_usage(config, "acme", period)["input_tokens"] == tokens
    assert calendar.next(current) not in {calendar.period_of(e.time) for e in events}

    # quotameter usage: the current period by default, both sides agreeing.
    report = usage_command(path)
    assert report["period"] == current and report["in_sync"] and report["ledger"]["input_tokens"] == str(QUOTA)
    report = usage_command(path, "--month", previous)
    assert report["period"] == previous and report["in_sync"] and report["redis"]["input_tokens"] == "110"

    # /v1/usage: the same periods.
    body = await v1_usage(shim.base_url, "")
    assert (body["period"], body["usage"]["input_tokens"]) == (current, QUOTA)
    assert body["period_start"] == current_start.isoformat() and body["period_end"] == current_end.isoformat()
    body = await v1_usage(shim.base_url, f"&period={previous}")
    assert (body["period"], body["usage"]["input_tokens"]) == (previous, 110)

    # The shim enforces on the same period: its quota is used up, and it resets at the period's end.
    client = shim.client(shim.new_key("acme", "pro"))
    with pytest.raises(openai.RateLimitError) as refused:
        await client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "hi"}], max_tokens=5)
    await client.close()
    assert refused.value.code == "insufficient_quota"
    assert f"resets at {current_end.strftime('%Y-%m-%d %H:%M')} UTC" in refused.value.message

    # The export of each closed period reconciles the ledger, its lines and Redis (it raises otherwise).
    for period in (oldest, previous):
        _, end = calendar.bounds(period)
        result = run_export(config, period, "json", end + timedelta(hours=49))
        document = json.loads(result.text)
        assert document["final"] and document["period_start"] == calendar.bounds(period)[0].isoformat()
        assert [c["tokens"]["input"] for c in document["customers"]] == [expected[period]]
