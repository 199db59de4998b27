"""Shared pieces of the enforcement tests: a shim (real process) in front of
the mock, keys with priorities and overrides, and period totals written into
Redis by the pipeline's own quota-state script (``pipeline/usage_state.lua``)
where a test needs a customer's state without running a worker.
``test_enforcement_pipeline`` runs the real worker instead."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import redis

from gateway_shim.keystore import create_key
from pipeline.redis_writer import SCRIPT as PIPELINE_USAGE_STATE
from pipeline.redis_writer import usage_hash
from quotameter.aggregate import Totals
from quotameter.config import Config, KeyOverrides
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import sync_redis
from tests.conftest import merge

MESSAGES = [{"role": "user", "content": "Say some words."}]
# Under o200k_base (mock models), checked against tiktoken: 3 per message,
# "user" 1, "Say some words." 4, 3 priming the reply.
PROMPT_TOKENS = 11


@dataclass
class Shim:
    config: Config
    process: ManagedProcess
    config_path: Path
    # The clients handed out, closed at the test's end while the event loop still
    # runs: one left to the collector warns of its sockets at whatever runs then.
    clients: list[openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.config.shim.host}:{self.config.shim.port}/v1"

    @property
    def names(self) -> RedisKeys:
        return RedisKeys(self.config.services.redis_prefix)

    def redis(self) -> redis.Redis:
        return sync_redis(self.config.services, decode_responses=True)  # one Redis, a cluster or Sentinel

    def new_key(self, customer: str, tier: str, priority: str = "interactive", **limits: Any) -> str:
        client = self.redis()
        try:
            overrides = KeyOverrides(**limits) if limits else None
            return create_key(client, self.names, customer, tier, priority=priority, limits=overrides).plaintext
        finally:
            client.close()

    def client(self, key: str, timeout: float = 20) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)
        self.clients.append(client)
        return client

    def period(self) -> str:
        return self.config.billing.calendar.current(datetime.now(UTC))

    def set_totals(self, customer: str, tokens: int = 0, micro_usd: int = 0, included: list[str] = ()) -> None:
        """Write the customer's period totals as the worker does (forced, as
        ``rebuild-state --force``), releasing the reservations of ``included``."""
        totals = Totals(input_tokens=tokens, cost_usd=Decimal(micro_usd) / 1_000_000, events=len(included))
        fields = [part for pair in usage_hash(totals, 1).items() for part in pair]
        client = self.redis()
        try:
            n, p = self.names, self.period()
            keys = [n.usage(customer, p), n.pending(customer, p), n.pending_expiry(customer, p), n.reserved(customer, p)]
            client.eval(PIPELINE_USAGE_STATE, 4, *keys, totals.events, 1, len(fields), *fields, *sorted(included))
        finally:
            client.close()

    def reserved(self, customer: str) -> tuple[int, int, dict[str, str]]:
        client = self.redis()
        try:
            held = client.hgetall(self.names.reserved(customer, self.period()))
            pending = client.hgetall(self.names.pending(customer, self.period()))
            return int(held.get("tokens", 0)), int(held.get("micro_usd", 0)), pending
        finally:
            client.close()

    async def health(self) -> dict[str, Any]:
        async with aiohttp.ClientSession() as session:
            async with session.get(self.base_url.removesuffix("/v1") + "/healthz") as response:
                return await response.json()


ShimFactory = Callable[..., Awaitable[Shim]]


@pytest.fixture
async def shim_factory(config_factory, cli_process) -> AsyncIterator[ShimFactory]:
    shims: list[Shim] = []

    async def start(tiers: dict[str, Any], token_delay_ms: float = 0, **overrides: Any) -> Shim:
        mock_port = free_port()
        mock = cli_process("mock", "mock-llm", "--port", str(mock_port), "--token-delay-ms", str(token_delay_ms))
        # No worker runs here: the shim forgets an event once Kafka has it.
        document = {"upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}, "tiers": tiers, "shim": {"delivery": "broker"}}
        config, path = config_factory(merge(document, overrides))
        process = cli_process("shim", "proxy", config_path=path)
        await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
        await asyncio.to_thread(process.wait_port, config.shim.host, config.shim.port)
        shims.append(Shim(config, process, path))
        return shims[-1]

    yield start
    for client in (client for shim in shims for client in shim.clients):
        await client.close()


async def until_a_slot_is_free(client: openai.AsyncOpenAI, timeout_s: float = 5.0) -> None:
    """Send a one-token request until the concurrency limit admits it: a slot is
    given back when a stream's end is settled, just after its client saw it."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            return
        except openai.RateLimitError:
            assert asyncio.get_running_loop().time() < deadline, "the stream's slot was never given back"
            await asyncio.sleep(0.02)
