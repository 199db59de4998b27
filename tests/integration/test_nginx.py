"""nginx (Debian's, auth_request and njs) in front of the mock model, with
deploy/nginx/quotameter.conf and quotameter.js as shipped. The official openai
client sees the admission and the refusals; the check sees the body (prompt,
max_tokens, model); JSON and streamed answers pass (streams event by event,
the usage chunk nginx asked for hidden from a client that did not); a
fallback the check degrades to is served. nginx itself reports each answer's
usage under the check's event id, which settles the reservation, and the
real worker puts it in the ledger, to the token what the client was served:
the test reports nothing, except one report nginx kept because the shim
refused it, sent again from nginx's file as an operator would. An answer
without usage (a stream the client cut, a model that reports none) is billed
as the shim counts it: the prompt, and the tokens of the text the client was
passed. nginx's worker parses a long stream in bounded memory."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from gateway_shim.keystore import list_keys
from quotameter.embedded.mock_llm import FAULT_HEADER, SEEN_KEY_HEADER, completion_pieces
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.tokens import count_prompt, count_text
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for
from tests.integration.test_check import TIERS, TOKEN
from tests.integration.test_ingest import post

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
SNIPPET = DEPLOY / "quotameter.conf"
NJS_MODULE = "/usr/lib/nginx/modules/ngx_http_js_module.so"
TOKEN_DELAY_MS = 40  # the mock's pause before each streamed token
STREAMED_TOKENS = 12
METERED = {  # many requests a minute: the streams are not refused
    **TIERS["checked"], "requests_per_minute": 100, "tokens_per_minute": 1_000_000, "default_max_tokens": 500,
}
# A tier that would admit a request shrunk to its quota's rest and cut the stream there:
# nginx cuts nothing, so the check must not admit on that promise.
CUTTING = {**METERED, "monthly_tokens": 100, "cut_streams": True}
# Limits no tokens and holds nothing to settle: its reports are still counted.
PLAIN = {"requests_per_minute": 100}
# Its budget spent, a request is served the cheaper model instead (nginx rewrites the body).
THRIFTY = {"monthly_budget_usd": "0.001", "fallback": {"model": "mock-small", "extra_budget_usd": "0.01"}}
# Not ASCII: the bodies nginx copies and rewrites keep their UTF-8 (the prompt counts the same).
SPOKEN = [{"role": "user", "content": "Dites « bonjour » en 日本語, s’il vous plaît ✓"}]
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
CUT_AFTER = 5  # content chunks the client reads of a stream before it leaves
# quotameter.js keeps this much of the delivered text (as JSON), in slices of 4096 characters;
# past it the shim scales the start's tokens to all the bytes delivered.
TEXT_LIMIT = 256 * 1024
LONG_TOKENS = 70_000  # the mock's one-token words: about 330 KB of text, past the limit
LONG_STREAM = 2000  # events of a stream that nginx parses one by one


def start_nginx(root: Path, shim_port: int, model_port: int, token: str = TOKEN) -> tuple[ManagedProcess, int]:
    """nginx with the shipped files, its reports sent with ``token``; what the shim did not
    take is kept in ``root``/unreported.log."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    assert binary, "nginx is not installed: make test installs it (Debian package nginx-light)"
    assert os.path.exists(NJS_MODULE), "njs is not installed: make test installs it (Debian package libnginx-mod-http-js)"
    port = free_port()
    root.mkdir()
    site = SNIPPET.read_text()
    for placeholder, address in (("__LISTEN__", port), ("__QUOTAMETER__", shim_port), ("__MODEL__", model_port)):
        site = site.replace(placeholder, f"127.0.0.1:{address}")
    site = site.replace("__SCRIPT__", str(DEPLOY / "quotameter.js")).replace("__INGEST_TOKEN__", token)
    site = site.replace("__UNREPORTED_LOG__", str(root / "unreported.log"))
    (root / "quotameter.conf").write_text(site)
    temp = "\n".join(f"    {kind}_temp_path {root}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (root / "nginx.conf").write_text(
        f"load_module {NJS_MODULE};\n"
        + ("user root;\n" if os.geteuid() == 0 else "")
        + f"daemon off;\nworker_processes 1;\npid {root}/nginx.pid;\nerror_log {root}/error.log info;\n"
        + "events { worker_connections 256; }\n"
        + f"http {{\n    access_log off;\n{temp}\n    include {root}/quotameter.conf;\n}}\n"
    )
    process = ManagedProcess("nginx", [binary, "-p", str(root), "-c", str(root / "nginx.conf")], root / "nginx.log").start()
    process.wait_port("127.0.0.1", port)
    return process, port


