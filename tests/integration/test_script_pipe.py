"""The pipelined script connection (gateway_shim/resp.py) against a real
redis-server: the same replies as redis-py's path, and redis-py's exceptions
when Redis fails, stops or hangs."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from gateway_shim.admission import Admitter, Estimate
from gateway_shim.keystore import KeyRecord, create_key
from gateway_shim.resp import Script, ScriptPipe
from quotameter.config import Tier
from quotameter.embedded.procs import free_port
from quotameter.embedded.redis_server import redis_process
from quotameter.policy import resolve
from quotameter.redis_keys import RedisKeys

END = 4_000_000_000_000
T0 = 1_700_000_000_000


def test_only_plain_tcp_urls_take_the_pipe() -> None:
    assert ScriptPipe.from_url("redis://:secret@10.0.0.5:6380/2") is not None
    for url in ("rediss://10.0.0.5/0", "unix:///tmp/redis.sock", "redis://h/0?socket_keepalive=true"):
        assert ScriptPipe.from_url(url) is None


async def test_the_pipe_answers_as_redis_py_does(redis_url: str, unique: str) -> None:
    sync = redis.Redis.from_url(redis_url)
    client = aioredis.Redis.from_url(redis_url)
    pipe = ScriptPipe.from_url(redis_url)
    assert pipe is not None
    tier = Tier(requests_per_minute=3, tokens_per_minute=1000, concurrent_requests=2, monthly_tokens=500,
                monthly_budget_usd="1")
    policy = resolve("t", tier, "m")
    runs = []
    try:
        for through in (None, pipe):
            names = RedisKeys(f"pipe{unique}{'p' if through else 'r'}")
            new = create_key(sync, names, "c1", "t")
            key = KeyRecord(new.key_id, "c1", "t", False)
            admitter = Admitter(client, names, through)
            seen = []
            for i in range(6):
                got = await admitter.admit(key, policy, "2030-01", END, f"e{i}", T0 + i, Estimate(10, 50, 3, "0.5"), 1000)
                seen.append(got)
                if got.admitted:
                    await admitter.settle(key, policy, "2030-01", f"e{i}", T0 + 100 + i, reserved=(10, 50),
                                          used=(10, 5), used_micro_usd=4, settled_ttl_ms=60_000)
            seen.append(await admitter.admit(key, policy, "2030-01", END, "b", T0 + 10, Estimate(1, 1, 0, "0"), 1000, [1]))
            runs.append([(a.admitted, a.reason, a.retry_after_ms, a.output_tokens, a.rule, a.tokens_used,
                          a.micro_usd_used, a.in_flight, a.rates) for a in seen])
        assert runs[0] == runs[1]

        # Many callers in one turn of the loop: one write, replies matched in order.
        open_policy = resolve("o", Tier(), "m")
        admitter = Admitter(client, names, pipe)  # the key created for the pipe's run above
        results = await asyncio.gather(*(
            admitter.admit(key, open_policy, "p", END, f"x{i}", int(time.time() * 1000), Estimate(0, 0, 0, "0"), 1000)
            for i in range(300)
        ))
        assert all(result.admitted for result in results)

        with pytest.raises(redis.exceptions.ResponseError):  # a script error is the caller's, the pipe goes on
            await pipe.evalsha(Script("return redis.call('NO_SUCH_COMMAND')"), 0, b"", b"", 0)
        await client.script_flush()  # as after a Redis restart: NOSCRIPT, then the script is loaded again
        assert (await admitter.admit(key, open_policy, "p", END, "again", T0, Estimate(0, 0, 0, "0"), 1000)).admitted
    finally:
        await pipe.close()
        await client.aclose()
        sync.close()


async def test_a_stopped_or_hung_redis_raises_what_redis_py_raises(tmp_path: Path) -> None:
    port = free_port()
    script = Script("return 7")
    server = redis_process(port, tmp_path / "redis", tmp_path / "redis.log", persist=False).start()
    pipe = ScriptPipe("127.0.0.1", port, timeout_s=0.5)
    try:
        server.wait_port("127.0.0.1", port, timeout_s=20)
        assert await pipe.evalsha(script, 0, b"", b"", 0) == 7
        await asyncio.to_thread(server.stop)
        for _ in range(2):  # the connection it had, then a new one: refused at once
            with pytest.raises(redis.exceptions.ConnectionError):
                await pipe.evalsha(script, 0, b"", b"", 0)

        server = redis_process(port, tmp_path / "redis", tmp_path / "redis-2.log", persist=False).start()
        await asyncio.to_thread(server.wait_port, "127.0.0.1", port, 20)
        assert await pipe.evalsha(script, 0, b"", b"", 0) == 7  # reconnected, script loaded again

        assert server.pid is not None
        os.kill(server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(redis.exceptions.TimeoutError):
                await pipe.evalsha(script, 0, b"", b"", 0)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        assert await pipe.evalsha(script, 0, b"", b"", 0) == 7
    finally:
        await pipe.close()
        server.stop()
