"""QuotameterMiddleware around a FastAPI app (tests/integration/asgi_app.py) that
serves chat completions itself, run by uvicorn on loopback, driven by the
official openai client, with the real Redis, broker and worker: refusals are
the middleware's (the app never sees them), JSON and SSE answers pass with the
rate-limit headers, a stream the app overruns is cut at the budget and the
app's generator stopped, and the ledger has each answer to the token the
client was served. The README's example runs as written."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import openai
import pytest

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import free_port
from quotameter.tokens import count_prompt, count_text
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim
from tests.integration.in_process_helpers import ROOT, check_ledger, leave_mid_stream, host_process, new_key
from tests.integration.pipeline_helpers import start_worker

PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    "app": {"requests_per_minute": 100, "monthly_tokens": 1_000_000, "allowed_models": ["mock-small"]},
    "limited": {"requests_per_minute": 1, "upgrade_hint": "Upgrade to Pro."},
    # Its budget spent, a request is served the cheaper model (the body the app / LiteLLM gets is rewritten).
    "thrifty": {"monthly_budget_usd": "0.001", "fallback": {"model": "mock-small", "extra_budget_usd": "0.01"}},
    "cutting": {"monthly_tokens": 10**12, "cut_streams": True, "upgrade_hint": "Upgrade to Pro."},
}
CUT_AT = 4  # max_tokens of the stream the app overruns
OVERRUN = 40  # tokens the app would write
LONG = 40  # tokens of the stream a client leaves


async def serve(name: str, target: str, tmp_path: Path, config_path: Path, cwd: Path = ROOT):
    port = free_port()
    process = host_process(name, ["uvicorn", target, "--host", "127.0.0.1", "--port", str(port)],
                           tmp_path / f"{name}.log", config_path, cwd=cwd)
    try:
        await asyncio.to_thread(process.wait_port, "127.0.0.1", port, 30)
    except BaseException:
        process.stop()
        raise
    return process, f"http://127.0.0.1:{port}"


async def generated(base: str) -> int:
    """How many tokens the app's streams have produced (a path outside /v1: passed through)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/generated") as response:
            return (await response.json())["tokens"]


def client(base: str, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=20)


