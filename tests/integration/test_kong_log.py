"""``POST /v1/events/kong`` on a running shim: Kong http-log entries with AI usage
reach the ledger through the spool, Kafka and a real worker, once per request,
and an entry carrying a ``/v1/check`` admission's event id settles it.

No Kong binary installs here: the entries are tests/fixtures/kong/, written from
Kong Gateway 3.8+ documentation, posted as http-log posts them."""

from __future__ import annotations

import asyncio
import copy
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from quotameter.config import Config
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_check import TIERS, check
from tests.integration.test_ingest import TOKEN, ledger_rows, spool_depth, start_shim

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "kong"
SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "kong" / "http-log.yaml"
DECK_TOKEN = '${{ env "DECK_QUOTAMETER_INGEST_TOKEN" }}'


def fixture(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def now_ms() -> int:
    return int(time.time() * 1000)


def fresh(entry: dict[str, Any], request_id: str) -> dict[str, Any]:
    """The entry as Kong would log it now, for another request."""
    entry = copy.deepcopy(entry)
    entry["request"]["id"] = request_id
    entry["response"]["headers"]["x-kong-request-id"] = request_id
    entry["started_at"] = now_ms()
    return entry


def http_log_config(token: str) -> dict[str, Any]:
    """The shipped http-log plugin's config, as decK renders it with ``token``."""
    document = yaml.safe_load(SHIPPED.read_text().replace(DECK_TOKEN, token))
    [plugin] = [p for p in document["plugins"] if p["name"] == "http-log"]
    return plugin["config"]


async def post_kong(config: Config, body: Any, token: str | None = TOKEN) -> tuple[int, dict[str, Any]]:
    # What the shipped http-log plugin sends: its method, content type and headers.
    shipped = http_log_config(token or "")
    assert shipped["http_endpoint"].endswith("/v1/events/kong") and shipped["method"] == "POST"
    headers = {"Content-Type": shipped["content_type"], **shipped["headers"]}
    if token is None:
        del headers["Authorization"]
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://{config.shim.host}:{config.shim.port}/v1/events/kong", data=json.dumps(body), headers=headers
        ) as response:
            return response.status, await response.json(content_type=None)


async def test_kong_entries_reach_the_ledger_once_per_request(cli_process, config_factory) -> None:
    config, path, _ = await start_shim(cli_process, config_factory)
    assert config.shim.delivery == "ledger" and config.shim.kong_customer_from == "consumer_username"
    single = fresh(fixture("chat-consumer.json"), "a0000000000000000000000000000001")
    streamed, plain, embedding = (fresh(e, f"b000000000000000000000000000000{n}") for n, e in enumerate(fixture("batch.json")))
    batch = [streamed, plain, embedding]

    # A wrong or missing token: refused, nothing taken.
    for token in ("wrong-token", None):
        status, body = await post_kong(config, single, token=token)
        assert status == 401 and body["error"]["code"] == "invalid_api_key", body

    # One entry (http-log's default queue.max_batch_size: 1), then a batch.
    assert await post_kong(config, single) == (202, {"accepted": 1, "skipped": 0})
    assert await post_kong(config, batch) == (202, {"accepted": 2, "skipped": 1})

    # A batch with one bad entry: refused whole, naming the index and the field.
    doomed = [fresh(single, f"c000000000000000000000000000000{n}") for n in range(3)]
    for entry in doomed:
        entry["consumer"]["username"] = "doomed"
    doomed[2]["ai"]["proxy"]["usage"]["completion_tokens"] = -4
    status, body = await post_kong(config, doomed)
    assert status == 400, body
    assert body["error"]["code"] == "invalid_event"
    assert body["error"]["param"] == "entries[2].ai.proxy.usage.completion_tokens"
    assert body["error"]["message"].startswith("entries[2].ai.proxy.usage.completion_tokens: must be a non-negative integer")

    # Kong retries a delivery it saw fail (its queue resends the same entries): billed once.
    assert await post_kong(config, single) == (202, {"accepted": 1, "skipped": 0})
    assert await post_kong(config, [embedding, plain]) == (202, {"accepted": 1, "skipped": 1})
    late = fresh(single, "a0000000000000000000000000000002")
    late["ai"]["proxy"]["usage"].update(prompt_tokens=5, completion_tokens=3)
    assert await post_kong(config, late) == (202, {"accepted": 1, "skipped": 0})

    await asyncio.to_thread(start_worker, cli_process, config, path, "worker")
    deadline = time.monotonic() + 60
    while await spool_depth(config) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert await spool_depth(config) == 0
    # The ledger to the token: what Kong's AI plugin counted, each request once.
    acme = ledger_rows(config, "acme")
    assert {k: acme[k] for k in ("rows", "ids", "input_tokens", "output_tokens")} == {
        "rows": 3, "ids": 3, "input_tokens": 28 + 64 + 5, "output_tokens": 117 + 0 + 3,
    }
    globex = ledger_rows(config, "globex")
    assert {k: globex[k] for k in ("rows", "ids", "input_tokens", "output_tokens")} == {
        "rows": 1, "ids": 1, "input_tokens": 310, "output_tokens": 902,
    }
    assert ledger_rows(config, "doomed")["rows"] == 0  # delivered before `late` had it been spooled


