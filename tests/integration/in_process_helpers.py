"""Shared pieces of the in-process adapters' tests (test_asgi.py, test_litellm.py):
keys, a host process with quotameter inside, and the ledger's rows by event id."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess
from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import http_json, wait_for

ROOT = Path(__file__).resolve().parents[2]


def new_key(config: Config, customer: str, tier: str) -> str:
    client = redis.Redis.from_url(config.services.redis_url, decode_responses=True)
    try:
        return create_key(client, RedisKeys(config.services.redis_prefix), customer, tier).plaintext
    finally:
        client.close()


def host_process(name: str, argv: list[str], log: Path, config_path: Path, env: dict[str, str] | None = None,
                 cwd: Path = ROOT) -> ManagedProcess:
    """``python -m ARGV…`` (from the repository's root), its quotameter config in QUOTAMETER_CONFIG."""
    return ManagedProcess(name, [sys.executable, "-m", *argv], log, cwd=cwd,
                          env={"QUOTAMETER_CONFIG": str(config_path), **(env or {})}).start()


def ledger(config: Config, customer: str) -> dict[str, dict[str, Any]]:
    """The ledger's rows of a customer by event id (duplicates would show as a count)."""
    status, body = http_json(
        f"{config.services.worker_url}/query",
        f"""SELECT id, count() AS copies, any(input_tokens) AS input_tokens, any(output_tokens) AS output_tokens,
                   any(decision) AS decision, any(usage_source) AS usage_source, any(streamed) AS streamed,
                   any(status) AS status, any(reason) AS reason, any(model_served) AS model_served,
                   any(end_user) AS end_user, toJSONString(any(tags)) AS tags
            FROM quotameter.events WHERE customer = '{customer}' GROUP BY id""",
        config=config,
    )
    assert status == 200, body
    return {row["id"]: row for row in body["rows"]}


async def check_ledger(config: Config, served: dict[str, tuple[int, int, bool]], prompt_tokens: int, long: int) -> None:
    """Each customer's one admitted request in the ledger, to the token what its client
    was served (``served``: customer -> input, output, streamed); the client that left
    billed for what was passed on; the refusals with nothing used."""
    for customer, (input_tokens, output_tokens, streamed) in served.items():
        rows = await asyncio.to_thread(wait_for, lambda: ledger(config, customer), 60.0, f"{customer}'s events")
        admitted = [r for r in rows.values() if r["decision"] == "admitted"]
        assert len(admitted) == 1, rows
        row = admitted[0]
        assert (row["input_tokens"], row["output_tokens"]) == (input_tokens, output_tokens), (customer, row)
        assert row["copies"] == 1 and bool(row["streamed"]) == streamed and row["status"] == 200, row
        assert row["usage_source"] == ("counted" if customer == "cut" else "upstream"), row
        assert row["reason"] == {"cut": "budget_cut", "thrifty": "fallback"}.get(customer), row
        assert row["model_served"] == "mock-small", row
        # Attribution: the body's end user and the tags header, as the client sent them.
        assert (row["end_user"], row["tags"]) == (("end-user-7", '{"team":"search"}') if customer == "json"
                                                  else ("", "{}")), row
    [left] = (await asyncio.to_thread(wait_for, lambda: ledger(config, "left"), 60.0, "left's event")).values()
    assert (left["reason"], left["usage_source"], left["input_tokens"]) == ("client_disconnected", "counted", prompt_tokens)
    assert 3 <= left["output_tokens"] < long // 2, left  # what was passed on before the app stopped
    refusals = await asyncio.to_thread(
        wait_for, lambda: [r for r in ledger(config, "limited").values() if r["decision"] == "refused"], 30.0)
    assert [(r["status"], r["input_tokens"], r["output_tokens"]) for r in refusals] == [(429, 0, 0)]
    denials = [r for r in ledger(config, "json").values() if r["decision"] == "refused"]
    assert [r["status"] for r in denials] == [403]


async def leave_mid_stream(client: Any, messages: list[dict[str, str]], max_tokens: int, after: int = 3) -> None:
    """A client that reads ``after`` content chunks of a stream, then closes it."""
    stream = await client.chat.completions.create(model="mock-small", messages=messages, max_tokens=max_tokens,
                                                  stream=True)
    read = 0
    async for chunk in stream:
        read += bool(chunk.choices and chunk.choices[0].delta.content)
        if read == after:
            break
    await stream.close()