def ledger(shim: Shim, customer: str) -> dict[str, dict[str, Any]]:
    """The ledger's rows of a customer by event id (duplicates would show as a count)."""
    status, body = http_json(
        f"{shim.config.services.worker_url}/query",
        f"""SELECT id, count() AS copies, any(input_tokens) AS input_tokens, any(output_tokens) AS output_tokens,
                   any(api_key_id) AS api_key_id, any(decision) AS decision, any(usage_source) AS usage_source,
                   any(streamed) AS streamed, any(model_served) AS model_served, any(status) AS status,
                   any(model_requested) AS model_requested, any(reason) AS reason,
                   any(end_user) AS end_user, any(tags) AS tags,
                   any(cached_tokens) AS cached_tokens, any(cache_write_tokens) AS cache_write_tokens
            FROM quotameter.events WHERE customer = '{customer}' GROUP BY id""",
    )
    assert status == 200, body
    return {row["id"]: row for row in body["rows"]}


def settled(shim: Shim, customer: str, event_id: str, tokens: int) -> bool:
    # The settle turns the reservation's pending entry into the reported tokens.
    entry = shim.reserved(customer)[2].get(event_id)
    return entry is not None and entry.startswith(f"{tokens}:")


def unsettled(shim: Shim, customer: str, event_id: str) -> bool:
    """The check's admission still waits for its report (a report takes it)."""
    client = shim.redis()
    try:
        return bool(client.exists(shim.names.check_ticket(customer, event_id)))
    finally:
        client.close()


def key_id(shim: Shim, customer: str) -> str:
    client = shim.redis()
    try:
        return next(record.key_id for record in list_keys(client, shim.names) if record.customer == customer)
    finally:
        client.close()


