"""Shared pieces of the enforcement tests: a shim (real process) in front of
the mock, keys with priorities and overrides, and the pipeline's atomic
"totals + drop the included reservations" step, emulated exactly as the
pipeline must run it (see PIPELINE_APPLY_TOTALS)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import openai
import pytest
import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config, KeyOverrides
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.periods import period_of
from quotameter.redis_keys import RedisKeys

MESSAGES = [{"role": "user", "content": "Say some words."}]

# The pipeline's step, atomically, per customer and period: write the absolute
# totals and drop the reservations of the event ids those totals now include.
PIPELINE_APPLY_TOTALS = """
redis.call('HSET', KEYS[1], 'input_tokens', ARGV[1], 'output_tokens', ARGV[2],
           'cost_usd', ARGV[3], 'cost_micro_usd', ARGV[4])
for i = 5, #ARGV do
  local entry = redis.call('HGET', KEYS[2], ARGV[i])
  if entry then
    local t, m = string.match(entry, '^(%-?%d+):(%-?%d+)$')
    redis.call('HINCRBY', KEYS[4], 'tokens', -tonumber(t))
    redis.call('HINCRBY', KEYS[4], 'micro_usd', -tonumber(m))
    redis.call('HDEL', KEYS[2], ARGV[i])
  end
  redis.call('ZREM', KEYS[3], ARGV[i])
end
return 1
"""


@dataclass
class Shim:
    config: Config
    process: ManagedProcess

    @property
    def base_url(self) -> str:
        return f"http://{self.config.shim.host}:{self.config.shim.port}/v1"

    @property
    def names(self) -> RedisKeys:
        return RedisKeys(self.config.services.redis_prefix)

    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.config.services.redis_url, decode_responses=True)

    def new_key(self, customer: str, tier: str, priority: str = "interactive", **limits: Any) -> str:
        client = self.redis()
        try:
            overrides = KeyOverrides(**limits) if limits else None
            return create_key(client, self.names, customer, tier, priority=priority, limits=overrides).plaintext
        finally:
            client.close()

    def client(self, key: str, timeout: float = 20) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0, timeout=timeout)

    def period(self) -> str:
        return period_of(datetime.now(UTC), self.config.billing.timezone, self.config.billing.anchor_day)

    def set_totals(self, customer: str, tokens: int = 0, micro_usd: int = 0, included: list[str] = ()) -> None:
        client = self.redis()
        try:
            n, p = self.names, self.period()
            keys = [n.usage(customer, p), n.pending(customer, p), n.pending_expiry(customer, p), n.reserved(customer, p)]
            client.eval(PIPELINE_APPLY_TOTALS, 4, *keys, tokens, 0, f"{micro_usd / 1e6:.6f}", micro_usd, *included)
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
def shim_factory(config_factory, cli_process) -> ShimFactory:
    async def start(tiers: dict[str, Any], token_delay_ms: float = 0, **overrides: Any) -> Shim:
        mock_port = free_port()
        mock = cli_process("mock", "mock-llm", "--port", str(mock_port), "--token-delay-ms", str(token_delay_ms))
        upstream = {"url": f"http://127.0.0.1:{mock_port}/v1", **overrides.pop("upstream", {})}
        document = {"upstream": upstream, "tiers": tiers, **overrides}
        config, path = config_factory(document)
        process = cli_process("shim", "proxy", config_path=path)
        await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
        await asyncio.to_thread(process.wait_port, config.shim.host, config.shim.port)
        return Shim(config, process)

    return start
