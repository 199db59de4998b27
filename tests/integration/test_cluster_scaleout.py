"""Scale-out on one Redis Cluster: two shims and two workers share its state.

Clients (the openai SDK) spread their requests over both shims; both workers
share the events topic's partitions and one ledger (``quotameter
ledger-server``). At the end each customer's ledger totals and the period
totals in Redis equal, to the token, what the clients were served.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import yaml

from pipeline.history.chdb_server import READY_LINE
from quotameter.config import Config, load_config
from quotameter.embedded.procs import free_port
from quotameter.export import redis_totals
from tests.integration.enforcement_helpers import MESSAGES, Shim
from tests.integration.pipeline_helpers import FAST_REJOIN, http_json, start_worker, wait_for
from tests.integration.redis_cluster import RedisCluster, redis_cluster, spread  # noqa: F401
from tests.integration.test_pipeline_scaleout import partitions_of


@pytest.fixture(scope="module")
def redis_url(redis_cluster: RedisCluster) -> Iterator[str]:
    """Every config of this module points at the cluster."""
    yield redis_cluster.url


def second_config(path: Path) -> tuple[Config, Path]:
    """Shim B and worker B: their own ports, shim instance and spool."""
    document = yaml.safe_load(path.read_text())
    document["services"]["worker_url"] = f"http://127.0.0.1:{free_port()}"
    document["shim"] |= {"port": free_port(), "instance": document["shim"]["instance"] + "-b",
                         "spool_dir": document["shim"]["spool_dir"] + "-b"}
    second = path.with_name("config-b.yaml")
    second.write_text(yaml.safe_dump(document, sort_keys=False))
    return load_config(second), second


async def test_two_shims_and_two_workers_on_one_cluster_are_exact(
    config_factory, cli_process, redis_cluster: RedisCluster, tmp_path: Path,
) -> None:
    ledger_port, mock_port = free_port(), free_port()
    ledger = cli_process("ledger", "ledger-server", "--history-dir", str(tmp_path / "ledger"), "--port", str(ledger_port))
    mock = cli_process("mock", "mock-llm", "--port", str(mock_port))
    ledger.wait_until(lambda: READY_LINE.format(host="127.0.0.1", port=ledger_port) in ledger.log_path.read_text(),
                      30, "the ledger server's ready line")
    config_a, path_a = config_factory(FAST_REJOIN | {
        "services": {"history_url": f"http://127.0.0.1:{ledger_port}"},
        "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"},
        "tiers": {"open": {"requests_per_minute": 10_000}},
    })
    config_b, path_b = second_config(path_a)
    shims = []
    for name, config, path in (("shim-a", config_a, path_a), ("shim-b", config_b, path_b)):
        shims.append(Shim(config, cli_process(name, "proxy", config_path=path), path))
    mock.wait_port("127.0.0.1", mock_port)
    for shim in shims:
        shim.process.wait_port(shim.config.shim.host, shim.config.shim.port)
    await asyncio.gather(asyncio.to_thread(start_worker, cli_process, config_a, path_a, "worker-a"),
                         asyncio.to_thread(start_worker, cli_process, config_b, path_b, "worker-b"))

    customers = spread(redis_cluster, shims[0], "scaled") + spread(redis_cluster, shims[0], "grown")
    keys = {customer: shims[0].new_key(customer, "open") for customer in customers}
    served = {customer: 0 for customer in customers}
    requests = {customer: 0 for customer in customers}

    async def client_of(n: int, customer: str) -> None:
        for i in range(8):  # alternating shims: each customer's traffic crosses both
            shim = shims[(n + i) % 2]
            async with openai.AsyncOpenAI(base_url=shim.base_url, api_key=keys[customer], max_retries=0, timeout=20) as c:
                reply = await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2 + i)
            served[customer] += reply.usage.prompt_tokens + reply.usage.completion_tokens
            requests[customer] += 1

    await asyncio.gather(*(client_of(n, customer) for n, customer in enumerate(customers)))

    def ledger(config: Config, customer: str) -> dict:
        status, body = http_json(f"{config.services.worker_url}/usage?customer={customer}&period={shims[0].period()}",
                                 config=config)
        assert status == 200, body
        return body

    for customer in customers:  # the shared ledger, read through either worker
        for config in (config_a, config_b):
            usage = await asyncio.to_thread(wait_for, lambda c=customer, cfg=config: (u := ledger(cfg, c))["requests"]
                                            == requests[c] and u, 30, f"{customer} in the ledger")
            assert usage["input_tokens"] + usage["output_tokens"] == served[customer]
    in_redis = await asyncio.to_thread(wait_for, lambda: (t := redis_totals(config_a, shims[0].period())) and all(
        int(t.get(c, {}).get("requests", -1)) == requests[c] for c in customers) and t, 30, "the totals in Redis")
    for customer in customers:
        assert int(in_redis[customer]["input_tokens"]) + int(in_redis[customer]["output_tokens"]) == served[customer]
    # Both workers took part.
    assert partitions_of(config_a) >= 1 and partitions_of(config_b) >= 1
    print(f"{sum(requests.values())} requests over 2 shims, {len(customers)} customers on 3 primaries, exact")
