"""quotameter on a real three-primary Redis Cluster: the enforcement suite's
core cases through the real shim and the openai client, keys and exports over
every primary, the 100-client race, and the pipelined script path following
the cluster's MOVED and ASK redirections."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal

import openai
import pytest
from redis.crc import key_slot

from gateway_shim.cluster_pipe import ClusterScriptPipe, script_pipe
from gateway_shim.resp import Script, encode_args
from gateway_shim.shared_queue import SharedQueue
from quotameter.export import redis_totals, run_export
from quotameter.pricing import PriceTable
from quotameter.redis_pool import redis_client, warm
from tests.integration.enforcement_helpers import (
    MESSAGES,
    PROMPT_TOKENS,
    until_a_slot_is_free,
)
from tests.integration.pipeline_helpers import http_json, wait_for
from tests.integration.redis_cluster import (  # noqa: F401
    RedisCluster,
    Stack,
    redis_cluster,
    spread,
    start_stack,
)
from tests.integration.test_enforcement_race import (
    BUDGET_USD,
    PRICES,
    QUOTA_TOKENS,
    _events,
    _race,
)

TIERS = {
    "open": {},
    "metered": {"requests_per_minute": 2, "upgrade_hint": "Upgrade to Pro."},
    "single": {"concurrent_requests": 1},
    "quota": {"monthly_tokens": 1000, "upgrade_hint": "Upgrade to Enterprise."},
    "prepaid": {"monthly_budget_usd": "0.001", "quota_status": 402},
    "tight": {"monthly_tokens": QUOTA_TOKENS},
    "broke": {"monthly_budget_usd": BUDGET_USD},
}


@pytest.fixture(scope="module")
def stack(redis_cluster: RedisCluster, kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    started = start_stack(tmp_path_factory.mktemp("cluster-stack"), redis_cluster.url, kafka_bootstrap,
                          {"tiers": TIERS, "prices": PRICES}, token_delay_ms=5)
    yield started
    started.stop()


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "quotameter", *args, "--config", str(stack.shim.config_path)],
                          capture_output=True, text=True, timeout=30)


def ledger_usage(stack: Stack, customer: str) -> dict:
    status, body = http_json(f"{stack.config.services.worker_url}/usage?customer={customer}&period={stack.shim.period()}",
                             config=stack.config)
    assert status == 200, body
    return body


async def test_hundred_clients_never_pass_quota_or_budget(stack: Stack) -> None:
    shim = stack.shim
    tokens_admitted = await _race(shim, "racer", "tight", "mock-small")
    budget_admitted = await _race(shim, "pauper", "broke", "mock-large")
    assert 0 < sum(tokens_admitted) < 100 and 0 < sum(budget_admitted) < 100
    # The module's first traffic (this test runs first): the topic holds these 200 events.
    events = await _events(shim, 200)
    admitted = [e for e in events if e.data.decision == "admitted"]
    racer = [e.data for e in admitted if e.subject == "racer"]
    pauper = [e for e in admitted if e.subject == "pauper"]
    assert len(racer) == sum(tokens_admitted) and len(pauper) == sum(budget_admitted)
    used_tokens = sum(d.input_tokens + d.output_tokens for d in racer)
    prices = PriceTable(shim.config.prices)
    spent = sum(prices.cost("mock-large", e.time.date(), input_tokens=e.data.input_tokens,
                            output_tokens=e.data.output_tokens).usd for e in pauper)
    print(f"cluster: quota {QUOTA_TOKENS}: used {used_tokens} by {len(racer)}; budget {BUDGET_USD}: spent {spent}")
    assert QUOTA_TOKENS - (PROMPT_TOKENS + 26) < used_tokens <= QUOTA_TOKENS
    assert spent <= Decimal(BUDGET_USD)
    # The ledger holds exactly what was served, and so do the worker's totals in Redis.
    usage = wait_for(lambda: (u := ledger_usage(stack, "racer"))["requests"] >= len(racer) and u, timeout_s=30,
                     what="the race in the ledger")
    assert usage["input_tokens"] + usage["output_tokens"] == used_tokens
    state = wait_for(lambda: (t := redis_totals(stack.config, shim.period()).get("racer")) and
                     int(t["requests"]) == len(racer) and t, timeout_s=20, what="the race's totals in Redis")
    assert int(state["input_tokens"]) + int(state["output_tokens"]) == used_tokens
    assert wait_for(lambda: shim.reserved("racer") == (0, 0, {}), timeout_s=20, what="reservations released")


def test_keys_are_created_listed_and_flagged_over_every_primary(stack: Stack, redis_cluster: RedisCluster) -> None:
    shim, names = stack.shim, stack.shim.names
    customers = spread(redis_cluster, shim, "lister")
    key_ids: dict[str, str] = {}
    for attempt in range(60):  # until the keys' own hashes (slot = key id) sit on every primary too
        customer = customers[attempt % 3]
        key_ids[shim.new_key(customer, "open").split("_")[1]] = customer
        if attempt >= 2 and all(redis_cluster.keys_per_node(f"{names.prefix}:key:*").values()):
            break
    per_node = redis_cluster.keys_per_node(f"{names.prefix}:key:*")
    assert all(per_node.values()), per_node
    for customer in customers:  # each customer's revoked flags sit in the customer's own slot
        assert redis_cluster.primary_of(names.revoked(customer)) == redis_cluster.primary_of(names.usage(customer, "x"))
    assert len({redis_cluster.primary_of(names.revoked(c)) for c in customers}) == 3
    listed = cli(stack, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in listed.stdout.splitlines()}
    assert {k: rows[k][0] for k in key_ids} == key_ids and all(rows[k][2] == "active" for k in key_ids)


async def test_rate_limit_answers_429_with_headers_on_every_primary(stack: Stack, redis_cluster: RedisCluster) -> None:
    shim = stack.shim
    for customer in spread(redis_cluster, shim, "rated"):
        async with shim.client(shim.new_key(customer, "metered")) as client:
            for left in ("1", "0"):
                raw = await client.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=1)
                assert (raw.headers["x-ratelimit-limit-requests"], raw.headers["x-ratelimit-remaining-requests"]) == ("2", left)
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            error = refused.value
            assert error.code == "rate_limit_exceeded" and "2 requests per minute" in error.message
            assert "Upgrade to Pro." in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"


async def test_period_quota_budget_and_concurrency(stack: Stack, redis_cluster: RedisCluster) -> None:
    shim = stack.shim
    heavy, spender, busy = spread(redis_cluster, shim, "limited")
    shim.set_totals(heavy, tokens=990)
    async with shim.client(shim.new_key(heavy, "quota")) as client:
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=50)
        assert refused.value.code == "insufficient_quota"
        assert "1000 tokens per billing period" in refused.value.message
        assert '"period-tokens";r=10;' in refused.value.response.headers["RateLimit"]
    shim.set_totals(spender, micro_usd=1000)
    async with shim.client(shim.new_key(spender, "prepaid")) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model="mock-large", messages=MESSAGES, max_tokens=5)  # priced
        assert refused.value.status_code == 402 and "spent $0.001" in refused.value.message
    async with shim.client(shim.new_key(busy, "single")) as client:
        stream = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=40, stream=True)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert "1 concurrent requests (in flight: 1)" in refused.value.message
        _ = [chunk async for chunk in stream]
        await until_a_slot_is_free(client)  # the slot comes back when the stream's end is settled


async def test_revocation_holds_at_once_and_keys_from_before_still_work(stack: Stack, redis_cluster: RedisCluster) -> None:
    shim, names = stack.shim, stack.shim.names
    customer = spread(redis_cluster, shim, "revoker")[1]
    key = shim.new_key(customer, "open")
    old = shim.new_key(customer, "open")
    client_redis = shim.redis()
    try:
        # A key stored before the flags were mirrored per customer: no entry in the mirror.
        assert client_redis.hdel(names.revoked(customer), old.split("_")[1]) == 1
        async with shim.client(key) as current, shim.client(old) as before:
            await current.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            await before.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            # Its first admission copied its flag over.
            assert client_redis.hget(names.revoked(customer), old.split("_")[1]) == "0"
            for presented, client in ((key, current), (old, before)):
                revoked = cli(stack, "keys", "revoke", presented.split("_")[1])
                assert revoked.returncode == 0, revoked.stderr
                # The shim still holds the key's record in its cache: the script refuses it.
                with pytest.raises(openai.AuthenticationError):
                    await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
    finally:
        client_redis.close()


async def test_served_usage_reaches_ledger_redis_and_export_exactly(stack: Stack, redis_cluster: RedisCluster) -> None:
    shim = stack.shim
    customers = spread(redis_cluster, shim, "payer")
    served: dict[str, int] = {}
    for n, customer in enumerate(customers):
        async with shim.client(shim.new_key(customer, "open")) as client:
            for i in range(3 + n):
                reply = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5 + i)
                served[customer] = served.get(customer, 0) + reply.usage.prompt_tokens + reply.usage.completion_tokens
    for n, customer in enumerate(customers):
        usage = wait_for(lambda c=customer, k=3 + n: (u := ledger_usage(stack, c))["events"] >= k and u,
                         timeout_s=30, what=f"{customer} in the ledger")
        assert usage["input_tokens"] + usage["output_tokens"] == served[customer]
    period = shim.period()
    in_redis = wait_for(lambda: (t := redis_totals(stack.config, period)) and all(
        c in t and int(t[c]["events"]) == 3 + n for n, c in enumerate(customers)) and t, timeout_s=20,
        what="the worker's totals in Redis")
    for customer in customers:  # read back from all three primaries by a scan of each
        assert int(in_redis[customer]["input_tokens"]) + int(in_redis[customer]["output_tokens"]) == served[customer]
    # `quotameter usage`: the ledger beside Redis, for a customer on another primary than the first node.
    report = cli(stack, "usage", "--customer", customers[2], "--json")
    assert report.returncode == 0, report.stderr
    shown = json.loads(report.stdout)
    assert shown["in_sync"] and int(shown["redis"]["input_tokens"]) + int(shown["redis"]["output_tokens"]) == served[customers[2]]
    # The export reconciles the ledger with Redis (it raises when they differ).
    document = run_export(stack.config, period, "json", datetime.now(UTC), draft=True)
    lines = {c["customer"]: c for c in json.loads(document.text)["customers"]}
    assert set(customers) <= set(lines)


async def test_the_pipe_follows_moved_and_ask(redis_cluster: RedisCluster) -> None:
    """The shim's pipelined path with a stale slot map, and across a migrating slot."""
    script = Script("return {redis.call('INCR', KEYS[1]), KEYS[1]}")
    pipe = ClusterScriptPipe.from_url(redis_cluster.url)
    assert pipe is not None and ClusterScriptPipe.from_url("redis://127.0.0.1:1/0") is None
    key = "pipe-test:{moved}"
    owner = redis_cluster.primary_of(key)
    other = next(p for p in redis_cluster.ports if p != owner)

    async def incr(name: str) -> int:
        reply = await pipe.evalsha(script, 1, encode_args([name]), b"", 1, slot_key=name)
        return int(reply[0])

    try:
        await pipe.refresh()
        slot = key_slot(key.encode())
        pipe._slots[slot] = ("127.0.0.1", other)  # stale: the slot lives elsewhere
        assert [await incr(key) for _ in range(3)] == [1, 2, 3]
        await asyncio.sleep(0.2)  # the background refresh after MOVED
        assert pipe._slots[slot] == ("127.0.0.1", owner)
        # A slot migrating from its owner to another primary: a key not on the owner gets ASK.
        ids = {port: redis_cluster.node(port).execute_command("CLUSTER MYID") for port in (owner, other)}
        source, target = redis_cluster.node(owner), redis_cluster.node(other)
        target.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[owner])
        source.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[other])
        try:
            fresh = "pipe-test-new:{moved}"
            assert await incr(fresh) == 1
            assert target.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 1  # written on the target, after ASKING
            assert await incr(key) == 4  # an existing key is still served by its owner
        finally:
            with target.pipeline(transaction=False) as cleanup:  # one connection: ASKING holds for the DEL
                cleanup.execute_command("ASKING")
                cleanup.delete("pipe-test-new:{moved}")
                cleanup.execute()
            for node in (source, target):
                node.execute_command("CLUSTER SETSLOT", slot, "STABLE")
            source.close()
            target.close()
    finally:
        await pipe.close()