async def test_a_kong_entry_with_a_checks_event_id_settles_its_admission(shim_factory: ShimFactory, cli_process) -> None:
    shim = await shim_factory(TIERS, shim={"ingest_token": TOKEN, "kong_customer_from": "header"})
    key = shim.new_key("kong-edge", "checked")
    names = shim.names

    # Kong's access phase asks /v1/check (as the nginx snippet does) and passes its answer upstream.
    status, headers, body = await check(shim.base_url, key)
    assert status == 200, body
    event_id = headers["x-quotameter-event-id"]
    reserved_tokens, _, pending = shim.reserved("kong-edge")
    assert set(pending) == {event_id} and reserved_tokens > 16

    entry = fresh(fixture("checked.json"), "d0000000000000000000000000000001")
    entry["request"]["headers"].update({
        "x-quotameter-customer": headers["x-quotameter-customer"],
        "x-quotameter-event-id": event_id,
        "x-quotameter-tier": headers["x-quotameter-tier"],
    })
    # Another route of the same Kong, not an LLM call, in the same batch.
    plain = fresh(fixture("batch.json")[1], "d0000000000000000000000000000002")
    assert await post_kong(shim.config, [plain, entry]) == (202, {"accepted": 1, "skipped": 1})

    client = shim.redis()
    try:
        # Settled with the entry's usage: 11 prompt + 5 completion tokens, its slot freed.
        tokens, _, pending = shim.reserved("kong-edge")
        assert pending[event_id].startswith("16:") and tokens == 16
        assert client.zscore(names.in_flight("kong-edge"), event_id) is None
        assert client.exists(names.check_ticket("kong-edge", event_id)) == 0

        # Kong delivers it again: only ingested, settled once.
        assert await post_kong(shim.config, entry) == (202, {"accepted": 1, "skipped": 0})
        assert shim.reserved("kong-edge")[2] == {event_id: pending[event_id]}

        # The worker: the check's event id in the ledger once, with the entry's tokens,
        # and the settled entry released once the totals include it.
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        rows = await asyncio.to_thread(
            wait_for, lambda: (r := ledger_rows(shim.config, "kong-edge"))["ids"] >= 1 and r, 60.0, "the event"
        )
        assert rows == {"rows": 1, "ids": 1, "input_tokens": 11, "output_tokens": 5, "id_list": [event_id]}
        await asyncio.to_thread(wait_for, lambda: not shim.reserved("kong-edge")[2], 30.0, "pending released")
    finally:
        client.close()


def test_the_readme_shows_the_shipped_file() -> None:
    # deploy/README.md shows the file abridged: every line it shows is the file's own.
    readme = (SHIPPED.parents[1] / "README.md").read_text()
    block = next(b for b in readme.split("```") if b.startswith("yaml\nplugins:\n  - name: http-log"))
    shipped = {line.rstrip() for line in SHIPPED.read_text().splitlines()}
    missing = [line for line in block.splitlines()[1:] if line.strip() and line.rstrip() not in shipped]
    assert missing == [], missing
    assert http_log_config(TOKEN)["headers"] == {"Authorization": f"Bearer {TOKEN}"}
    assert http_log_config(TOKEN)["queue"]["max_batch_size"] <= 1000  # shim.ingest_max_events' default
