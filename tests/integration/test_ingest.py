"""``POST /v1/events`` on a running shim: usage reported by another gateway
reaches the ledger through the spool, Kafka and a real worker, once per id."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp

from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess
from tests.integration.pipeline_helpers import http_json, redis_usage, start_worker, wait_for
from tests.integration.test_spool import _health

TOKEN = "ingest-token-for-tests-only"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"


def event(id: str, customer: str, input_tokens: int, output_tokens: int, **data: Any) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": id,
        "source": "kong-edge-1",
        "type": "quotameter.request.v1",
        "subject": customer,
        "time": datetime.now(UTC).isoformat(),
        "data": {
            "api_key_id": "kong-consumer-7",
            "tier": "pro",
            "route": "/v1/chat/completions",
            "status": 200,
            "decision": "admitted",
            "model_requested": "mock-small",
            "model_served": "mock-small",
            "input_tokens": input_tokens,
            "output_tokens": output_tokens,
            "usage_source": "upstream",
            **data,
        },
    }


async def post(
    config: Config, body: Any, content_type: str | None = STRUCTURED, token: str | None = TOKEN, raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any]]:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if content_type is not None:
        sent["Content-Type"] = content_type
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://{config.shim.host}:{config.shim.port}/v1/events",
            data=raw if raw is not None else aiohttp.JsonPayload(body, content_type=content_type or ""),
            headers=sent,
        ) as response:
            return response.status, await response.json(content_type=None)


async def start_shim(cli_process, config_factory, token: str | None = TOKEN, **shim: Any) -> tuple[Config, Any, ManagedProcess]:
    # Nothing is proxied here: the upstream is never called.
    config, path = config_factory({"tiers": {"pro": {}}, "shim": shim})
    env = {"QUOTAMETER_SHIM__INGEST_TOKEN": token} if token is not None else {}
    process = cli_process("shim", "proxy", config_path=path, env=env)
    await asyncio.to_thread(process.wait_port, config.shim.host, config.shim.port)
    return config, path, process


def ledger_rows(config: Config, customer: str) -> dict[str, Any]:
    """The ledger's raw rows of a customer, duplicates included (no FINAL)."""
    status, body = http_json(
        f"{config.services.worker_url}/query",
        f"""SELECT count() AS rows, uniqExact(id) AS ids, sum(input_tokens) AS input_tokens,
                   sum(output_tokens) AS output_tokens, arraySort(groupArray(id)) AS id_list
            FROM quotameter.events WHERE customer = '{customer}'""",
        config=config,
    )
    assert status == 200, body
    row = body["rows"][0]
    return {**{k: int(v) for k, v in row.items() if k != "id_list"}, "id_list": row["id_list"]}


async def spool_depth(config: Config) -> int:
    return (await _health(config))[1]["events"]["spool"]["depth"]


async def test_reported_events_reach_the_ledger_once_per_id(cli_process, config_factory) -> None:
    config, path, _ = await start_shim(cli_process, config_factory)
    assert config.shim.delivery == "ledger"  # the spool keeps each event until the ledger has it
    await asyncio.to_thread(start_worker, cli_process, config, path, "worker")

    # One event in structured mode, then a batch.
    assert await post(config, event("solo", "kong", 100, 10)) == (202, {"accepted": 1})
    batch = [event(f"b-{n}", "kong", 200 + n, 20 + n) for n in range(3)]
    assert await post(config, batch, BATCH) == (202, {"accepted": 3})
    # A batch with one bad event: refused whole, naming the field and the index.
    doomed = [event("doomed-0", "kong", 1, 1), event("doomed-1", "kong", 1, 1), event("doomed-2", "kong", -5, 1)]
    status, body = await post(config, doomed, BATCH)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_event" and body["error"]["param"] == "events[2].data.input_tokens"
    assert body["error"]["message"].startswith("events[2].data.input_tokens: Input should be greater than or equal to 0")
    # The reporter retries: the same ids again, in new requests, one beside a new event.
    assert await post(config, event("solo", "kong", 100, 10)) == (202, {"accepted": 1})
    assert await post(config, [batch[1], event("last", "kong", 300, 30)], BATCH) == (202, {"accepted": 2})

    # Every spooled event is confirmed by the ledger, in spool order: the doomed
    # batch would have been delivered before the last one had it been spooled.
    deadline = time.monotonic() + 60
    while await spool_depth(config) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await spool_depth(config) == 0
    rows = ledger_rows(config, "kong")
    assert rows == {
        "rows": 5, "ids": 5, "input_tokens": 100 + 200 + 201 + 202 + 300, "output_tokens": 10 + 20 + 21 + 22 + 30,
        "id_list": ["b-0", "b-1", "b-2", "last", "solo"],
    }
    # The quota state the shim admits against counts them once too.
    period = config.billing.calendar.current(datetime.now(UTC))
    totals = wait_for(lambda: (h := redis_usage(config, "kong", period)).get("requests") == "5" and h, what="Redis totals")
    assert (totals["input_tokens"], totals["output_tokens"]) == ("1003", "103")


