"""The batch queue's state that every shim replica shares, in Redis.

batch_queue.py keeps each customer's line in one process. Behind a load
balancer the requests that hold a customer's reservations, and the batch
requests waiting for them, may be on different shims, so three things live
in Redis (names in quotameter/redis_keys.py):

- the requests still running of tiers with a queue, so a batch request over
  its quota waits while one runs on any shim (its reservation may settle
  lower), and is refused at once when none does;
- the customer's line across shims, in arrival order: only its head asks
  admission again, wherever it waits. Each place carries its deadline (Redis
  time), so the places of a shim that died stop counting once they pass it;
- a pub/sub channel on which a settle or a departure from the line names the
  customer, waking that customer's head on every shim at once. Pub/sub needs
  no server setting (keyspace notifications are off on managed Redis) and
  may drop a message: a head still asks again every POLL_CAP_S.

While Redis is away each shim falls back to its own line and its own
requests in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging

import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.connection import SSLConnection
from redis.commands.core import AsyncScript

from gateway_shim.batch_queue import POLL_CAP_S, BatchQueue
from gateway_shim.resp import Script, ScriptPipe, encode_args
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import is_cluster

log = logging.getLogger("gateway_shim.shared_queue")

_FAILED = (redis.exceptions.RedisError, OSError)
PLACE_SLACK_MS = 2_000  # a place outlives its waiter's deadline by this much
RESUBSCRIBE_S = 1.0

# On the hot path of tiers with a queue, over the admission's pipelined connection
# when there is one: a request starts running, or it ended (wake the waiters).
_MARK = """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('PEXPIREAT', KEYS[1], ARGV[1])
return 1
"""
_UNMARK = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# Leaving the line is the same step on the line's key (a script: a cluster
# client refuses PUBLISH inside a pipeline).
_LEAVE = _UNMARK
# A place in the line: "deadline ms:shim:n", its deadline taken from Redis's clock.
_JOIN = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local place = (now + tonumber(ARGV[2])) .. ':' .. ARGV[1]
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[2]), place)
redis.call('PEXPIRE', KEYS[1], ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[2])
return place
"""
# 1 if ARGV[1] heads the line (places past their deadline dropped), else 0.
_HEAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for _ = 1, 64 do
  local first = redis.call('ZRANGE', KEYS[1], 0, 0)[1]
  if not first then return 1 end
  if tonumber(string.match(first, '^(%d+):')) >= now then
    return first == ARGV[1] and 1 or 0
  end
  redis.call('ZREM', KEYS[1], first)