async def test_nginx_admits_refuses_and_reports_the_usage_itself(
    shim_factory: ShimFactory, cli_process, tmp_path: Path
) -> None:
    tiers = {**TIERS, "metered": METERED, "cutting": CUTTING, "thrifty": THRIFTY, "plain": PLAIN}
    shim = await shim_factory(tiers, token_delay_ms=TOKEN_DELAY_MS, shim={"ingest_token": TOKEN}, prices=PRICES)
    model_port = int(shim.config.upstream.url.split(":")[-1].split("/")[0])
    nginx, port = await asyncio.to_thread(start_nginx, tmp_path / "nginx", shim.config.shim.port, model_port)
    try:
        key = shim.new_key("nginx-edge", "checked")
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20,
        )
        served: dict[str, openai.types.CompletionUsage] = {}  # event id -> the usage the client was given
        async with client:
            for _ in range(2):
                raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                completion = raw.parse()
                assert raw.status_code == 200 and completion.choices[0].message.content and completion.usage
                assert raw.headers[SEEN_KEY_HEADER] == "none"  # the client's key stopped at nginx
                served[raw.headers["x-quotameter-event-id"]] = completion.usage
            assert raw.headers["x-ratelimit-limit-requests"] == "2" and raw.headers["x-ratelimit-remaining-requests"] == "0"
            # The third in the minute: the check's 429 reaches the client whole, through nginx.
            with pytest.raises(openai.RateLimitError) as refused:
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            error = refused.value
            assert error.status_code == 429 and error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
            assert "2 requests per minute" in error.message and "Upgrade to Pro." in error.message
            assert 1 <= int(error.response.headers["Retry-After"]) <= 60
            assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
            assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
            # A model outside the tier, read from the body (a client's header naming another
            # is not believed), and an unknown key: 403 and 401 with their bodies.
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await client.chat.completions.create(
                    model="gpt-4o", messages=MESSAGES, extra_headers={"x-quotameter-model": "mock-small"}
                )
            assert denied.value.code == "model_not_allowed"
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="sk-wrong", max_retries=0) as stranger:
            with pytest.raises(openai.AuthenticationError) as unknown:
                await stranger.models.list()
            assert unknown.value.code == "invalid_api_key"

        streamed = await stream_through(shim, port)
        await refused_past_quota(shim, port)
        counted = {
            "nginx-cut": await cut_mid_stream(shim, port, "nginx-cut", "metered"),
            "nginx-plain": await cut_mid_stream(shim, port, "nginx-plain", "plain"),
            "nginx-silent": await without_usage(shim, port),
        }
        fell_back = await fallen_back(shim, port)
        other_apis = await responses_and_messages(shim, port)
        answered = (("nginx-edge", served), ("nginx-stream", streamed), ("nginx-thrifty", fell_back))
        late, counted["nginx-late"] = await kept_and_sent_again(shim, tmp_path / "mistaken", model_port)
        counted["nginx-long"] = await long_stream_in_bounded_memory(shim, cli_process, tmp_path / "unpaused")
        answered += (("nginx-late", late),)
        # nginx reported every answer: each reservation is settled with what the client was served.
        for customer, answers in answered:
            for event_id, usage in answers.items():
                await asyncio.to_thread(
                    wait_for, lambda: settled(shim, customer, event_id, usage.total_tokens), 10.0, f"{event_id} settled"
                )
        # The answers without usage: settled with the shim's count (the plain tier reserved nothing).
        for customer, tallies in counted.items():
            for event_id, (input_tokens, output_tokens, _) in tallies.items() if customer != "nginx-plain" else ():
                await asyncio.to_thread(
                    wait_for, lambda: settled(shim, customer, event_id, input_tokens + output_tokens), 10.0,
                    f"{event_id} settled as counted",
                )

        # The worker puts each report in the ledger once, to the token.
        await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
        for customer, answers in answered:
            rows = await asyncio.to_thread(
                wait_for, lambda: set(answers) <= set(r := ledger(shim, customer)) and r, 60.0, f"{customer}'s events"
            )
            for event_id, usage in answers.items():
                row = rows[event_id]
                assert row["copies"] == 1 and row["decision"] == "admitted" and row["status"] == 200, row
                assert (row["input_tokens"], row["output_tokens"]) == (usage.prompt_tokens, usage.completion_tokens), row
                assert row["usage_source"] == "upstream" and row["model_served"] == "mock-small"
                assert (row["model_requested"], row["reason"]) == (
                    ("mock-large", "fallback") if customer == "nginx-thrifty" else ("mock-small", None)
                ), row
                assert row["api_key_id"] == key_id(shim, customer)
                assert bool(row["streamed"]) == (customer == "nginx-stream")
                assert (row["end_user"], row["tags"]) == (
                    ("josé-7", {"team": "search"}) if customer == "nginx-thrifty" else ("", {})
                ), row
        # No usage came (a stream the client left, a model that reports none): nginx reported
        # the text it passed, and the ledger has the prompt and that text's tokens, counted.
        for customer, tallies in counted.items():
            rows = await asyncio.to_thread(
                wait_for, lambda: set(tallies) <= set(r := ledger(shim, customer)) and r, 30.0, f"{customer}'s events"
            )
            for event_id, (input_tokens, output_tokens, streamed) in tallies.items():
                row = rows[event_id]
                assert (row["input_tokens"], row["output_tokens"], row["usage_source"]) == (
                    input_tokens, output_tokens, "counted"
                ), row
                assert row["copies"] == 1 and row["status"] == 200 and bool(row["streamed"]) == streamed, row
        # The Responses API and Anthropic's Messages API: nginx read each one's usage from its
        # own shape (Anthropic's cache reads and writes inside the input), to the token.
        rows = await asyncio.to_thread(
            wait_for, lambda: set(other_apis) <= set(r := ledger(shim, "nginx-apis")) and r, 30.0, "nginx-apis' events"
        )
        for event_id, (input_tokens, output_tokens, cached, written, streamed) in other_apis.items():
            row = rows[event_id]
            assert (row["input_tokens"], row["output_tokens"], row["cached_tokens"], row["cache_write_tokens"]) == (
                input_tokens, output_tokens, cached, written
            ), row
            assert row["usage_source"] == "upstream" and row["copies"] == 1 and bool(row["streamed"]) == streamed, row
        # Every report of the first nginx was taken: it kept none to send again.
        assert not (tmp_path / "nginx" / "unreported.log").exists() or (tmp_path / "nginx" / "unreported.log").read_text() == ""
        # The refusals are the check's own events, with nothing used.
        refusals = [r for r in ledger(shim, "nginx-edge").values() if r["decision"] == "refused"]
        assert sorted(r["status"] for r in refusals) == [403, 429] and not any(r["input_tokens"] for r in refusals)
    finally:
        nginx.stop()


