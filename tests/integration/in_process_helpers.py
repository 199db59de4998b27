"""Shared pieces of the in-process adapters' tests (test_asgi.py, test_litellm.py):
keys, a host process with quotameter inside, and the ledger's rows by event id."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config
from quotameter.embedded.procs import ManagedProcess
from quotameter.redis_keys import RedisKeys
from tests.integration.pipeline_helpers import http_json

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
