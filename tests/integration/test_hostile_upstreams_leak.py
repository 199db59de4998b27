"""10,000 requests to a hostile upstream (hostile_upstream.py), mixed, 50 at
a time, against one shim process: its descriptors, memory and threads do not
grow, every upstream answer is let go, and every request has exactly one
event, its reservation settled to its usage.

Its open descriptors minus its idle upstream connections are compared (the
idle pool, kept for reuse, varies with the run's last moments); the tasks of
this process (the hostile upstream's, the clients') likewise.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from pathlib import Path

import aiohttp
import pytest

from tests.integration import hostile_upstream as h
from tests.integration.enforcement_helpers import Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_hostile_upstreams import EXPECT, _raw, _shim, events_of, hostile, inflight  # noqa: F401

pytestmark = pytest.mark.whole_machine  # run alone by make test (pyproject.toml)

# The leak check's mix: every quick misbehaviour alike, and a few of the slow
# ones (10 MB answers, never-ending streams) in each run.
QUICK = ("invalid-json", "error-200", "json-as-text", "reset-json", "sse-garbage", "sse-no-usage", "sse-dup-usage",
         "sse-reset", "sse-as-json", "stream-json")
SLOW_EACH = {"big-json": 4, "sse-big-event": 4, "sse-keepalive-forever": 3, "sse-silent-forever": 3,
             "sse-data-forever": 3}
REQUESTS = 10_000
WARM_UP = 500
CONCURRENCY = 50


def _mix(total: int, rng: random.Random) -> list[str]:
    slow = [name for name, count in SLOW_EACH.items() for _ in range(count)]
    mix = slow + [QUICK[i % len(QUICK)] for i in range(total - len(slow))]
    rng.shuffle(mix)
    return mix


def _process(pid: int) -> tuple[int, int, int]:
    """Open descriptors, resident memory (KiB) and threads of a process."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return len(os.listdir(f"/proc/{pid}/fd")), int(status["VmRSS"].split()[0]), int(status["Threads"])


async def _load(shim: Shim, keys: dict[str, str], models: list[str]) -> dict[str, int]:
    """``models`` through the shim, CONCURRENCY at a time; the answers checked as they come."""
    queue = list(reversed(models))
    sent: dict[str, int] = {}
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=20)) as session:
        async def worker() -> None:
            while queue:
                model = queue.pop()
                seen = await _raw(session, shim, keys[model], model, EXPECT[model])
                assert (seen.status, seen.error_code) == (EXPECT[model].status, EXPECT[model].code), (model, seen)
                sent[model] = sent.get(model, 0) + 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return sent


async def test_ten_thousand_hostile_requests_leak_nothing(shim_factory: ShimFactory, hostile: h.Hostile) -> None:
    shim = await _shim(shim_factory, hostile)
    pid = shim.process.pid
    assert pid is not None
    rng = random.Random(7)
    names = [*QUICK, *SLOW_EACH]
    keys = {name: shim.new_key(f"leak-{name}", "roomy") for name in names}

    warm = await _load(shim, keys, _mix(WARM_UP, rng))
    await asyncio.sleep(0.5)  # closed connections reaped on both sides
    fds_0, rss_0, threads_0 = _process(pid)
    # Here, each connection the shim keeps to the upstream holds one server task.
    tasks_0, upstream_0 = len(asyncio.all_tasks()), hostile.connections

    started = time.monotonic()
    sent = await _load(shim, keys, _mix(REQUESTS, rng))
    sent = {name: sent.get(name, 0) + warm.get(name, 0) for name in names}
    elapsed = time.monotonic() - started
    await asyncio.sleep(0.5)
    fds_1, rss_1, threads_1 = _process(pid)
    tasks_1, upstream_1 = len(asyncio.all_tasks()), hostile.connections
    print(f"\n{REQUESTS} hostile requests, {CONCURRENCY} at a time, in {elapsed:.1f} s ({REQUESTS / elapsed:.0f}/s);"
          f" shim pid {pid}: fds {fds_0} -> {fds_1}, RSS {rss_0 / 1024:.1f} -> {rss_1 / 1024:.1f} MiB,"
          f" threads {threads_0} -> {threads_1}; shim's upstream connections {upstream_0} -> {upstream_1};"
          f" test-side asyncio tasks {tasks_0} -> {tasks_1};"
          f" upstream answers still open: {hostile.open_streams}")
    assert elapsed < 60
    # Its idle upstream connections (kept for reuse) vary with the run's last moments: the rest may not grow.
    assert fds_1 - upstream_1 <= fds_0 - upstream_0 + 5, (fds_0, upstream_0, fds_1, upstream_1)
    assert rss_1 - rss_0 < 50 * 1024, (rss_0, rss_1)
    assert threads_1 <= threads_0 + 2
    assert tasks_1 - upstream_1 <= tasks_0 - upstream_0 and hostile.open_streams == 0
    assert upstream_1 <= CONCURRENCY  # kept alive for reuse, never more than were ever busy at once

    # Exactly one event per request, each settled: reservations hold exactly the events' usage.
    total = WARM_UP + REQUESTS
    read_from = time.monotonic()
    events = await events_of(shim, total, settle_s=1.0)
    print(f"{total} events read in {time.monotonic() - read_from:.1f} s")
    assert len(events) == total and len({e.id for e in events}) == total
    for name in names:
        mine = [e for e in events if e.subject == f"leak-{name}"]
        used = [e.data.input_tokens + e.data.output_tokens for e in mine]
        assert len(mine) == sent[name], name
        tokens, _, pending = shim.reserved(f"leak-{name}")
        assert tokens == sum(used) and len(pending) == sum(1 for u in used if u), name
        assert inflight(shim, f"leak-{name}") == 0
