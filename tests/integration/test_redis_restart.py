"""Redis restarted with less than it had: the worker writes the quota state again.

The test's own redis-server keeps nothing (no snapshot, no append-only file),
the worst a restart can do. After it comes back empty, and with no new event
arriving, the worker must notice the new ``run_id`` and write the current
period's totals from the ledger.
"""

from __future__ import annotations

import asyncio
import signal
from datetime import UTC, datetime
from pathlib import Path

from quotameter.embedded.procs import free_port
from quotameter.embedded.redis_server import redis_process
from tests.integration.pipeline_helpers import FAST_REJOIN, make_event, produce, redis_usage, start_worker, wait_for


async def test_worker_rewrites_the_quota_state_after_redis_restarts_empty(cli_process, config_factory, tmp_path: Path) -> None:
    port = free_port()
    own = redis_process(port, tmp_path / "own-redis", tmp_path / "own-redis.log", persist=False).start()
    try:
        await asyncio.to_thread(own.wait_port, "127.0.0.1", port)
        config, path = config_factory({**FAST_REJOIN, "services": {"redis_url": f"redis://127.0.0.1:{port}/0"}})
        await asyncio.to_thread(start_worker, cli_process, config, path, "worker")
        now = datetime.now(UTC)
        period = config.billing.calendar.period_of(now)
        events = [make_event(f"rr-{n}", "rr", input_tokens=100 + n, output_tokens=10).model_copy(update={"time": now})
                  for n in range(5)]
        await produce(config, events)
        before = await asyncio.to_thread(
            wait_for, lambda: (u := redis_usage(config, "rr", period)).get("events") == "5" and u, 30, "the totals in Redis"
        )
        assert before["input_tokens"] == str(sum(100 + n for n in range(5)))

        own.send_signal(signal.SIGKILL)
        own.proc.wait(10)
        own = redis_process(port, tmp_path / "own-redis", tmp_path / "own-redis.log", persist=False).start()
        await asyncio.to_thread(own.wait_port, "127.0.0.1", port)
        assert redis_usage(config, "rr", period) == {}  # came back empty

        after = await asyncio.to_thread(
            wait_for, lambda: (u := redis_usage(config, "rr", period)).get("events") == "5" and u, 30,
            "the worker to write the totals again",
        )
        fields = ("requests", "input_tokens", "output_tokens", "cost_usd", "events")
        assert {f: after[f] for f in fields} == {f: before[f] for f in fields}
    finally:
        own.stop()