end
return 0
"""


class SharedQueue:
    def __init__(
        self, client: aioredis.Redis, names: RedisKeys, instance: str, pipe: ScriptPipe | None = None
    ) -> None:
        self._client = client
        self._pipe = pipe
        self._names = names
        self._instance = instance
        self._numbers = itertools.count(1)
        self._join = client.register_script(_JOIN)
        self._head = client.register_script(_HEAD)
        self._mark = client.register_script(_MARK)
        self._unmark = client.register_script(_UNMARK)
        self._leave = client.register_script(_LEAVE)
        self._mark_script, self._unmark_script, self._leave_script = Script(_MARK), Script(_UNMARK), Script(_LEAVE)
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[asyncio.Task[None]] = set()
        self._node_clients: list[aioredis.Redis] = []

    # -- requests running anywhere ------------------------------------------

    async def mark_running(self, customer: str, event_id: str, expiry_ms: int) -> bool:
        # A tier's reservations share one TTL: the latest to start expires last.
        try:
            await self._run(self._mark, self._mark_script, self._names.running(customer), [expiry_ms, event_id])
            return True
        except _FAILED as exc:
            log.warning("cannot mark %s running (%s): batch waiters elsewhere will not wait for it", event_id, exc)
            return False

    async def running(self, customer: str, now_ms: int) -> int | None:
        """How many requests of ``customer`` run on any shim; None if Redis is away."""
        key = self._names.running(customer)
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zremrangebyscore(key, "-inf", now_ms)
                pipe.zcard(key)
                return int((await pipe.execute())[1])
        except _FAILED:
            return None

    async def settled(self, customer: str, event_id: str) -> None:
        """The request ended (its reservation settled): wake the customer's waiters everywhere."""
        try:
            await self._run(self._unmark, self._unmark_script, self._names.running(customer),
                            [event_id, self._names.batch_wake(), customer])
        except _FAILED as exc:
            log.warning("cannot unmark %s (%s): it stops counting as running when it expires", event_id, exc)

    async def _run(self, script: AsyncScript, piped: Script, key: str, args: list[object]) -> None:
        if self._pipe is None:
            await script(keys=[key], args=args)
        else:
            await self._pipe.evalsha(piped, 1, encode_args([key]), encode_args(args), 1 + len(args), slot_key=key)

    def settled_later(self, customer: str, event_id: str) -> None:
        """``settled`` from synchronous code (the check endpoint's hand-off)."""
        task = asyncio.get_running_loop().create_task(self.settled(customer, event_id))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    # -- the line across shims ------------------------------------------------

    async def join(self, customer: str, max_wait_s: float) -> str | None:
        """A place at the end of the customer's line; None if Redis is away (this shim's line only)."""
        n = self._names
        ttl_ms = int(max_wait_s * 1000) + PLACE_SLACK_MS
        try:
            place = await self._join(keys=[n.batch_line(customer), n.batch_seq(customer)],
                                     args=[f"{self._instance}:{next(self._numbers)}", ttl_ms])
        except _FAILED:
            return None
        return place.decode() if isinstance(place, bytes) else str(place)

    async def is_head(self, customer: str, place: str) -> bool:
        try:
            return int(await self._head(keys=[self._names.batch_line(customer)], args=[place])) == 1
        except _FAILED:
            return True  # Redis away: this shim's own line decides

    async def leave(self, customer: str, place: str) -> None:
        try:
            await self._run(self._leave, self._leave_script, self._names.batch_line(customer),
                            [place, self._names.batch_wake(), customer])
        except _FAILED:
            pass  # the place lapses at its deadline

    # -- wake-ups ---------------------------------------------------------------

    def start(self, queue: BatchQueue) -> None:
        self._listener = asyncio.get_running_loop().create_task(self._listen(queue))

    async def close(self) -> None:
        tasks = [*self._pending, *([self._listener] if self._listener else [])]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *_FAILED):
                await task
        for client in self._node_clients:
            with contextlib.suppress(*_FAILED):
                await client.aclose()

    async def _listen(self, queue: BatchQueue) -> None:
        if not is_cluster(self._client):
            await self._listen_on(self._client, queue)
            return
        # A cluster carries a PUBLISH to its other nodes over its bus; one
        # subscription on one node saw wake-ups arrive out of order, late or
        # not at all while commands flowed (Valkey 9.1, redis-py 8.1). Listen
        # on every primary instead, which delivers what its own scripts
        # publish at once. A duplicate wake-up only makes a head ask again. A
        # primary promoted later is not listened to: its customers' heads poll.
        clients = [_node_client(node) for node in self._client.get_primaries()]
        self._node_clients.extend(clients)
        await asyncio.gather(*(self._listen_on(client, queue) for client in clients))

    async def _listen_on(self, client: aioredis.Redis, queue: BatchQueue) -> None:
        channel = self._names.batch_wake()
        if not hasattr(client, "pubsub"):  # a client without pub/sub: the heads poll
            log.warning("no pub/sub on this Redis client: batch waiters ask again every %gs", POLL_CAP_S)
            return
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                while True:
                    message = await pubsub.get_message(timeout=None)
                    if message is not None:
                        data = message["data"]
                        queue.released(data.decode() if isinstance(data, bytes) else str(data))
            except Exception as exc:
                # redis-py may turn a cancellation into a connection error: stop when asked to.
                if _cancelling():
                    raise asyncio.CancelledError from exc
                if isinstance(exc, _FAILED):
                    log.debug("wake-up channel lost (%s): resubscribing", exc)
                else:  # a client bug must not end the wake-ups for good: heads poll meanwhile
                    log.exception("wake-up channel failed: resubscribing in %gs", RESUBSCRIBE_S)
            finally:
                with contextlib.suppress(*_FAILED):
                    await pubsub.aclose()
            await asyncio.sleep(RESUBSCRIBE_S)


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _node_client(node: ClusterNode) -> aioredis.Redis:
    """A plain client of one cluster node, with the cluster client's credentials and TLS."""
    options = {k: v for k, v in node.connection_kwargs.items() if k in ("username", "password") or k.startswith("ssl_")}
    return aioredis.Redis(host=node.host, port=node.port, ssl=issubclass(node.connection_class, SSLConnection),
                          socket_connect_timeout=3, **options)
