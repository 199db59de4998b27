"""Scale-out: two workers share the events topic's partitions and one ledger.

While events flow, a second worker joins (a clean rebalance), then the first
one is SIGKILLed (its partitions move once its session expires) and started
again (another rebalance). At the end the per-customer totals in the shared
ledger, in Redis and in what was produced match exactly, and the rollups
match the ledger. The ledger is one ``quotameter ledger-server`` (chDB behind
ClickHouse's HTTP interface), which both workers reach through
``services.history_url`` as they would a ClickHouse server.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import yaml

from pipeline.app import TOPIC_PARTITIONS
from pipeline.history.chdb_server import READY_LINE
from quotameter.config import Config, load_config
from quotameter.embedded.procs import free_port
from tests.integration.pipeline_helpers import FAST_REJOIN, Traffic, assert_exact, http_json, start_worker, wait_for


def second_worker_config(path: Path) -> tuple[Config, Path]:
    """The same config with the worker's own web port."""
    document = yaml.safe_load(path.read_text())
    document["services"]["worker_url"] = f"http://127.0.0.1:{free_port()}"
    second = path.with_name("config-b.yaml")
    second.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(second), second


def partitions_of(config: Config) -> int:
    """How many events topic partitions this worker processed a batch from since its start."""
    status, body = http_json(f"{config.services.worker_url}/stats")
    assert status == 200, body
    return len(body.get("partitions", []))


async def test_two_workers_share_partitions_through_rebalances_and_a_kill(config_factory, cli_process, tmp_path) -> None:
    port = free_port()
    ledger = cli_process("ledger", "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(port))
    ledger.wait_until(lambda: READY_LINE.format(host="127.0.0.1", port=port) in ledger.log_path.read_text(), 30, "the ledger server's ready line")
    config_a, path_a = config_factory(FAST_REJOIN | {"services": {"history_url": f"http://127.0.0.1:{port}"}})
    config_b, path_b = second_worker_config(path_a)

    began = time.monotonic()
    worker_a = start_worker(cli_process, config_a, path_a, "worker-a")
    traffic = Traffic(config_a)
    flowing = asyncio.ensure_future(traffic.run())
    await asyncio.sleep(2.0)

    worker_b = await asyncio.to_thread(start_worker, cli_process, config_b, path_b, "worker-b")
    # Both take part: the partitions are split between them.
    shares = await asyncio.to_thread(
        wait_for, lambda: min(s := (partitions_of(config_a), partitions_of(config_b))) >= 1 and s, 30, "both workers processing"
    )
    print(f"after B joined: A processed {shares[0]} partitions, B {shares[1]}")

    worker_a.proc.send_signal(signal.SIGKILL)
    worker_a.proc.wait(timeout=10)
    print(f"A killed: {len(traffic.sent)} events produced so far")
    # A's session expires; B takes every partition (the customers' keys cover all of them).
    await asyncio.to_thread(wait_for, lambda: partitions_of(config_b) == TOPIC_PARTITIONS, 30, "B to process every partition")
    worker_a = await asyncio.to_thread(start_worker, cli_process, config_a, path_a, "worker-a2")
    await asyncio.to_thread(wait_for, lambda: partitions_of(config_a) >= 1, 30, "the restarted A to take a share")
    traffic.stop.set()
    await flowing

    # The shared ledger is read through either worker.
    unique = assert_exact(config_b, traffic.sent)
    assert assert_exact(config_a, traffic.sent) == unique
    assert worker_b.alive() and worker_a.alive()
    print(f"{len(traffic.sent)} events ({unique} unique), 2 workers, 3 rebalances, exact; {time.monotonic() - began:.0f}s")
