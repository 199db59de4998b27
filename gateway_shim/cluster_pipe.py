"""The auto-pipelined script path (gateway_shim/resp.py) on a Redis Cluster.

One ``ScriptPipe`` per primary; each script goes to the primary that owns
the slot of its first key (every key of one admission or settle carries the
customer's ``{tag}``, so they share that slot). The slot map comes from
CLUSTER SLOTS, read at the first call and again whenever the cluster says it
changed:

- ``MOVED slot host:port``: the slot lives there now. The call is sent there,
  the map is read again in the background.
- ``ASK slot host:port``: the slot is migrating; this one call goes there,
  preceded by ASKING on the same connection. The map stays.
- ``TRYAGAIN`` (keys of a slot split by a migration): asked again shortly.
- a lost connection (a primary gone, a failover under way) fails the call as
  on one Redis (the fail modes decide), and the map is read again, so the next
  call finds the new primary.

Redirections are bounded (``_MAX_REDIRECTIONS``) so a cluster that keeps
bouncing a call fails it instead of looping.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.exceptions
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot

from gateway_shim.resp import Script, ScriptPipe
from quotameter.redis_url import topology

log = logging.getLogger(__name__)

_MAX_REDIRECTIONS = 5
_TRY_AGAIN_S = 0.05

Address = tuple[str, int]


class ClusterScriptPipe:
    """Scripts over one auto-pipelined connection per primary (see the module doc)."""

    def __init__(
        self, startup: list[Address], *, username: str | None = None, password: str | None = None,
        connect_timeout_s: float = 3.0, timeout_s: float = 5.0,
    ) -> None:
        self._startup = list(startup)
        self._auth = {"username": username, "password": password}
        self._timeouts = {"connect_timeout_s": connect_timeout_s, "timeout_s": timeout_s}
        self._slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
        self._pipes: dict[Address, ScriptPipe] = {}
        self._refreshing: asyncio.Task[None] | None = None

    @classmethod
    def from_url(cls, url: str, *, connect_timeout_s: float = 3.0, timeout_s: float = 5.0) -> ClusterScriptPipe | None:
        """A pipe for a plain TCP ``redis+cluster://`` URL; None for anything else."""
        where = topology(url)
        if where.kind != "cluster" or where.tls:
            return None
        return cls(list(where.nodes), username=where.username, password=where.password,
                   connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)

    async def evalsha(self, script: Script, numkeys: int, keys: bytes, args: bytes, count: int, *, slot_key: str) -> Any:
        slot = key_slot(slot_key.encode())
        address = self._slots[slot]
        if address is None:
            await self.refresh()
            address = self._slots[slot]
            if address is None:
                raise redis.exceptions.ClusterDownError(f"no primary serves slot {slot}")
        asking = False
        for _ in range(_MAX_REDIRECTIONS):
            try:
                return await self._pipe(address).evalsha(script, numkeys, keys, args, count, asking=asking)
            except redis.exceptions.MovedError as moved:  # before AskError: its subclass
                address, asking = moved.node_addr, False
                self._slots[moved.slot_id] = address
                self._refresh_soon()
            except redis.exceptions.AskError as ask:
                address, asking = ask.node_addr, True
            except redis.exceptions.TryAgainError:
                await asyncio.sleep(_TRY_AGAIN_S)
            except redis.exceptions.ConnectionError:
                self._refresh_soon()
                raise
        raise redis.exceptions.ClusterError(f"slot {slot} was redirected {_MAX_REDIRECTIONS} times")

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers CLUSTER SLOTS."""
        candidates = [*self._pipes, *self._startup]
        error: Exception | None = None
        for address in dict.fromkeys(candidates):
            try:
                reply = await self._pipe(address).command(b"CLUSTER", b"SLOTS")
            except redis.exceptions.RedisError as exc:
                error = exc
                continue
            slots: list[Address | None] = [None] * REDIS_CLUSTER_HASH_SLOTS
            for start, end, primary, *_ in reply:
                host = primary[0].decode() if primary[0] else address[0]  # empty: the node asked
                slots[start:end + 1] = [(host, int(primary[1]))] * (end - start + 1)
            self._slots = slots
            for gone in set(self._pipes) - set(slots) - set(self._startup):
                await self._pipes.pop(gone).close()
            return
        raise redis.exceptions.ConnectionError(f"no node of the Redis Cluster answered CLUSTER SLOTS: {error}")

    def _refresh_soon(self) -> None:
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._refresh_quietly())

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except redis.exceptions.RedisError as exc:
            log.warning("Redis Cluster slot map not refreshed: %s", exc)

    def _pipe(self, address: Address) -> ScriptPipe:
        pipe = self._pipes.get(address)
        if pipe is None:
            pipe = self._pipes[address] = ScriptPipe(address[0], address[1], **self._auth, **self._timeouts)
        return pipe

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
        for pipe in self._pipes.values():
            await pipe.close()


def script_pipe(url: str, *, connect_timeout_s: float = 3.0, timeout_s: float = 5.0) -> ScriptPipe | ClusterScriptPipe | None:
    """The pipelined script path for ``services.redis_url``, or None where redis-py's
    client runs the scripts (TLS, unix sockets, Sentinel: its failover is redis-py's)."""
    pipe = ScriptPipe.from_url(url, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)
    return pipe or ClusterScriptPipe.from_url(url, connect_timeout_s=connect_timeout_s, timeout_s=timeout_s)