class _Woken:
    """Stands in for a shim's BatchQueue: records the customers it is woken for."""

    def __init__(self) -> None:
        self.customers: list[str] = []

    def released(self, customer: str) -> None:
        self.customers.append(customer)


async def test_the_batch_line_and_its_wake_ups_span_the_cluster(stack: Stack, redis_cluster: RedisCluster) -> None:
    """Two replicas' shared queues on the cluster: one line per customer whatever
    primary holds it, and a departure or a settle on one shim wakes the other."""
    services = stack.config.services
    queues, woken, closers = [], [], []
    for instance in ("shim-a", "shim-b"):
        client = redis_client(services)
        await warm(client)
        pipe = script_pipe(services.redis_url)
        queue, seen = SharedQueue(client, stack.shim.names, instance, pipe), _Woken()
        queue.start(seen)  # type: ignore[arg-type]
        queues.append(queue)
        woken.append(seen)
        closers.append((queue, client, pipe))
    a, b = queues
    try:
        await asyncio.sleep(0.5)  # both subscribed
        customers = spread(redis_cluster, stack.shim, "liner")
        now_ms = int(time.time() * 1000)

        async def wakes_both(customer: str, step) -> None:
            before = [seen.customers.count(customer) for seen in woken]
            await step
            for _ in range(40):  # a publish reaches both shims at once, not by their 0.25 s polling
                if all(seen.customers.count(customer) > n for seen, n in zip(woken, before, strict=True)):
                    return
                await asyncio.sleep(0.025)
            raise AssertionError(f"no wake-up for {customer} on both shims within 1 s")

        for customer in customers:
            first, second = await a.join(customer, 5), await b.join(customer, 5)
            assert first and second
            assert await a.is_head(customer, first) and not await b.is_head(customer, second)
            await wakes_both(customer, a.leave(customer, first))
            assert await b.is_head(customer, second)
            await wakes_both(customer, b.leave(customer, second))
            assert await a.mark_running(customer, f"{customer}-e1", now_ms + 60_000)
            assert await b.running(customer, now_ms) == 1  # running on shim a, seen from shim b
            await wakes_both(customer, a.settled(customer, f"{customer}-e1"))
            assert await b.running(customer, now_ms) == 0
    finally:
        for queue, client, pipe in closers:
            await queue.close()
            await client.aclose()
            if pipe is not None:
                await pipe.close()