async def stream_through(shim: Shim, port: int) -> dict[str, openai.types.CompletionUsage]:
    """Two streams through nginx, one asking for the usage chunk and one not; the usage
    each was served by id (the one that did not ask: what the same request costs)."""
    key = shim.new_key("nginx-stream", "metered")
    served: dict[str, openai.types.CompletionUsage] = {}
    async with openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20
    ) as client:
        for include_usage in (True, False):
            extra = {"stream_options": {"include_usage": True}} if include_usage else {}
            began = time.monotonic()
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-small", messages=SPOKEN, max_tokens=STREAMED_TOKENS, stream=True, **extra
            )
            event_id = raw.headers["x-quotameter-event-id"]
            arrivals: list[float] = []
            chunks = []
            held = None  # in flight: what the check reserved (read beside the stream, not to delay it)
            async for chunk in raw.parse():
                arrivals.append(time.monotonic() - began)
                chunks.append(chunk)
                if held is None:
                    held = asyncio.create_task(asyncio.to_thread(shim.reserved, "nginx-stream"))
            assert held is not None
            held = (await held)[2][event_id]
            pieces = [c for c in chunks if c.choices and c.choices[0].delta.content]
            assert len(pieces) == STREAMED_TOKENS
            # Event by event: the mock pauses before each token, and so does the client's stream
            # (a third of them at least: a busy client may read the first few at once).
            times = [arrivals[chunks.index(piece)] for piece in pieces]
            paused = sum(b - a >= TOKEN_DELAY_MS / 2000 for a, b in zip(times, times[1:], strict=False))
            assert paused >= STREAMED_TOKENS // 3, times
            usages = [c.usage for c in chunks if c.usage is not None]
            if include_usage:
                assert len(usages) == 1 and chunks[-1].choices == [] and chunks[-1].usage is not None
                assert chunks[-1].usage.completion_tokens == STREAMED_TOKENS
                assert chunks[-1].usage.prompt_tokens == count_prompt({"messages": SPOKEN}, "mock-small")
                served[event_id] = asked = chunks[-1].usage
            else:
                # nginx asked the model for the usage chunk; the client, who did not, never sees it.
                assert usages == [] and all(c.choices for c in chunks)
                served[event_id] = asked  # same request, same usage
            # The check saw the body: the prompt counted and max_tokens reserved, not the tier's default.
            assert held.startswith(f"{asked.prompt_tokens + STREAMED_TOKENS}:"), held
    return served


# A system prompt marked for caching: the mock writes it to its cache once, then reads it.
CACHED_SYSTEM = [{"type": "text", "text": "You answer in one short line. " * 8, "cache_control": {"type": "ephemeral"}}]


