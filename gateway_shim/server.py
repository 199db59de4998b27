"""The shim as a standalone proxy: ``quotameter proxy``.

Shutdown order on SIGINT / SIGTERM matters for metering: stop accepting,
let in-flight requests finish (their events are emitted as they end), then
flush the Kafka producer, and only then close Redis and the upstream pool.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from gateway_shim import auth_failures
from gateway_shim.admission import Admitter
from gateway_shim.auth import Authenticator
from gateway_shim.check import Check
from gateway_shim.check_tickets import CheckTickets
from gateway_shim.emitter import EventEmitter
from gateway_shim.errors import RouteNotFound, error_response
from gateway_shim.ingest import register as register_ingest
from gateway_shim.openapi import register as register_openapi
from gateway_shim.proxy import Proxy
from gateway_shim.cluster_pipe import script_pipe
from gateway_shim.shared_queue import SharedQueue
from gateway_shim.upstream import Upstream
from gateway_shim.usage_api import register as register_usage_api
from quotameter.config import Config
from quotameter.redis_keys import RedisKeys
from quotameter.redis_pool import redis_client as waiting_redis_client
from quotameter.redis_pool import warm
from telemetry import logs, prometheus, setup

log = logging.getLogger("gateway_shim.server")
SERVICE = "quotameter-shim"
SHUTDOWN_TIMEOUT_S = 30.0  # how long in-flight requests (long streams) get to finish
_PROXY = web.AppKey("proxy", Proxy)
_CHECK = web.AppKey("check", Check)


# -- spool hook (gateway_shim/spool.py): no request is served that could not be billed --
def _spool_guard(request: web.Request) -> web.Response | None:
    """The 503 for a /v1/ request while the usage spool refuses, else None. Called
    first by every /v1/ handler (a middleware would cost every request two more
    coroutine layers)."""
    proxy = request.app.get(_PROXY)
    refusing = proxy.emitter.refusing if proxy is not None else None
    if refusing is None:
        return None
    response = error_response(refusing)
    response.headers["Retry-After"] = "5"
    return response


def build_app(config: Config) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)

    async def resources(app: web.Application) -> AsyncIterator[None]:
        # Authentication (and the scripts, where the pipe below cannot go) use this pool.
        redis_client = waiting_redis_client(config.services, health_check_interval=30)
        await warm(redis_client)
        # The admission and settle scripts go over one auto-pipelined connection (one per
        # primary on a cluster; None: TLS, a unix socket or Sentinel, where they stay on redis-py's pool).
        pipe = script_pipe(config.services.redis_url, connect_timeout_s=3, timeout_s=5)
        names = RedisKeys(config.services.redis_prefix)
        upstream = Upstream(config.upstream)
        # Opens the spool and replays what it holds; redis_client reads the ledger's confirmations.
        emitter = EventEmitter.from_config(config, redis_client)
        await upstream.start()
        await emitter.start()
        admitter = Admitter(redis_client, names, pipe)
        auth = Authenticator(redis_client, names, failures=auth_failures.shared(app, config.shim))
        app[_PROXY] = Proxy(config, auth, admitter, upstream, emitter)
        # The batch queue's waits and order across the shims sharing this Redis.
        replicas = app[_PROXY].enforcer.replicas = SharedQueue(redis_client, names, config.shim.instance, pipe)
        replicas.start(app[_PROXY].enforcer.queue)
        # /v1/check admits for another proxy; the usage reports of its admissions settle them.
        app[_CHECK] = Check(app[_PROXY], CheckTickets(config, redis_client, names, admitter))
        ext_proc = None
        if config.shim.ext_proc_port is not None:
            from gateway_shim.ext_proc import ExtProcServer  # grpc and Envoy's API load only when served

            ext_proc = ExtProcServer(app[_PROXY].lifecycle, config.shim.host, config.shim.ext_proc_port)
            await ext_proc.start()
        yield
        if ext_proc is not None:  # Envoy's requests in flight end (and are billed) before the flush
            await ext_proc.stop(SHUTDOWN_TIMEOUT_S)
        # In-flight requests are done by now (the runner waited for them).
        await emitter.close(config.shim.drain_timeout_s)
        await replicas.close()
        await upstream.close()
        if pipe is not None:
            await pipe.close()
        await redis_client.aclose()

    async def proxy(request: web.Request) -> web.StreamResponse:
        refused = _spool_guard(request)
        return refused if refused is not None else await request.app[_PROXY].handle(request)

    async def healthz(request: web.Request) -> web.Response:
        # Serving is healthy while Kafka is away (events are spooled), not once the spool is full.
        emitter = request.app[_PROXY].emitter
        refusing = emitter.refusing
        body = {"status": "ok" if refusing is None else "refusing", "instance": config.shim.instance}
        if refusing is not None:
            body["reason"] = refusing.message
        body["admission"] = request.app[_PROXY].enforcer.status()  # fail-mode decisions, queue, refusals
        return web.json_response({**body, "events": emitter.status()}, status=200 if refusing is None else 503)

    async def check(request: web.Request) -> web.Response:
        refused = _spool_guard(request)  # a refusal could not be billed either
        return refused if refused is not None else await request.app[_CHECK].handle(request)

    async def not_found(request: web.Request) -> web.Response:
        return error_response(RouteNotFound(f"Unknown request URL: {request.method} {request.path}."))

    app.cleanup_ctx.append(resources)
    app.router.add_get("/healthz", healthz)
    if config.telemetry.metrics:
        # Behind nothing, as /healthz: its series carry no key, end user or customer
        # (unless telemetry.customer_labels), only counts by route, tier and model.
        app.router.add_get("/metrics", prometheus.metrics_handler)
    register_openapi(app)  # GET /openapi.json: these endpoints' OpenAPI document (gateway_shim/openapi.yaml)
    register_usage_api(app, config, _spool_guard)  # GET /v1/usage (gateway_shim/usage_api.py), before the catch-all
    # POST /v1/events (gateway_shim/ingest.py); a report of a check's admission settles it.
    register_ingest(app, config, lambda app: app[_PROXY].emitter, _spool_guard, lambda app: app[_CHECK].tickets)
    app.router.add_route("*", "/v1/check", check)  # any method: proxies send the client's own
    # Envoy's HTTP ext_authz appends the client's path to its path_prefix (deploy/envoy/ext_authz.yaml).
    app.router.add_route("*", "/v1/check/{tail:.*}", check)
    app.router.add_route("*", "/v1/{tail:.*}", proxy)
    app.router.add_route("*", "/{tail:.*}", not_found)
    return app


async def _serve(config: Config) -> None:
    shim = config.shim  # header limits: past them aiohttp answers 400 itself
    runner = web.AppRunner(build_app(config), access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S,
                           max_line_size=shim.max_header_bytes, max_field_size=shim.max_header_bytes,
                           max_headers=shim.max_headers)
    await runner.setup()
    try:
        await web.TCPSite(runner, config.shim.host, config.shim.port, backlog=config.shim.listen_backlog).start()
    except OSError:  # the port is taken: exit with the error, now
        await _cancel_background_tasks(timeout_s=5.0)
        raise
    freeze_startup_heap()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    print(f"quotameter proxy listening on http://{config.shim.host}:{config.shim.port}/v1", flush=True)
    log.info("forwarding to %s as %s", config.upstream.url, config.shim.instance)
    await stop.wait()
    log.info("stopping: finishing in-flight requests, then flushing events")
    await runner.cleanup()
    setup.shutdown()  # the last spans and metrics out to the collector
    log.info("stopped")


async def _cancel_background_tasks(timeout_s: float) -> None:
    """Cancel every other task and wait for them, up to ``timeout_s``. Left to
    asyncio.Runner's close instead, a shim that could not listen while its
    Kafka connect was in progress hung there rather than exiting."""
    others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in others:
        task.cancel()
    if others:
        await asyncio.wait(others, timeout=timeout_s)


def freeze_startup_heap() -> None:
    """Move what startup made (modules, config, clients: ~90k objects, all living as
    long as the process) out of the garbage collector's sight. Each full collection
    walked all of them, ~85 ms here, stalling every request in flight; now it walks
    only what requests made since."""
    gc.collect()
    gc.freeze()


def serve(config: Config) -> None:
    """Run the proxy until SIGINT or SIGTERM (blocking); exits 0 after a clean stop."""
    logs.configure(config.telemetry, SERVICE)
    setup.start(SERVICE, config.telemetry)  # before the lifecycle asks whether spans are collected
    _raise_open_files_limit(config)
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(config))


def _raise_open_files_limit(config: Config) -> None:
    """Each request in flight holds two sockets (client, upstream): a soft limit
    of 1024 open files would fail a burst of 500 with EMFILE, so take the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d: %s", soft, exc)
    # Full upstream and Redis pools, a client socket per upstream one, and some files.
    needed = 2 * config.upstream.max_connections + config.services.redis_max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("open files are limited to %d, below the %d a full upstream.max_connections "
                    "can need: raise the hard limit (ulimit -Hn)", soft, needed)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (its transports and scheduling
    are in C: about a third less CPU per proxied request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
