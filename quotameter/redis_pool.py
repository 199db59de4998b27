"""The Redis clients of every process, built from ``services.redis_url``.

The URL's scheme picks the topology (nothing else calls ``from_url``):

    redis://  rediss://                        one Redis or Valkey (TLS with rediss)
    redis+cluster://[user:pass@]h:p[,h:p…][/]   Redis Cluster: startup nodes, the
    rediss+cluster://                          client discovers the rest
    redis+sentinel://[user:pass@]h:p[,h:p…]/<master>[/db]   Sentinel: the master is
    rediss+sentinel://                         discovered, and again after a failover

Credentials are the data nodes' (cluster nodes, the Sentinel master and its
replicas); sentinels themselves are asked without them.

On a cluster, redis-py keeps a pool per node that raises at its cap instead
of waiting, so that cap is left far above any burst. On one Redis, the
asyncio client waits for a free connection:

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

import redis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.asyncio.connection import AbstractConnection, BlockingConnectionPool
from redis.asyncio.sentinel import Sentinel as AsyncSentinel
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel

from quotameter.config import Services
from quotameter.errors import QuotameterError
from quotameter.redis_url import topology


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


_CLUSTER_CONNECTIONS_PER_NODE = 1 << 20  # see the module doc: a cap here raises, never waits


def redis_client(
    services: Services, *, connect_timeout_s: float | None = 3.0, timeout_s: float | None = 5.0, **options: Any
) -> aioredis.Redis | AsyncRedisCluster:
    """An asyncio client of ``services.redis_url`` (closed with ``aclose``): on one
    Redis over a waiting pool of its own; a cluster or Sentinel client otherwise."""
    where = topology(services.redis_url)
    common = {"socket_connect_timeout": connect_timeout_s, "socket_timeout": timeout_s, **options}
    if where.kind == "cluster":
        return AsyncRedisCluster(
            startup_nodes=[AsyncClusterNode(host, port) for host, port in where.nodes],
            username=where.username, password=where.password, ssl=where.tls,
            max_connections=_CLUSTER_CONNECTIONS_PER_NODE, **common,
        )
    if where.kind == "sentinel":
        sentinel = AsyncSentinel(list(where.nodes), sentinel_kwargs=_sentinel_kwargs(where, common))
        return sentinel.master_for(
            where.master, db=where.db, username=where.username, password=where.password, ssl=where.tls, **common,
        )
    pool = WaitingPool.from_url(
        services.redis_url,
        max_connections=services.redis_max_connections,
        timeout=services.redis_pool_timeout_ms / 1000,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=timeout_s,
        **options,
    )
    return aioredis.Redis.from_pool(pool)


def sync_redis(services: Services, **options: Any) -> redis.Redis | RedisCluster:
    """A synchronous client of ``services.redis_url`` (the CLI, export, reports)."""
    where = topology(services.redis_url)
    common = {"socket_connect_timeout": 3, **options}
    if where.kind == "cluster":
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in where.nodes],
            username=where.username, password=where.password, ssl=where.tls, **common,
        )
    if where.kind == "sentinel":
        sentinel = Sentinel(list(where.nodes), sentinel_kwargs=_sentinel_kwargs(where, common))
        return sentinel.master_for(
            where.master, db=where.db, username=where.username, password=where.password, ssl=where.tls, **common,
        )
    return redis.Redis.from_url(services.redis_url, **common)


async def warm(client: object) -> None:
    """Learn a cluster's slot map before the first request: a burst of first
    commands otherwise meets redis-py's lazy start (and its reconnects) all at
    once. Redis away at start is not an error here: the fail modes meet it."""
    if isinstance(client, AsyncRedisCluster):
        try:
            await client.initialize()
        except (redis.exceptions.RedisError, OSError):
            pass


def is_cluster(client: object) -> bool:
    return isinstance(client, (RedisCluster, AsyncRedisCluster))


def _sentinel_kwargs(where: RedisTopology, common: dict[str, Any]) -> dict[str, Any]:
    keep = ("socket_connect_timeout", "socket_timeout")
    return {"ssl": where.tls, **{k: common[k] for k in keep if k in common}}
