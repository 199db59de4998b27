"""quotameter/redis_pool.py against a real redis-server: busy connections make
a call wait, a wait that runs out is RedisPoolExhausted (not a
ConnectionError), and an unreachable Redis is still a ConnectionError."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis.exceptions

from quotameter.config import Services
from quotameter.embedded.procs import free_port
from quotameter.redis_pool import RedisPoolExhausted, redis_client


async def test_calls_past_the_pool_size_wait_for_a_connection(redis_url: str, unique: str) -> None:
    client = redis_client(Services(redis_url=redis_url, redis_max_connections=2, redis_pool_timeout_ms=5000))
    try:
        # Each BLPOP holds its connection 0.2 s: 6 of them on 2 connections take 3 turns.
        started = time.monotonic()
        replies = await asyncio.gather(*(client.blpop([f"{unique}:nothing"], timeout=0.2) for _ in range(6)))
        assert replies == [None] * 6
        assert time.monotonic() - started >= 0.55
    finally:
        await client.aclose()


async def test_a_wait_that_runs_out_is_not_a_connection_error(redis_url: str, unique: str) -> None:
    client = redis_client(Services(redis_url=redis_url, redis_max_connections=1, redis_pool_timeout_ms=100))
    try:
        holder = asyncio.create_task(client.blpop([f"{unique}:nothing"], timeout=1))
        await asyncio.sleep(0.1)
        with pytest.raises(RedisPoolExhausted) as exhausted:
            await client.get(f"{unique}:key")
        assert not isinstance(exhausted.value, redis.exceptions.ConnectionError)
        assert "all 1 Redis connections stayed busy" in str(exhausted.value)
        assert await holder is None
    finally:
        await client.aclose()


async def test_an_unreachable_redis_is_still_a_connection_error() -> None:
    client = redis_client(Services(redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    try:
        with pytest.raises(redis.exceptions.ConnectionError) as refused:
            await client.get("key")
        assert not isinstance(refused.value, RedisPoolExhausted)
    finally:
        await client.aclose()
