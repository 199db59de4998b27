"""``/v1/check`` on a real shim: the proxy's admission without proxying, and a
usage report of the check's event id settling its reservation (real worker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from quotameter.config import load_config
from quotameter.embedded.procs import free_port

from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_ingest import event, ledger_rows, post

TOKEN = "ingest-token-for-tests-only"
TIERS = {
    "checked": {
        "requests_per_minute": 2,
        "tokens_per_minute": 100_000,
        "concurrent_requests": 5,
        "monthly_tokens": 1_000_000,
        "default_max_tokens": 100,
        "allowed_models": ["mock-small"],
        "upgrade_hint": "Upgrade to Pro.",
    },
}


async def check(base_url: str, key: str | None, model: str | None = "mock-small", method: str = "GET") -> tuple[int, Any, Any]:
    headers = {"X-Original-URI": "/v1/chat/completions"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if model is not None:
        headers["x-quotameter-model"] = model
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"{base_url}/check", headers=headers) as response:
            return response.status, response.headers, await response.json(content_type=None)


async def second_shim(cli_process, shim_config_path: Path) -> Any:
    """Another shim process on the same Redis and topic (its own port, spool and name)."""
    document = yaml.safe_load(shim_config_path.read_text())
    document["shim"].update(port=free_port(), spool_dir=document["shim"]["spool_dir"] + "-2",
                            instance=document["shim"]["instance"] + "-2")
    path = shim_config_path.with_name("config-2.yaml")
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    config = load_config(path)
    process = cli_process("shim-2", "proxy", config_path=path)
    await asyncio.to_thread(process.wait_port, config.shim.host, config.shim.port)
    return config


def reported(event_id: str, customer: str, input_tokens: int, output_tokens: int) -> dict[str, Any]:
    body = event(event_id, customer, input_tokens, output_tokens)
    body["data"].update(tier="checked", api_key_id="nginx")
    return body


async def test_check_admits_refuses_and_a_report_settles(shim_factory: ShimFactory, cli_process) -> None:
    shim = await shim_factory(TIERS, shim={"ingest_token": TOKEN})
    key = shim.new_key("edge", "checked")
    names, period = shim.names, shim.period()

    assert (await check(shim.base_url, None))[0] == 401
    assert (await check(shim.base_url, "sk-not-a-key"))[2]["error"]["code"] == "invalid_api_key"
    status, _, body = await check(shim.base_url, key, model="gpt-4o")
    assert status == 403 and body["error"]["code"] == "model_not_allowed"

    # Admitted twice (GET, then POST as nginx would send the client's method).
    ids = []
    for method in ("GET", "POST"):
        status, headers, body = await check(shim.base_url, key, method=method)
        assert status == 200, body
        assert headers["x-quotameter-customer"] == "edge" and headers["x-quotameter-tier"] == "checked"
        assert headers["x-ratelimit-limit-requests"] == "2" and headers["RateLimit"].startswith('"requests";r=')
        assert body["event_id"] == headers["x-quotameter-event-id"]
        ids.append(headers["x-quotameter-event-id"])
    first, second = ids
    assert headers["x-ratelimit-remaining-requests"] == "0"

    # The third within the minute: the proxy's own refusal.
    status, headers, body = await check(shim.base_url, key)
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "2 requests per minute" in body["error"]["message"] and "Upgrade to Pro." in body["error"]["message"]
    assert 1 <= int(headers["Retry-After"]) <= 60 and headers["x-ratelimit-remaining-requests"] == "0"

    client = shim.redis()
    try:
        # Reserved: the prompt unseen, the tier's default_max_tokens of output (+3 priming tokens).
        tokens, _, pending = shim.reserved("edge")
        assert set(pending) == {first, second} and tokens == 2 * int(pending[first].split(":")[0])
        assert client.zscore(names.in_flight("edge"), first) is not None
        ttl_ms = client.pttl(names.check_ticket("edge", first))
        assert 0 < ttl_ms <= 900_000

        # The report of the first settles it with the true usage, on another shim process.
        other = await second_shim(cli_process, shim.config_path)
        assert await post(other, reported(first, "edge", 7, 5)) == (202, {"accepted": 1})
        tokens, _, pending = shim.reserved("edge")
        assert pending[first].startswith("12:")
        assert client.zscore(names.in_flight("edge"), first) is None  # its concurrency slot is free
        assert client.exists(names.check_ticket("edge", first)) == 0

        # The second's entry is gone before its report arrives (expired, or released):
        # the report is ingested, and the entry is not brought back.
        client.hdel(names.pending("edge", period), second)
        client.zrem(names.pending_expiry("edge", period), second)
        assert await post(shim.config, reported(second, "edge", 3, 4)) == (202, {"accepted": 1})
        assert second not in shim.reserved("edge")[2]
        assert client.zscore(names.in_flight("edge"), second) is None

        # A resend of the first, and an id no check issued: only ingested.
        assert await post(shim.config, reported(first, "edge", 7, 5)) == (202, {"accepted": 1})
        assert await post(shim.config, reported("gw-unknown", "edge", 1, 1)) == (202, {"accepted": 1})
        assert shim.reserved("edge")[2] == {first: pending[first]}

        # A proxy that sends the body (Envoy's with_request_body): the model and the
        # prompt are read from it, and max_tokens bounds the worst case.
        body_key = shim.new_key("edge-body", "checked")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{shim.base_url}/check", headers={"Authorization": f"Bearer {body_key}"},
                json={"model": "mock-small", "messages": MESSAGES, "max_tokens": 10},
            ) as response:
                assert response.status == 200, await response.text()
                body_id = response.headers["x-quotameter-event-id"]
            async with session.post(
                f"{shim.base_url}/check", headers={"Authorization": f"Bearer {body_key}"},
                json={"model": "gpt-4o", "messages": MESSAGES},
            ) as response:
                assert response.status == 403 and (await response.json())["error"]["code"] == "model_not_allowed"
        assert shim.reserved("edge-body")[2][body_id].startswith(f"{PROMPT_TOKENS + 10}:")

        # The worker: one ledger row per id (both refusals' too: 403 and 429), and the first's
        # settled entry released once its totals include it.
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        rows = await asyncio.to_thread(
            wait_for, lambda: (r := ledger_rows(shim.config, "edge"))["ids"] >= 5 and r, 60.0, "5 ledger ids"
        )
        assert rows["rows"] == rows["ids"] == 5 and first in rows["id_list"] and second in rows["id_list"]
        await asyncio.to_thread(wait_for, lambda: not shim.reserved("edge")[2], 30.0, "pending released")
    finally:
        client.close()
