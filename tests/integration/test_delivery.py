"""The ledger, not the broker, acknowledges an event (``shim.delivery: ledger``).

The embedded broker keeps records in memory only. Here the worker is down
while the shim serves requests, Kafka acknowledges their events, and then
the broker is SIGKILLed before any worker read them: the events now exist
only in the shim's spool. A broker and a worker start again, empty-handed;
the shim sends the events again once the ledger has lacked them for
``redeliver_after_ms``, and the ledger ends with every served request exactly
once, to the token.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from quotameter.config import Config
from quotameter.embedded.procs import free_port
from tests.integration.pipeline_helpers import FAST_REJOIN, http_json, start_worker
from tests.integration.test_spool import Broker, _health, _key

MESSAGES = [{"role": "user", "content": "Count."}]


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    broker = Broker(tmp_path)
    broker.start()
    yield broker
    if broker.proc is not None:
        broker.proc.stop()


async def _serve(config: Config, key: str, requests: int) -> list[tuple[int, int]]:
    """Send ``requests`` chat completions one after another; (input, output) tokens of each 200."""
    base = f"http://{config.shim.host}:{config.shim.port}/v1"
    served = []
    async with openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=20) as client:
        for n in range(requests):
            completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1 + n % 7)
            assert completion.usage is not None
            served.append((completion.usage.prompt_tokens, completion.usage.completion_tokens))
    return served


def _ledger_rows(config: Config, customer: str) -> dict[str, Any]:
    """The ledger's raw rows of a customer, duplicates included (no FINAL)."""
    status, body = http_json(
        f"{config.services.worker_url}/query",
        f"""SELECT count() AS rows, uniqExact(id) AS ids, countIf(status = 200) AS ok,
                   sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens
            FROM quotameter.events WHERE customer = '{customer}'""",
    )
    assert status == 200, body
    return {k: int(v) for k, v in body["rows"][0].items()}


async def _wait_depth(config: Config, depth: int, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        _, health = await _health(config)
        if health["events"]["spool"]["depth"] == depth or time.monotonic() > deadline:
            return health
        await asyncio.sleep(0.1)


async def test_events_the_broker_lost_reach_the_ledger_once(own_broker: Broker, cli_process, config_factory) -> None:
    # own_broker first: set up first, torn down last, after the processes that use it.
    mock_port = free_port()
    mock = cli_process("mock", "mock-llm", "--port", str(mock_port))
    config, path = config_factory({
        **FAST_REJOIN,
        "tiers": {"unlimited": {}},
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
        "services": {"kafka_bootstrap": own_broker.bootstrap},
        "shim": {"redeliver_after_ms": 2000},
    })
    assert config.shim.delivery == "ledger"  # the default
    await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
    worker = await asyncio.to_thread(start_worker, cli_process, config, path, "worker-1")
    shim = cli_process("shim", "proxy", config_path=path)
    await asyncio.to_thread(shim.wait_port, config.shim.host, config.shim.port)
    key = _key(config, "lost")

    # 1. The worker confirms: the spool empties once the ledger has the events.
    served = await _serve(config, key, 20)
    health = await _wait_depth(config, 0, 20)
    assert health["events"]["spool"]["depth"] == 0, health

    # 2. No worker: Kafka takes the events, the spool keeps them.
    worker.send_signal(signal.SIGKILL)
    worker.proc.wait(10)
    served += await _serve(config, key, 30)
    deadline = time.monotonic() + 20
    while (await _health(config))[1]["events"]["sent"] < 50 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    _, health = await _health(config)
    assert health["events"]["sent"] >= 50, health
    assert health["events"]["spool"]["depth"] == 30, health

    # 3. The broker dies with them; a new one and a new worker start empty.
    own_broker.kill()
    own_broker.start()
    await asyncio.to_thread(start_worker, cli_process, config, path, "worker-2")
    health = await _wait_depth(config, 0, 60)
    assert health["events"]["spool"]["depth"] == 0, health
    assert health["events"]["redelivered"] >= 1, health

    rows = _ledger_rows(config, "lost")
    print(f"served {len(served)}, ledger {rows}, redelivered {health['events']['redelivered']} times")
    assert rows == {
        "rows": 50, "ids": 50, "ok": 50,
        "input_tokens": sum(i for i, _ in served), "output_tokens": sum(o for _, o in served),
    }
