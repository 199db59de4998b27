"""Two shim replicas sharing one Redis (one broker, one worker, one mock).

- A batch request over its quota on shim B waits for a reservation held by a
  request running on shim A, and is served once it settles; the customer's
  batch line keeps its arrival order across the shims, and the place of a
  shim that died waiting lapses at its deadline.
- Redis stopped by PID: each shim holds the period quota from the last usage
  Redis reported to it plus what it admitted since, refuses past it, and the
  overshoot is exactly the bound the README states; after the restart the
  ledger and the quota state hold every request to the token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import openai
import pytest
import pytest_asyncio

from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.embedded.redis_server import redis_process
from quotameter.tokens import count_prompt
from tests.conftest import make_config
from tests.integration.enforcement_helpers import MESSAGES, Shim
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_ingest import ledger_rows

PROMPT = count_prompt({"messages": MESSAGES}, "mock-small")
# Without max_tokens a request reserves the tier's default cap (50 output
# tokens) and the mock answers 16: it settles 34 below its reservation.
RESERVED_OUT, ANSWERED_OUT = 50, 16
BATCH_QUOTA = 2 * PROMPT + RESERVED_OUT + ANSWERED_OUT + 10  # a second request fits once the first settled
# max_tokens=1: each request reserves and uses PROMPT + 1 tokens.
EACH = PROMPT + 1
SEEN_A, SEEN_B = 2 * EACH, 3 * EACH  # the usage each shim last saw before the outage
OUTAGE_QUOTA = SEEN_B + 5 * EACH  # five more requests fit in truth
# mock-small at $0.10 / $0.40 per 1M tokens: a request reserves its input's
# cost rounded up (2 micro-USD) + 1 output token's (1), and costs 1.5 (2 rounded up).
RESERVE_MICRO, COST_MICRO, COST_USD = 3, 2, Decimal("0.0000015")
BUDGET_MICRO = 20
TIERS = {
    "batchquota": {"monthly_tokens": BATCH_QUOTA, "default_max_tokens": RESERVED_OUT, "queue": {"max_wait_s": 10}},
    "frugal": {"monthly_tokens": OUTAGE_QUOTA, "requests_per_minute": 1000},  # fails open (the default)
    "thrifty": {"monthly_budget_usd": str(Decimal(BUDGET_MICRO) / 1_000_000), "requests_per_minute": 1000},
}
TOKEN_DELAY_MS = 100  # a 16-token answer streams for ~1.6 s


@dataclass
class Replicas:
    a: Shim
    b: Shim
    redis: list[ManagedProcess]  # the running redis-server last
    redis_port: int
    worker: ManagedProcess
    directory: Path
    started: list[ManagedProcess]  # every process of the module, stopped last-first


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("two-shims")


@pytest_asyncio.fixture(scope="module")
async def replicas(module_dir: Path, kafka_bootstrap: str) -> AsyncIterator[Replicas]:
    started: list[ManagedProcess] = []
    redis_port = free_port()
    redis_proc = redis_process(redis_port, module_dir / "redis", module_dir / "redis-1.log", persist=True).start()
    started.append(redis_proc)
    try:
        redis_proc.wait_port("127.0.0.1", redis_port, timeout_s=20)
        mock_port = free_port()
        mock = _cli("mock", module_dir, ["mock-llm", "--port", str(mock_port), "--token-delay-ms", str(TOKEN_DELAY_MS)])
        started.append(mock)
        unique = module_dir.name.replace("-", "")[-10:]
        shims = []
        for name in ("a", "b"):
            directory = module_dir / name
            directory.mkdir()
            config, path = make_config(directory, f"redis://127.0.0.1:{redis_port}/0", kafka_bootstrap, unique, {
                "upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "tiers": TIERS,
                "shim": {"delivery": "broker", "instance": f"shim-{name}"},
            })
            process = _cli(f"shim-{name}", module_dir, ["proxy"], path)
            started.append(process)
            shims.append(Shim(config, process, path))
        await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
        for shim in shims:
            await asyncio.to_thread(shim.process.wait_port, shim.config.shim.host, shim.config.shim.port)
        worker = await asyncio.to_thread(
            start_worker, lambda name, *args, config_path: _started(started, _cli(name, module_dir, list(args), config_path)),
            shims[0].config, shims[0].config_path, "worker",
        )
        yield Replicas(shims[0], shims[1], [redis_proc], redis_port, worker, module_dir, started)
    finally:
        for proc in reversed(started):
            proc.stop()


def _cli(name: str, directory: Path, args: list[str], config_path: Path | None = None) -> ManagedProcess:
    import sys

    env = {"QUOTAMETER_CONFIG": str(config_path)} if config_path else {}
    return ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], directory / f"{name}.log", env=env).start()


def _started(started: list[ManagedProcess], proc: ManagedProcess) -> ManagedProcess:
    started.append(proc)
    return proc


def _used(shim: Shim, customer: str) -> int:
    """The customer's period tokens as admission counts them: the pipeline's totals + reservations."""
    client = shim.redis()
    try:
        totals = client.hgetall(shim.names.usage(customer, shim.period()))
    finally:
        client.close()
    held, _, _ = shim.reserved(customer)
    return int(totals.get("input_tokens", 0)) + int(totals.get("output_tokens", 0)) + held


async def test_batch_on_one_shim_waits_for_a_request_running_on_the_other(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    interactive = a.new_key("nightly", "batchquota")
    batch = a.new_key("nightly", "batchquota", priority="batch")
    client = a.redis()
    try:  # the place of a shim that died waiting, long past its deadline: it blocks no one
        client.zadd(a.names.batch_line("nightly"), {"1000:shim-gone:1": 0})
    finally:
        client.close()
    async with a.client(interactive) as on_a, b.client(batch) as batch_on_b, a.client(batch) as batch_on_a:
        stream = await on_a.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)
        streaming_from = time.monotonic()  # the mock sleeps TOKEN_DELAY_MS before each of its 16 tokens
        running = asyncio.create_task(_drain(stream))
        await asyncio.sleep(0.2)
        first = asyncio.create_task(_timed(batch_on_b.chat.completions.create(model="mock-small", messages=MESSAGES)))
        await asyncio.sleep(0.4)  # the second batch request arrives later, on the shim where the first one settles
        second = asyncio.create_task(_timed(batch_on_a.chat.completions.create(model="mock-small", messages=MESSAGES)))
        await running
        first_done, completion = await first
        _, refused = await second

    # Served on B once the request on A settled; the one behind it in line waited
    # its turn, then for the first to settle, and is refused as the quota once
    # nothing running can free it.
    assert isinstance(completion, openai.types.chat.ChatCompletion), f"the first in line was refused: {completion}"
    assert completion.usage is not None and completion.usage.completion_tokens == ANSWERED_OUT
    assert first_done - streaming_from >= ANSWERED_OUT * TOKEN_DELAY_MS / 1000
    assert isinstance(refused, openai.RateLimitError) and refused.code == "insufficient_quota", refused
    assert _used(a, "nightly") == 2 * (PROMPT + ANSWERED_OUT)  # both settled, to the token
    client = a.redis()
    try:  # nothing left running or waiting in Redis
        assert client.zcard(a.names.running("nightly")) == 0 and client.zcard(a.names.batch_line("nightly")) == 0
    finally:
        client.close()


async def test_outage_each_shim_admits_from_its_last_view_then_bills_exactly(replicas: Replicas) -> None:
    a, b = replicas.a, replicas.b
    key, thrifty = a.new_key("frugal-co", "frugal"), a.new_key("thrifty-co", "thrifty")
    served: list[int] = []

    async def ask(client: openai.AsyncOpenAI) -> openai.types.chat.ChatCompletion:
        completion = await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert completion.usage is not None
        served.append(completion.usage.total_tokens)
        return completion

    async with a.client(key) as on_a, b.client(key) as on_b, a.client(thrifty) as thrifty_on_a:
        for client in (on_a, on_a, on_b):  # A last sees 2 requests' usage, B 3
            await ask(client)
        assert _used(a, "frugal-co") == SEEN_B
        await thrifty_on_a.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)

        await asyncio.to_thread(replicas.redis[-1].stop)  # SIGTERM by PID: it saves, keys survive
        outage: dict[str, int] = {}
        for name, client in (("a", on_a), ("b", on_b)):
            admitted = 0
            while True:
                try:
                    await ask(client)
                except openai.RateLimitError as exc:
                    assert exc.code == "insufficient_quota" and "Frugal tier" in exc.message, exc
                    break
                admitted += 1
                assert admitted < 20, "the local quota never refused"
            outage[name] = admitted
        # Each shim admitted what its own last view left of the quota: together
        # they overshoot by what the stalest view believed was left beyond the truth.
        assert outage == {"a": (OUTAGE_QUOTA - SEEN_A) // EACH, "b": (OUTAGE_QUOTA - SEEN_B) // EACH}
        assert sum(served) - OUTAGE_QUOTA == (OUTAGE_QUOTA - SEEN_A) + (OUTAGE_QUOTA - SEEN_B) - (OUTAGE_QUOTA - SEEN_B)
        # The budget likewise, each request counted at its true cost once it ended: A
        # last saw its first request's reservation, then admits while it fits.
        spent = 0
        while True:
            try:
                await thrifty_on_a.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            except openai.RateLimitError as exc:
                assert exc.code == "insufficient_quota" and "budget" in exc.message, exc
                break
            spent += 1
            assert spent < 20, "the local budget never refused"
        assert spent == (BUDGET_MICRO - RESERVE_MICRO - RESERVE_MICRO) // COST_MICRO + 1
        decisions = (await a.health())["admission"]["fail_mode_decisions"]
        assert decisions == {"open_admitted": outage["a"] + spent, "open_refused": 2}

        restarted = redis_process(replicas.redis_port, replicas.directory / "redis",
                                  replicas.directory / "redis-2.log", persist=True).start()
        replicas.redis.append(restarted)
        replicas.started.insert(0, restarted)  # stopped after the shims and the worker
        await asyncio.to_thread(restarted.wait_port, "127.0.0.1", replicas.redis_port, 20)
        # The worker folds the outage's events into the totals: exact, to the token.
        await asyncio.to_thread(wait_for, lambda: _used(a, "frugal-co") == sum(served), 20, "the outage in the totals")
        admitted = 3 + outage["a"] + outage["b"]  # and the 2 refusals, billed as nothing
        rows = await asyncio.to_thread(wait_for, lambda: (r := ledger_rows(a.config, "frugal-co"))["ids"] == admitted + 2
                                       and r, 20, "the outage's events in the ledger")
        assert (rows["ids"], rows["input_tokens"] + rows["output_tokens"]) == (admitted + 2, sum(served))
        assert rows["input_tokens"] == admitted * PROMPT
        await asyncio.to_thread(wait_for, lambda: _cost(a, "thrifty-co") == (1 + spent) * COST_USD, 20,
                                "the outage's cost in the totals")
        await asyncio.sleep(1.1)  # each shim asks Redis again a second after its last failure
        for client in (on_a, on_b):  # Redis decides again, from totals that hold the outage
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            assert refused.value.code == "insufficient_quota"
        assert (await b.health())["admission"]["redis"] == "up"


def _cost(shim: Shim, customer: str) -> Decimal:
    client = shim.redis()
    try:
        return Decimal(client.hget(shim.names.usage(customer, shim.period()), "cost_usd") or 0)
    finally:
        client.close()


async def _drain(stream: openai.AsyncStream) -> None:
    _ = [chunk async for chunk in stream]


async def _timed(call) -> tuple[float, object]:
    try:
        result: object = await call
    except openai.APIStatusError as exc:
        result = exc
    return time.monotonic(), result
