"""The request lifecycle inside another program's process (LiteLLM's proxy,
a Python ASGI app): its own Redis connections, script pipe and event emitter,
opened on that program's event loop the first time a request needs them.

The host's loop is the one the connections must live on, and neither host
gives a callback a start-up hook it is sure to run (LiteLLM builds callbacks
when it reads its config; an ASGI server may not send lifespan events to a
middleware), hence the lazy start. ``close`` flushes the events: call it from
the host's shutdown where there is one; otherwise the spool keeps what was not
sent, and the next start replays it.

The config comes from ``QUOTAMETER_CONFIG`` (the YAML file) when none is given,
with the usual environment overrides. One process per ``shim.spool_dir``:
several workers of one host each need their own spool.
"""

from __future__ import annotations

import asyncio
import logging

from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.auth_failures import AuthFailures
from gateway_shim.emitter import EventEmitter
from gateway_shim.enforcement import Enforcer
from gateway_shim.lifecycle import Lifecycle
from gateway_shim.cluster_pipe import script_pipe
from gateway_shim.shared_queue import SharedQueue
from quotameter.config import Config, load_config
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import redis_client as waiting_redis_client
from quotameter.redis_pool import warm

log = logging.getLogger("gateway_shim.in_process")


class InProcess:
    """One lifecycle for the whole host process, started on first use."""

    def __init__(self, config: Config | None = None) -> None:
        self._config = config
        self._lifecycle: Lifecycle | None = None
        self._starting: asyncio.Lock | None = None
        self._closers: list = []

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config()  # QUOTAMETER_CONFIG, or the default file
        return self._config

    async def lifecycle(self) -> Lifecycle:
        if self._lifecycle is not None:
            return self._lifecycle
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._lifecycle is None:
                self._lifecycle = await self._start()
        return self._lifecycle

    async def _start(self) -> Lifecycle:
        config = self.config
        redis_client = waiting_redis_client(config.services, health_check_interval=30)
        await warm(redis_client)
        pipe = script_pipe(config.services.redis_url, connect_timeout_s=3, timeout_s=5)
        emitter = EventEmitter.from_config(config, redis_client)
        await emitter.start()
        names = RedisKeys(config.services.redis_prefix)
        admitter = Admitter(redis_client, names, pipe)
        auth = Authenticator(redis_client, names, failures=AuthFailures.from_config(config.shim))
        enforcer = Enforcer(config, admitter)
        # The batch queue's waits and order across the processes sharing this Redis.
        replicas = enforcer.replicas = SharedQueue(redis_client, names, config.shim.instance, pipe)
        replicas.start(enforcer.queue)
        self._closers = [lambda: emitter.close(config.shim.drain_timeout_s), replicas.close]
        if pipe is not None:
            self._closers.append(pipe.close)
        self._closers.append(redis_client.aclose)
        log.info("quotameter in process as %s, events to %s", config.shim.instance, config.services.events_topic)
        return Lifecycle(config, auth, enforcer, emitter)

    async def close(self) -> None:
        """Flush the events (within ``shim.drain_timeout_s``), then close Redis."""
        self._lifecycle = None
        closers, self._closers = self._closers, []
        for close in closers:
            await close()