async def test_middleware_admits_refuses_cuts_and_meters_to_the_token(config_factory, cli_process, tmp_path: Path) -> None:
    config, path = config_factory({"tiers": TIERS, "prices": PRICES})
    (app, base), _ = await asyncio.gather(  # the worker starts beside the app: the events wait in the broker
        serve("app", "tests.integration.asgi_app:app", tmp_path, path),
        asyncio.to_thread(start_worker, cli_process, config, path, "worker"),
    )
    try:
        served: dict[str, tuple[int, int, bool]] = {}  # customer -> what the client was told it used
        keys = {c: new_key(config, c, t) for c, t in (("json", "app"), ("stream", "app"), ("quiet", "app"),
                                                      ("limited", "limited"), ("cut", "cutting"),
                                                      ("left", "app"), ("thrifty", "thrifty"))}
        async with client(base, keys["json"]) as c:
            raw = await c.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=5, user="end-user-7", extra_headers={"x-quotameter-tags": "team=search"})
            completion = raw.parse()
            assert completion.choices[0].message.content == "".join(completion_pieces(5))
            assert raw.headers["x-ratelimit-limit-requests"] == "100", raw.headers
            assert completion.usage.prompt_tokens == PROMPT_TOKENS
            served["json"] = (completion.usage.prompt_tokens, completion.usage.completion_tokens, False)
            with pytest.raises(openai.PermissionDeniedError) as denied:  # the middleware's, not the app's
                await c.chat.completions.create(model="gpt-4o", messages=MESSAGES)
            assert denied.value.code == "model_not_allowed"

        # A stream with the usage chunk, and one without: the middleware asked the app for it,
        # and the client that did not ask never sees it.
        for customer, include in (("stream", True), ("quiet", False)):
            async with client(base, keys[customer]) as c:
                extra = {"stream_options": {"include_usage": True}} if include else {}
                raw = await c.chat.completions.with_raw_response.create(
                    model="mock-small", messages=MESSAGES, max_tokens=6, stream=True, **extra)
                assert raw.headers["content-type"].startswith("text/event-stream")
                assert raw.headers["x-ratelimit-remaining-requests"] == "99"
                chunks = [chunk async for chunk in raw.parse()]
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == "".join(completion_pieces(6))
            usages = [ch.usage for ch in chunks if ch.usage]
            assert len(usages) == (1 if include else 0)
            served[customer] = (PROMPT_TOKENS, 6, True)
            if include:
                assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (PROMPT_TOKENS, 6)

        async with client(base, keys["limited"]) as c:
            await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
            served["limited"] = (PROMPT_TOKENS, 2, False)
            with pytest.raises(openai.RateLimitError) as refused:
                await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
        error = refused.value
        assert error.code == "rate_limit_exceeded" and "Upgrade to Pro." in error.message
        assert 1 <= int(error.response.headers["Retry-After"]) <= 60
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        async with client(base, "sk-not-a-key") as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="mock-small", messages=MESSAGES)

        # The app writes 40 tokens where 4 were admitted: the client gets 4, an end, and the reason;
        # the app's generator is stopped (it does not run on to 40).
        async with client(base, keys["cut"]) as c:
            stream = await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=CUT_AT,
                                                     stream=True, extra_headers={"x-app-tokens": str(OVERRUN)})
            chunks = []
            with pytest.raises(openai.APIError) as cut:
                async for chunk in stream:
                    chunks.append(chunk)
        assert cut.value.body["code"] == "budget_exceeded"
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "".join(completion_pieces(CUT_AT)) and chunks[-1].choices[0].finish_reason == "length"
        served["cut"] = (count_prompt({"messages": MESSAGES}, "mock-small"), count_text(text, "mock-small"), True)
        await asyncio.sleep(0.5)  # time for a generator that was not stopped to write on
        assert await generated(base) <= 6 + 6 + CUT_AT + 1  # the two streams, then the cut one stopped

        # A client that leaves after 3 of 40 tokens: the app is stopped, what was passed on is billed.
        async with client(base, keys["left"]) as c:
            await leave_mid_stream(c, MESSAGES, LONG)
        before = await generated(base)
        await asyncio.sleep(0.5)
        assert await generated(base) == before < 6 + 6 + CUT_AT + 1 + LONG // 2  # stopped, long before its end

        Shim(config, None, path).set_totals("thrifty", micro_usd=1000)  # its budget is spent
        async with client(base, keys["thrifty"]) as c:
            completion = await c.chat.completions.create(model="mock-large", messages=MESSAGES, max_tokens=3)
        assert completion.model == "mock-small"
        served["thrifty"] = (PROMPT_TOKENS, 3, False)

        await check_ledger(config, served, PROMPT_TOKENS, LONG)
    finally:
        app.stop()


async def test_the_readme_example_runs_as_written(config_factory, tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In your Python app", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) <= 14, "the example should stay short"
    (tmp_path / "example").mkdir()
    (tmp_path / "example" / "app.py").write_text(code)
    config, path = config_factory({"tiers": {"limited": TIERS["limited"]}})
    key = new_key(config, "readme", "limited")
    process, base = await serve("readme", "app:app", tmp_path, path, cwd=tmp_path / "example")
    try:
        async with client(base, key) as c:
            completion = await c.chat.completions.create(model="mock-small", messages=MESSAGES)
            assert completion.choices[0].message.content and completion.usage.total_tokens
            with pytest.raises(openai.RateLimitError) as refused:
                await c.chat.completions.create(model="mock-small", messages=MESSAGES)
        assert "Upgrade to Pro." in refused.value.message
    finally:
        process.stop()