async def responses_and_messages(shim: Shim, port: int) -> dict[str, tuple[int, int, int, int, bool]]:
    """The Responses API and Anthropic's Messages API through nginx, JSON and streamed.
    Neither is asked for usage (both always report it): nginx reads it from each one's
    events. What each client was told it used (input, output, cached, cache-written,
    streamed), by event id; Anthropic's input counts its cache reads and writes."""
    key = shim.new_key("nginx-apis", "metered")
    served: dict[str, tuple[int, int, int, int, bool]] = {}
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20) as client:
        raw = await client.responses.with_raw_response.create(model="mock-small", input="Say hello", max_output_tokens=5)
        response = raw.parse()
        assert response.output_text and response.usage is not None
        served[raw.headers["x-quotameter-event-id"]] = (
            response.usage.input_tokens, response.usage.output_tokens, 0, 0, False)
        raw = await client.responses.with_raw_response.create(
            model="mock-small", input="Say hello", max_output_tokens=STREAMED_TOKENS, stream=True)
        events = [event async for event in raw.parse()]
        completed = [e.response for e in events if e.type == "response.completed"]
        assert len(completed) == 1 and completed[0].usage is not None, [e.type for e in events]
        usage = completed[0].usage
        assert usage.output_tokens == STREAMED_TOKENS
        served[raw.headers["x-quotameter-event-id"]] = (usage.input_tokens, usage.output_tokens, 0, 0, True)
    async with anthropic.AsyncAnthropic(base_url=f"http://127.0.0.1:{port}", api_key=key, max_retries=0,
                                        timeout=20) as claude:
        raw = await claude.messages.with_raw_response.create(
            model="mock-small", max_tokens=5, system=CACHED_SYSTEM, messages=[{"role": "user", "content": "Hi"}])
        message = await raw.parse()
        written = message.usage.cache_creation_input_tokens or 0
        assert written > 0 and not message.usage.cache_read_input_tokens, message.usage
        served[raw.headers["x-quotameter-event-id"]] = (
            message.usage.input_tokens + written, message.usage.output_tokens, 0, written, False)
        raw = await claude.messages.with_raw_response.create(
            model="mock-small", max_tokens=STREAMED_TOKENS, system=CACHED_SYSTEM, stream=True,
            messages=[{"role": "user", "content": "Hi"}])
        events = [event async for event in await raw.parse()]
        start = next(e.message.usage for e in events if e.type == "message_start")
        output = [e.usage.output_tokens for e in events if e.type == "message_delta"][-1]
        read = start.cache_read_input_tokens or 0
        assert read == written and output == STREAMED_TOKENS, start
        served[raw.headers["x-quotameter-event-id"]] = (start.input_tokens + read, output, read, 0, True)
    return served


async def refused_past_quota(shim: Shim, port: int) -> None:
    """A stream whose worst case (prompt + 500 tokens) is past its quota of 100, and no
    max_tokens to shrink: refused, as nginx cannot cut it where the quota ends."""
    key = shim.new_key("nginx-cutting", "cutting")
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as client:
        with pytest.raises(openai.RateLimitError) as over:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)
    assert over.value.code == "insufficient_quota", over.value.body


async def fallen_back(shim: Shim, port: int) -> dict[str, openai.types.CompletionUsage]:
    """The budget spent: the check degrades the request to the tier's fallback, which nginx serves."""
    shim.set_totals("nginx-thrifty", micro_usd=1000)
    key = shim.new_key("nginx-thrifty", "thrifty")
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as client:
        # Attributed: the check reads it, nginx's report carries it.
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-large", messages=MESSAGES, max_tokens=3, user="josé-7",
            extra_headers={"x-quotameter-tags": "team=search"})
    degraded = raw.parse()
    assert degraded.model == "mock-small" and degraded.usage
    return {raw.headers["x-quotameter-event-id"]: degraded.usage}


