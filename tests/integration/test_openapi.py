"""The shim's OpenAPI document (GET /openapi.json) against the real shim:
schemathesis generates requests for every operation from it (valid and
invalid), and every answer must be no 5xx and conform to the document:
status, content type, headers, body schema."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from schemathesis.generation import GenerationMode

from gateway_shim.openapi import document
from tests.integration.enforcement_helpers import ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker

INGEST, ADMIN = "ingest-secret-token", "admin-secret-token"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]


async def test_every_answer_conforms_to_the_served_document(shim_factory: ShimFactory, cli_process) -> None:
    # Wrong credentials are sent on purpose, far more than 20 a minute: the failed-auth
    # limiter (tested in test_access.py) would soon answer every call 429, right key or not.
    shim = await shim_factory({}, shim={"ingest_token": INGEST, "admin_token": ADMIN, "auth_failures_per_minute": 0})
    # GET /v1/usage?start_time=… reads the ledger through a worker.
    await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
    key = shim.new_key("documented", "pro")
    root = shim.base_url.removesuffix("/v1")
    async with aiohttp.ClientSession() as session, session.get(f"{root}/openapi.json") as response:
        assert response.status == 200 and response.content_type == "application/json"
        served = await response.json()
    assert served == json.loads(json.dumps(document()))
    assert served["openapi"] == "3.1.0"
    assert set(served["paths"]) == {"/healthz", "/v1/usage", "/v1/events", "/v1/events/kong", "/v1/check"}
    schema = schemathesis.openapi.from_dict(served)
    # Who may call what: the right credential, a wrong one, or none.
    credentials = {"/v1/events": INGEST, "/v1/events/kong": INGEST, "/v1/usage": key, "/v1/check": key}
    calls: dict[str, list[int]] = {}

    for result in schema.get_all_operations():
        operation = result.ok()
        right = credentials.get(operation.path)
        tokens = st.sampled_from([right, right, right, ADMIN, "sk-wrong", None])

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy() | operation.as_strategy(GenerationMode.NEGATIVE), token=tokens)
        def exercise(case: schemathesis.Case, token: str | None) -> None:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            # Sent with requests itself: schemathesis' own sender reads urllib3's pool internals,
            # which urllib3-future (a dependency of grafana-client's niquests) replaces.
            response = requests.request(**case.as_transport_kwargs(base_url=root, headers=headers), timeout=20)
            calls.setdefault(f"{operation.method.upper()} {operation.path}", []).append(response.status_code)
            case.validate_response(response, checks=CHECKS)

        await asyncio.to_thread(exercise)

    assert shim.process.alive, shim.process.log_tail()
    summary = {name: sorted(set(statuses)) for name, statuses in calls.items()}
    print(f"\n{sum(map(len, calls.values()))} calls: {summary}")
    # Each operation was reached past its authentication, not only refused at the door.
    assert 200 in summary["GET /healthz"] and 200 in summary["GET /v1/usage"] and 200 in summary["POST /v1/check"]
    assert 202 in summary["POST /v1/events/kong"] and {202, 400, 401} <= set(summary["POST /v1/events"])


async def test_own_endpoints_refuse_deep_json(shim_factory: ShimFactory) -> None:
    """A body nested past what Python's parser can take is a 400 everywhere, never a 500."""
    shim = await shim_factory({}, shim={"ingest_token": INGEST})
    key = shim.new_key("deep", "pro")
    deep = b"[" * 100_000 + b"]" * 100_000
    root = shim.base_url.removesuffix("/v1")
    targets = [("/v1/events", INGEST, "application/cloudevents-batch+json", 400),
               ("/v1/events/kong", INGEST, "application/json", 400),
               ("/v1/check", key, "application/json", 200)]  # check ignores a body it cannot read
    async with aiohttp.ClientSession() as session:
        for path, token, content_type, expected in targets:
            headers = {"Authorization": f"Bearer {token}", "Content-Type": content_type}
            async with session.post(root + path, data=deep, headers=headers) as response:
                assert response.status == expected, (path, response.status, await response.text())
    assert shim.process.alive, shim.process.log_tail()
