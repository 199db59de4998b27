"""Rewriting the quota state after Redis restarted.

A redis-server that restarts (a crash, a SIGKILL, a failover) comes back
from its last snapshot or append-only file, which can lack the last second of
writes: some customers' period totals roll back. The worker writes absolute
totals, so the next batch of a customer repairs it, but a customer with no
more traffic would keep the older totals. So the worker notes Redis's
``run_id`` (new on every start; on a cluster, every node's) and, when it changes, writes the ledger's
totals of the current period again, after writing its own buffered rows to
the ledger. Nothing is added to anything (see pipeline.rebuild), so a
rewrite that races a batch never double counts.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from quotameter.redis_pool import is_cluster

log = logging.getLogger(__name__)

CHECK_EVERY_S = 2.0


class RedisRestarts:
    def __init__(self, client: Redis, rewrite: Callable[[], Awaitable[int]]) -> None:
        self.client = client
        self.rewrite = rewrite
        self.run_id: str | None = None
        self.rewrites = 0

    async def check(self) -> None:
        try:
            if is_cluster(self.client):  # any primary restarting counts
                info = await self.client.info("server", target_nodes="primaries")
                run_id = ",".join(sorted(str(node["run_id"]) for node in info.values()))
            else:
                run_id = str((await self.client.info("server"))["run_id"])
        except (RedisError, OSError, KeyError):
            return  # down, or not answering yet: the next check sees it
        if self.run_id is not None and run_id != self.run_id:
            log.warning("Redis restarted (run_id %s → %s): writing the quota state again from the ledger",
                        self.run_id[:8], run_id[:8])
            try:
                customers = await self.rewrite()
            except (RedisError, OSError, ConnectionError) as exc:
                log.warning("quota state not rewritten yet (%s); trying again", exc)
                return  # run_id kept: the next check tries again
            self.rewrites += 1
            log.info("quota state of %d customers rewritten after the Redis restart", customers)
        self.run_id = run_id
