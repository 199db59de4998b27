"""The asyncio Redis clients of the shim and the worker: a pool that waits.

redis-py's asyncio ``ConnectionPool`` raises ``MaxConnectionsError`` (a
``ConnectionError``) the moment every connection is busy, so a burst of
concurrent requests read as a Redis outage and tripped the fail modes while
Redis was up. These clients wait up to ``services.redis_pool_timeout_ms``
for a free connection among ``services.redis_max_connections`` instead, and
a wait that runs out raises ``RedisPoolExhausted``, which is not a
``ConnectionError``: callers tell "Redis is up but every connection stayed
busy" apart from "Redis cannot be reached".

Checked against redis-py 8.1: ``BlockingConnectionPool.get_connection``
raises ``ConnectionError("No connection available.")`` from the
``asyncio.TimeoutError`` of its wait, and connecting (outside that wait)
raises its own errors. tests/integration/test_redis_pool.py guards both.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool

from quotameter.config import Services
from quotameter.errors import QuotameterError


class RedisPoolExhausted(QuotameterError, redis.exceptions.RedisError):
    """Every connection of the pool stayed busy for ``services.redis_pool_timeout_ms``:
    Redis answers, but slower than this process asks. Raise
    ``services.redis_max_connections`` (Redis's own ``maxclients`` allowing),
    or look at what makes Redis slow (``SLOWLOG GET``)."""


class WaitingPool(BlockingConnectionPool):
    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            return await super().get_connection(*args, **kwargs)
        except redis.exceptions.ConnectionError as exc:
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise RedisPoolExhausted(
                    f"all {self.max_connections} Redis connections stayed busy for {self.timeout:g}s"
                ) from exc
            raise


def redis_client(
    services: Services, *, connect_timeout_s: float | None = 3.0, timeout_s: float | None = 5.0, **options: Any
) -> aioredis.Redis:
    """A client of ``services.redis_url`` over a waiting pool of its own (closed with the client)."""
    pool = WaitingPool.from_url(
        services.redis_url,
        max_connections=services.redis_max_connections,
        timeout=services.redis_pool_timeout_ms / 1000,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        **options,
    )
    return aioredis.Redis.from_pool(pool)
