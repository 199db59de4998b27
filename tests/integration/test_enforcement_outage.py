"""Redis stopped mid-test: fail-open limits keep serving under the in-process
limiter (decisions counted and logged), fail-closed ones answer 503; when
Redis is back, admission goes through it again."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.embedded.redis_server import redis_process
from tests.integration.enforcement_helpers import MESSAGES, Shim, ShimFactory, shim_factory  # noqa: F401

TIERS = {
    "lenient": {"requests_per_minute": 4},  # every kind fails open by default
    "guarded": {"requests_per_minute": 100, "monthly_budget_usd": "10", "fail_modes": {"monthly_budget_usd": "closed"}},
}


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[tuple[ManagedProcess, int]]:
    port = free_port()
    proc = redis_process(port, tmp_path / "redis", tmp_path / "redis.log", persist=True).start()
    proc.wait_port("127.0.0.1", port, timeout_s=20)
    yield proc, port
    proc.stop()


async def fail_mode_metrics(shim: Shim) -> dict[tuple[str, str], float]:
    async with aiohttp.ClientSession() as session, session.get(shim.base_url.removesuffix("/v1") + "/metrics") as got:
        text = await got.text()
    return {(s.labels["mode"], s.labels["limit_kind"]): s.value for family in text_string_to_metric_families(text)
            for s in family.samples if s.name == "quotameter_shim_fail_mode_decisions_total"}


async def test_redis_stopped_mid_test_under_each_fail_mode(
    shim_factory: ShimFactory, own_redis: tuple[ManagedProcess, int], tmp_path: Path
) -> None:
    redis_proc, port = own_redis
    shim = await shim_factory(TIERS, services={"redis_url": f"redis://127.0.0.1:{port}/0"})
    lenient, guarded = shim.new_key("easy", "lenient"), shim.new_key("careful", "guarded")
    async with shim.client(lenient) as easy, shim.client(guarded) as careful:
        for client in (easy, careful):  # while Redis is up (and the keys get cached)
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)

        await asyncio.to_thread(redis_proc.stop)  # SIGTERM: it saves, so keys survive the restart
        for _ in range(4):  # the local limiter allows 4/min on its own
            raw = await easy.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=1)
            assert raw.http_response.status_code == 200
        with pytest.raises(openai.RateLimitError) as limited:
            await easy.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert "4 requests per minute" in limited.value.message
        with pytest.raises(openai.InternalServerError) as closed:
            await careful.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=1)
        assert closed.value.status_code == 503 and closed.value.code == "quota_backend_unavailable"
        assert "monthly_budget_usd limits fail closed" in closed.value.message

        decisions = (await shim.health())["admission"]["fail_mode_decisions"]
        assert decisions == {"open_admitted": 4, "open_refused": 1, "closed_refused": 1}
        # The same decisions on /metrics, by mode and the kind of limit that decided.
        assert await fail_mode_metrics(shim) == {("open", ""): 4, ("open", "rpm"): 1, ("closed", "budget"): 1}
        log = shim.process.log_tail(400)
        assert "fail-open admitted" in log and "fail-closed refused" in log

        restarted = redis_process(port, tmp_path / "redis", tmp_path / "redis-2.log", persist=True).start()
        try:
            await asyncio.to_thread(restarted.wait_port, "127.0.0.1", port, 20)
            await asyncio.sleep(1.1)  # the shim tries Redis again a second after a failure
            raw = await careful.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=1
            )
            assert raw.http_response.status_code == 200 and raw.headers["x-ratelimit-remaining-requests"] == "99"
            assert "RateLimit-Policy" in raw.headers and (await shim.health())["admission"]["redis"] == "up"
        finally:
            restarted.stop()