async def kept_and_sent_again(shim: Shim, root: Path, model_port: int) -> tuple[dict[str, openai.types.CompletionUsage], Tally]:
    """Reports the shim refuses (an nginx with a wrong ingest token) are kept in nginx's file
    of unreported events; sent again from there, as an operator would, they settle. One of
    them a stream the client left: the text its report carries is exactly what the client got."""
    nginx, port = await asyncio.to_thread(start_nginx, root, shim.config.shim.port, model_port, "not-the-token")
    try:
        key = shim.new_key("nginx-late", "metered")
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0) as client:
            raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=4)
            event_id, usage = raw.headers["x-quotameter-event-id"], raw.parse().usage
            cut_id, received = await read_then_leave(client)
        kept = root / "unreported.log"
        lines = await asyncio.to_thread(
            wait_for, lambda: kept.exists() and len(r := kept.read_text().splitlines()) == 2 and r, 5.0,
            "the unreported events",
        )
    finally:
        nginx.stop()
    reports = {report["id"]: report for report in map(json.loads, lines)}
    cut = reports[cut_id]
    assert (cut["deliveredtext"], cut["deliveredbytes"]) == (received, str(len(received.encode()))), cut
    assert cut["data"]["usage_source"] == "none" and "deliveredtext" not in reports[event_id]
    assert usage is not None and unsettled(shim, "nginx-late", event_id) and unsettled(shim, "nginx-late", cut_id)
    for report in reports.values():
        assert await post(shim.config, report) == (202, {"accepted": 1})
    assert not unsettled(shim, "nginx-late", event_id) and not unsettled(shim, "nginx-late", cut_id)
    return {event_id: usage}, {cut_id: (PROMPT_TOKENS, count_text(received, "mock-small"), True)}


async def long_stream_in_bounded_memory(shim: Shim, cli_process, root: Path) -> Tally:
    """A stream of LONG_STREAM events without usage from a mock that does not pause, through
    an nginx of its own: its worker's memory stays within bounds (njs frees nothing until
    the request ends), and the whole text is counted."""
    mock_port = free_port()
    mock = cli_process("mock-unpaused", "mock-llm", "--port", str(mock_port), "--token-delay-ms", "0")
    await asyncio.to_thread(mock.wait_port, "127.0.0.1", mock_port)
    nginx, port = await asyncio.to_thread(start_nginx, root, shim.config.shim.port, mock_port)
    try:
        await asyncio.to_thread(wait_for, lambda: worker_of(nginx.pid), 5.0, "nginx's worker")
        worker = worker_of(nginx.pid)
        key = shim.new_key("nginx-long", "metered")
        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20) as client:
            before = peak_memory_kib(worker)
            raw = await client.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=LONG_STREAM, stream=True,
                extra_headers={FAULT_HEADER: "no-usage"},
            )
            received = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        grown = peak_memory_kib(worker) - before
    finally:
        nginx.stop()
    assert received == "".join(completion_pieces(LONG_STREAM))
    # Measured: about 31 MiB for 2000 events; a regex split per event once took 2.4 GiB.
    assert grown < 128 * 1024, f"nginx's worker grew by {grown} KiB for one stream of {LONG_STREAM} events"
    return {raw.headers["x-quotameter-event-id"]: (PROMPT_TOKENS, count_text(received, "mock-small"), True)}


