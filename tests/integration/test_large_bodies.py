"""A large body against a real shim: parsed, checked and counted off the event
loop, it does not stall the shim's other requests (measured: the longest
/healthz round trip while it is served, on the loop and in a thread)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.test_hostile_requests import CHAT, _chat, _post

pytestmark = pytest.mark.whole_machine  # run alone by make test (pyproject.toml)


async def _loop_stall(shim: Any, body: bytes) -> tuple[float, int]:
    """The longest /healthz round trip while ``body`` is posted (how long the
    shim's event loop stalled), and the post's status."""
    key = shim.new_key("large", "pro")
    healthz = shim.base_url.removesuffix("/v1") + "/healthz"
    worst = 0.0
    async with aiohttp.ClientSession() as session:
        async def probe() -> None:
            nonlocal worst
            while True:
                started = time.perf_counter()
                async with session.get(healthz) as response:
                    await response.read()
                worst = max(worst, time.perf_counter() - started)
                await asyncio.sleep(0.005)

        prober = asyncio.create_task(probe())
        await asyncio.sleep(0.3)
        status, _ = await _post(session, shim.base_url + CHAT, body, key)
        prober.cancel()
    return worst, status


async def test_large_bodies_do_not_stall_the_event_loop(shim_factory: ShimFactory, tmp_path: Path) -> None:
    # 16 messages of ~900k characters: a 14.4 MB body, ~7M prompt tokens to count.
    text = " ".join("0123456789" * 45_000)
    body = json.dumps(_chat(messages=[{"role": "user", "content": text}] * 16, max_tokens=5)).encode()
    tiers = {"pro": {"tokens_per_minute": 10**9, "monthly_tokens": 10**12, "monthly_budget_usd": "1000000"}}
    on_loop = await shim_factory(tiers, shim={"parse_in_thread_bytes": 64 * 1024 * 1024})
    stall_on_loop, status_on_loop = await _loop_stall(on_loop, body)
    # The default: bodies past 1 MiB are read in a thread.
    threaded = await shim_factory(tiers, shim={"spool_dir": str(tmp_path / "spool-threaded")})
    stall_threaded, status_threaded = await _loop_stall(threaded, body)
    print(f"\n{len(body)} bytes: loop stall {stall_on_loop:.3f} s parsed on the loop, "
          f"{stall_threaded:.3f} s in a thread")
    assert status_on_loop == status_threaded == 200
    # Loose bounds: the machine may be busy (two processes count the prompt: the shim and the mock).
    assert stall_threaded < 0.5 and stall_threaded < stall_on_loop / 4, (stall_on_loop, stall_threaded)
