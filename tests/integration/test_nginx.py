"""nginx (Debian's, auth_request) in front of the mock model, admitting through
``/v1/check`` with deploy/nginx/quotameter.conf as shipped; the official
openai client sees the admission and the refusal, and the usage reported
under the check's event id settles the reservation (real worker, ledger)."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import openai
import pytest

from quotameter.embedded.procs import ManagedProcess, free_port
from tests.integration.enforcement_helpers import MESSAGES, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_check import TIERS, TOKEN, reported
from tests.integration.test_ingest import ledger_rows, post

SNIPPET = Path(__file__).resolve().parents[2] / "deploy" / "nginx" / "quotameter.conf"


def start_nginx(tmp_path: Path, shim_port: int, model_port: int) -> tuple[ManagedProcess, int]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    assert binary, "nginx is not installed: make test installs it (Debian package nginx-light)"
    port = free_port()
    root = tmp_path / "nginx"
    root.mkdir()
    site = SNIPPET.read_text()
    for placeholder, address in (("__LISTEN__", port), ("__QUOTAMETER__", shim_port), ("__MODEL__", model_port)):
        site = site.replace(placeholder, f"127.0.0.1:{address}")
    (root / "quotameter.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n    access_log off;\n{temp}\n    include {root}/quotameter.conf;\n}}\n"
    )
    process = ManagedProcess("nginx", [binary, "-p", str(root), "-c", str(root / "nginx.conf")], tmp_path / "nginx.log").start()
    process.wait_port("127.0.0.1", port)
    return process, port


async def test_nginx_auth_request_admits_refuses_and_the_report_settles(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    shim = await shim_factory(TIERS, shim={"ingest_token": TOKEN})
    model_port = int(shim.config.upstream.url.split(":")[-1].split("/")[0])
    nginx, port = await asyncio.to_thread(start_nginx, tmp_path, shim.config.shim.port, model_port)
    try:
        key = shim.new_key("nginx-edge", "checked")
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20,
            default_headers={"x-quotameter-model": "mock-small"},
        )
        async with client:
            raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            completion = raw.parse()
            event_id = raw.headers["x-quotameter-event-id"]
            assert raw.status_code == 200 and completion.choices[0].message.content
            assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["x-ratelimit-remaining-requests"] == "1"
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            # The third in the minute: the check's 429 reaches the client whole, through nginx.
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            error = refused.value
            assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
            assert "2 requests per minute" in error.message and "Upgrade to Pro." in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
            # A model outside the tier, and an unknown key: 403 and 401 with their bodies.
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, extra_headers={"x-quotameter-model": "gpt-4o"}
                )
            assert denied.value.code == "model_not_allowed"
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError) as unknown:
                await stranger.models.list()
            assert unknown.value.code == "invalid_api_key"

        assert event_id in shim.reserved("nginx-edge")[2]  # reserved until the usage report
        usage = completion.usage
        assert usage is not None
        report = reported(event_id, "nginx-edge", usage.prompt_tokens, usage.completion_tokens)
        assert await post(shim.config, report) == (202, {"accepted": 1})
        settled = shim.reserved("nginx-edge")[2][event_id]
        assert settled.startswith(f"{usage.prompt_tokens + usage.completion_tokens}:")

        # The worker puts the event in the ledger once and releases the settled entry.
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        rows = await asyncio.to_thread(
            wait_for, lambda: event_id in (r := ledger_rows(shim.config, "nginx-edge"))["id_list"] and r, 60.0, "the event"
        )
        assert rows["id_list"].count(event_id) == 1
        await asyncio.to_thread(
            wait_for, lambda: event_id not in shim.reserved("nginx-edge")[2], 30.0, "the entry released"
        )
    finally:
        nginx.stop()


def test_the_readme_snippet_is_the_shipped_file() -> None:
    # The README shows the file abridged: every directive it shows is the file's own.
    readme = (SNIPPET.parents[2] / "README.md").read_text()
    block = next(b for b in readme.split("```") if b.startswith("nginx\nlocation /v1/"))
    shipped = {" ".join(line.split("#")[0].split()) for line in SNIPPET.read_text().splitlines()}
    shown = [" ".join(line.split()) for line in block.splitlines()[1:]]
    missing = [line for line in shown if line and not line.startswith("#") and line not in shipped]
    assert missing == [], missing