def worker_of(master: int | None) -> int | None:
    """The pid of nginx's one worker (a child of its master)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == master:
                return int(entry.name)
        except (OSError, IndexError, ValueError):
            continue
    return None


def peak_memory_kib(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


async def read_then_leave(client: openai.AsyncOpenAI) -> tuple[str, str]:
    """A stream that asked for its usage, closed after CUT_AFTER tokens: its event id, and
    the text the client got, which is what nginx passed: the mock pauses 40 ms before each
    token, and nginx sees the client gone well before the next one."""
    raw = await client.chat.completions.with_raw_response.create(
        model="mock-small", messages=MESSAGES, max_tokens=STREAMED_TOKENS, stream=True,
        stream_options={"include_usage": True},
    )
    stream = raw.parse()
    received, pieces = "", 0
    async for chunk in stream:
        assert chunk.usage is None
        if chunk.choices and chunk.choices[0].delta.content:
            received += chunk.choices[0].delta.content
            pieces += 1
            if pieces == CUT_AFTER:
                break
    await stream.close()
    assert received == "".join(completion_pieces(STREAMED_TOKENS)[:CUT_AFTER])
    return raw.headers["x-quotameter-event-id"], received


Tally = dict[str, tuple[int, int, bool]]  # event id -> the input and output tokens billable, streamed


async def cut_mid_stream(shim: Shim, port: int, customer: str, tier: str) -> Tally:
    """A stream the client closes after a few tokens, before its usage chunk: what it is billed."""
    key = shim.new_key(customer, tier)
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20) as client:
        event_id, received = await read_then_leave(client)
    return {event_id: (PROMPT_TOKENS, count_text(received, "mock-small"), True)}


async def without_usage(shim: Shim, port: int) -> Tally:
    """A model that reports no usage: a JSON answer, a stream read to its end, and a JSON
    answer longer than what nginx keeps of it (the shim scales the start it gets)."""
    key = shim.new_key("nginx-silent", "metered")
    silent = {FAULT_HEADER: "no-usage"}  # nginx passes the client's headers on to the mock
    tally: Tally = {}
    async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=SPOKEN, max_tokens=7, extra_headers=silent,
        )
        answer = raw.parse()
        assert answer.usage is None and answer.choices[0].message.content == "".join(completion_pieces(7))
        prompt = count_prompt({"messages": SPOKEN}, "mock-small")
        tally[raw.headers["x-quotameter-event-id"]] = (prompt, count_text(answer.choices[0].message.content, "mock-small"), False)

        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=STREAMED_TOKENS, stream=True, extra_headers=silent,
        )
        received = "".join([c.choices[0].delta.content or "" async for c in raw.parse() if c.choices])
        assert received == "".join(completion_pieces(STREAMED_TOKENS))
        tally[raw.headers["x-quotameter-event-id"]] = (PROMPT_TOKENS, count_text(received, "mock-small"), True)

        raw = await client.chat.completions.with_raw_response.create(
            model="mock-small", messages=MESSAGES, max_tokens=LONG_TOKENS, extra_headers=silent,
        )
        text = raw.parse().choices[0].message.content
        assert text is not None and text.isascii() and len(text) > TEXT_LIMIT
        # ASCII words: the first TEXT_LIMIT characters fit whole slices; their tokens are
        # scaled to the whole text's bytes, rounded up (nginx keeps no more, the shim sees no more).
        start = count_text(text[:TEXT_LIMIT], "mock-small")
        scaled = -(-start * len(text) // TEXT_LIMIT)
        assert start < scaled and abs(scaled - LONG_TOKENS) <= LONG_TOKENS // 100
        tally[raw.headers["x-quotameter-event-id"]] = (PROMPT_TOKENS, scaled, False)
    return tally


def test_the_text_limit_is_the_scripts() -> None:
    script = (DEPLOY / "quotameter.js").read_text()
    assert f"var TEXT_LIMIT = {TEXT_LIMIT // 1024} * 1024;" in script and "var TEXT_SLICE = 4096;" in script
    slots = {int(n) for n in re.findall(r"js_var \$qm_text_(\d+);", SNIPPET.read_text())}
    assert slots == set(range(int(re.search(r"var TEXT_SLOTS = (\d+);", script)[1])))


def test_the_readme_snippet_is_the_shipped_file() -> None:
    # The README shows the file abridged: every directive it shows is the file's own.
    readme = (SNIPPET.parents[2] / "README.md").read_text()
    block = next(b for b in readme.split("```") if b.startswith("nginx\nlocation /v1/"))
    shipped = {" ".join(line.split("#")[0].split()) for line in SNIPPET.read_text().splitlines()}
    shown = [" ".join(line.split()) for line in block.splitlines()[1:]]
    missing = [line for line in shown if line and not line.startswith("#") and line not in shipped]
    assert missing == [], missing
