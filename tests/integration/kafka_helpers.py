"""Shared by the Kafka security and topic tests: a Tansu broker started with
extra flags, traffic through the shim, the ledger to the token, a worker
that must give up, and topics read back from the brokers."""

from __future__ import annotations

from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from quotameter.config import Config, Services
from quotameter.embedded.broker import broker_binary
from quotameter.embedded.procs import ManagedProcess
from quotameter.kafka_client import client_options
from tests.integration.enforcement_helpers import MESSAGES, Shim
from tests.integration.pipeline_helpers import wait_for
from tests.integration.test_ingest import ledger_rows

TIERS = {"open": {"monthly_tokens": 1_000_000}}
# A short session: a worker's first join takes about half of it.
FAST_JOIN = {"pipeline": {"session_timeout_s": 3}}
WORKER_EXIT_TIMEOUT_S = 30.0


def tansu(name: str, directory: Path, listen: int, advertised: int, *extra: str) -> ManagedProcess:
    argv = [broker_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{listen}",
            "--advertised-listener-url", f"tcp://127.0.0.1:{advertised}", *extra]
    process = ManagedProcess(name, argv, directory / f"{name}.log", env={"RUST_LOG": "warn"}).start()
    process.wait_port("127.0.0.1", listen, timeout_s=30)
    return process


async def describe(services: Services, names: list[str]) -> dict[str, list[int]]:
    """Each topic's replica count per partition, read back from the brokers."""
    admin = AIOKafkaAdminClient(**client_options(services))
    await admin.start()
    try:
        return {t["topic"]: [len(p["replicas"]) for p in t["partitions"]] for t in await admin.describe_topics(names)}
    finally:
        await admin.close()


async def list_topics(services: Services) -> set[str]:
    admin = AIOKafkaAdminClient(**client_options(services))
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


async def serve(shim: Shim, customer: str, count: int) -> list[tuple[int, int]]:
    """``count`` completions (every other one streamed) through the shim: the
    (prompt, completion) tokens the client was told of each."""
    key = shim.new_key(customer, "open")
    served: list[tuple[int, int]] = []
    async with shim.client(key) as client:
        for n in range(count):
            if n % 2:
                raw = await client.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=5 + n, stream=True,
                    stream_options={"include_usage": True})
                usage = [chunk.usage async for chunk in raw.parse() if chunk.usage][-1]
            else:
                raw = await client.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=5 + n)
                usage = raw.parse().usage
            assert raw.status_code == 200 and usage is not None
            served.append((usage.prompt_tokens, usage.completion_tokens))
    return served


def assert_ledger_holds(config: Config, customer: str, served: list[tuple[int, int]]) -> None:
    rows = wait_for(lambda: (r := ledger_rows(config, customer))["ids"] >= len(served) and r, 30.0,
                    f"{customer}'s {len(served)} events in the ledger")
    assert (rows["rows"], rows["ids"]) == (len(served), len(served))  # each once
    assert rows["input_tokens"] == sum(p for p, _ in served)
    assert rows["output_tokens"] == sum(c for _, c in served)


def worker_failure(cli_process, config_path: Path, name: str) -> str:
    """Start a worker that must give up: its exit code and what it said."""
    process = cli_process(name, "worker", config_path=config_path)
    wait_for(lambda: process.returncode is not None, WORKER_EXIT_TIMEOUT_S, f"{name} to give up")
    assert process.returncode == 1, process.log_tail()
    return process.log_path.read_text()


async def make_topics(services: Services, partitions: dict[str, int]) -> None:
    admin = AIOKafkaAdminClient(**client_options(services))
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, num_partitions=n, replication_factor=1) for name, n in partitions.items()])
    finally:
        await admin.close()
