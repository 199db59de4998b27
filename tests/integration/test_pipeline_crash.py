"""Exactness through crashes: SIGKILL the worker five times while events flow.

At the end the per-customer totals in the ledger, in Redis and in what was
produced match exactly, and the rollups match the ledger.
"""

from __future__ import annotations

import asyncio
import random
import signal
import time

import pytest

from tests.integration.pipeline_helpers import FAST_REJOIN, Traffic, assert_exact, start_worker

pytestmark = pytest.mark.whole_machine  # run alone by make test (pyproject.toml)


async def test_five_sigkills_while_events_flow_leave_every_total_exact(config_factory, cli_process) -> None:
    config, path = config_factory(FAST_REJOIN)
    began = time.monotonic()
    worker = start_worker(cli_process, config, path, "worker-0")
    traffic = Traffic(config)
    flowing = asyncio.ensure_future(traffic.run())
    rng = random.Random(3)
    for kill in range(1, 6):
        await asyncio.sleep(rng.uniform(1.0, 2.5))
        worker.proc.send_signal(signal.SIGKILL)
        worker.proc.wait(timeout=10)
        print(f"kill {kill}: {len(traffic.sent)} events produced so far")
        worker = await asyncio.to_thread(start_worker, cli_process, config, path, f"worker-{kill}")
    await asyncio.sleep(1.0)
    traffic.stop.set()
    await flowing

    unique = assert_exact(config, traffic.sent)
    print(f"{len(traffic.sent)} events ({unique} unique), 5 kills, exact; {time.monotonic() - began:.0f}s")
