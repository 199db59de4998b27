"""quotameter behind Redis Sentinel: the shim and the worker know only the
sentinel's address, find the master through it, and follow a failover."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest
import redis

from quotameter.redis_keys import RedisKeys
from tests.integration.enforcement_helpers import MESSAGES
from tests.integration.pipeline_helpers import http_json, wait_for
from tests.integration.redis_cluster import RedisSentinel, Stack, redis_sentinel, start_stack  # noqa: F401

TIERS = {"metered": {"requests_per_minute": 100, "monthly_tokens": 100_000}}


@pytest.fixture(scope="module")
def stack(redis_sentinel: RedisSentinel, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("sentinel-stack"), redis_sentinel.url, kafka_bootstrap, {"tiers": TIERS})
    yield started
    started.stop()


def on_node(port: int) -> redis.Redis:
    return redis.Redis(port=port, decode_responses=True, socket_timeout=5)


async def serve(stack: Stack, key: str, count: int) -> int:
    """``count`` requests through the shim; the tokens the client was served."""
    served = 0
    async with stack.shim.client(key) as client:
        for i in range(count):
            reply = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3 + i)
            served += reply.usage.prompt_tokens + reply.usage.completion_tokens
    return served


def usage_on(port: int, names: RedisKeys, customer: str, period: str) -> dict[str, str]:
    client = on_node(port)
    try:
        return client.hgetall(names.usage(customer, period))
    finally:
        client.close()


def ledger_tokens(stack: Stack, customer: str) -> int:
    status, body = http_json(f"{stack.config.services.worker_url}/usage?customer={customer}&period={stack.shim.period()}",
                             config=stack.config)
    assert status == 200, body
    return body["input_tokens"] + body["output_tokens"]


async def test_admission_and_the_workers_writes_go_to_the_master_and_follow_a_failover(
    stack: Stack, redis_sentinel: RedisSentinel,
) -> None:
    shim, names, period = stack.shim, stack.shim.names, stack.shim.period()
    assert "127.0.0.1:%d" % redis_sentinel.master_port not in stack.config.services.redis_url  # only the sentinel
    key = shim.new_key("watched", "metered")
    served = await serve(stack, key, 3)
    master = redis_sentinel.master_port
    # The admission's rate state and the worker's totals are on the master the sentinel named.
    client = on_node(master)
    try:
        before = float(client.get(names.requests_per_minute("watched")))  # GCRA: the theoretical arrival time
    finally:
        client.close()
    state = wait_for(lambda: (u := usage_on(master, names, "watched", period)).get("events") == "3" and u,
                     timeout_s=30, what="the worker's totals on the master")
    assert int(state["input_tokens"]) + int(state["output_tokens"]) == served
    wait_for(lambda: ledger_tokens(stack, "watched") == served, timeout_s=30, what="the ledger")

    promoted = redis_sentinel.fail_over()
    assert promoted == redis_sentinel.replica_port
    # The old master is a replica now (read-only): clients that ask it are told to find the new one.
    more = 0
    deadline = asyncio.get_running_loop().time() + 30
    new_state: dict[str, str] = {}
    while True:
        try:
            more += await serve(stack, key, 1)
        except openai.APIStatusError:
            pass  # a request caught in the switch: the fail mode answers it
        new_state = usage_on(promoted, names, "watched", period)
        if int(new_state.get("events", 0)) >= 4:  # the worker wrote a total past the failover
            break
        assert asyncio.get_running_loop().time() < deadline, f"no write reached the new master: {new_state}"
        await asyncio.sleep(0.5)
    # Admission writes on the new master: its rate state moved on from what was replicated.
    client = on_node(promoted)
    try:
        assert client.info("replication")["role"] == "master"
        # The rate state expires once idle for its interval (0.6 s here): read it right after an
        # admission. A shim whose call failed in the switch skips Redis for REDIS_RETRY_S (its fail
        # mode admits meanwhile), and a busy machine may answer later than 0.6 s: ask again until then.
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            more += await serve(stack, key, 1)
            state = client.get(names.requests_per_minute("watched"))
            if state is not None or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.3)
        assert state is not None and float(state) > before, f"no admission on the new master: {state!r}"
    finally:
        client.close()
    # Traffic stopped: the ledger and the new master's totals hold exactly what was served.
    wait_for(lambda: ledger_tokens(stack, "watched") == served + more, timeout_s=30, what="the ledger")
    new_state = wait_for(lambda: (u := usage_on(promoted, names, "watched", period)) and
                         int(u["input_tokens"]) + int(u["output_tokens"]) == served + more and u,
                         timeout_s=30, what="the totals on the new master")
    assert more > 0