async def test_bad_requests_are_refused_and_nothing_is_spooled(cli_process, config_factory) -> None:
    config, _, _ = await start_shim(cli_process, config_factory, ingest_max_bytes=4096, ingest_max_events=3)
    one = event("e-1", "acme", 10, 1)

    for token in ("wrong-token", TOKEN + "x", None):
        status, body = await post(config, one, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body
    status, body = await post(config, one, token=None, headers={"Authorization": f"Basic {TOKEN}"})
    assert status == 401, body
    # A token that is not UTF-8 (raw bytes on the wire) is a wrong token too.
    reader, writer = await asyncio.open_connection(config.shim.host, config.shim.port)
    writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe" + TOKEN.encode()
                 + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    answer = await reader.read()
    writer.close()
    assert answer.startswith(b"HTTP/1.1 401 ") and b"invalid_api_key" in answer, answer

    status, body = await post(config, one, content_type="application/json")
    assert status == 415 and body["error"]["code"] == "unsupported_media_type", body
    status, body = await post(config, one, raw=b'{"id": ', content_type=STRUCTURED)
    assert status == 400 and body["error"]["code"] == "invalid_json", body
    status, body = await post(config, {**one, "subject": ""})
    assert status == 400 and body["error"]["param"] == "subject", body
    assert body["error"]["message"] == "subject: String should have at least 1 character; the event was not taken."
    # A time the ledger cannot hold (a year of three digits would be misread, or refuse its whole batch).
    status, body = await post(config, {**one, "time": "0999-05-06T07:08:09.123Z"})
    assert status == 400 and body["error"]["param"] == "time", body

    # Too large: by Content-Length, by a chunked body with no length, by the event count.
    big = [event(f"big-{n}", "acme", 10, 1) for n in range(3)]
    big[0]["data"]["padding"] = "x" * 5000
    status, body = await post(config, big, BATCH)
    assert status == 413 and body["error"]["code"] == "payload_too_large" and "4096 bytes" in body["error"]["message"], body

    async def chunks():
        for part in (b"[", b" " * 3000, b" " * 3000, b"]"):
            yield part

    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://{config.shim.host}:{config.shim.port}/v1/events", data=chunks(),
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": BATCH},
        ) as response:
            assert response.status == 413 and "4096 bytes" in (await response.json())["error"]["message"]
    status, body = await post(config, [event(f"n-{n}", "acme", 1, 1) for n in range(4)], BATCH)
    assert status == 413 and "at most 3 are taken" in body["error"]["message"], body

    assert await spool_depth(config) == 0  # no worker runs: whatever was spooled would still be there
    assert await post(config, [event(f"n-{n}", "acme", 1, 1) for n in range(3)], BATCH) == (202, {"accepted": 3})
    assert await spool_depth(config) == 3


async def test_without_a_token_configured_the_endpoint_does_not_exist(cli_process, config_factory) -> None:
    config, _, _ = await start_shim(cli_process, config_factory, token=None)
    assert config.shim.ingest_token is None
    for token in (TOKEN, "", None):
        status, body = await post(config, event("e-1", "acme", 1, 1), token=token)
        assert status == 404 and body["error"]["code"] == "ingest_disabled", body
    assert await spool_depth(config) == 0


async def test_a_full_spool_refuses_reports(cli_process, config_factory) -> None:
    # No worker: the ledger confirms nothing, so the spool only grows.
    config, _, _ = await start_shim(cli_process, config_factory, spool_max_bytes=2048)
    batch = [event(f"f-{n}", "acme", 1, 1) for n in range(10)]
    assert await post(config, batch, BATCH) == (202, {"accepted": 10})  # admitted before the bound: spooled past it
    status, body = await post(config, event("f-late", "acme", 1, 1))
    assert status == 503 and body["error"]["code"] == "metering_unavailable", body
    assert await spool_depth(config) == 10


async def test_the_readme_curl_works(cli_process, config_factory) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in readme.split("```") if b.lstrip().startswith("curl -s http://127.0.0.1:8080/v1/events"))
    *command, expected = block.strip().splitlines()
    config, _, _ = await start_shim(cli_process, config_factory)
    script = "\n".join(command).replace("http://127.0.0.1:8080", f"http://{config.shim.host}:{config.shim.port}")
    done = await asyncio.to_thread(
        subprocess.run, ["bash", "-c", script], capture_output=True, text=True, timeout=20,
        env={**os.environ, "QUOTAMETER_SHIM__INGEST_TOKEN": TOKEN},
    )
    assert (done.returncode, done.stdout.strip()) == (0, expected), done.stderr
    assert await spool_depth(config) == 1


async def test_events_a_dropping_spool_could_not_take_are_not_acknowledged(cli_process, config_factory) -> None:
    # spool_full: drop keeps serving the proxy, but a report is only taken if all of it was spooled.
    config, _, _ = await start_shim(cli_process, config_factory, spool_max_bytes=2048, spool_full="drop")
    status, body = await post(config, [event(f"d-{n}", "acme", 1, 1) for n in range(10)], BATCH)
    depth = await spool_depth(config)
    assert 0 < depth < 10
    assert status == 503 and body["error"]["code"] == "metering_unavailable", body
    assert body["error"]["message"].startswith(f"{10 - depth} of 10 events could not be recorded")
