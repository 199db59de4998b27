"""LiteLLM's real proxy (``litellm --config deploy/litellm/config.yaml``, no
database) with quotameter's custom auth and callback, in front of the
built-in mock model, driven by the official openai client, with the real
Redis, broker and worker: quotameter's keys are LiteLLM's, its refusals reach
the client as LiteLLM's errors with quotameter's message and rate-limit
headers, a stream is cut at the budget inside LiteLLM, and the ledger has each
answer to the token the client was served. One proxy for the whole test:
LiteLLM takes tens of seconds to import and start."""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest

from quotameter.embedded.mock_llm import completion_pieces
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.tokens import count_text
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim
from tests.integration.in_process_helpers import ROOT, check_ledger, leave_mid_stream, new_key
from tests.integration.pipeline_helpers import start_worker

SHIPPED = ROOT / "deploy" / "litellm" / "config.yaml"
START_TIMEOUT_S = 150  # LiteLLM imports a great deal; slower still on a busy machine
TOKEN_DELAY_MS = 20  # the mock's pause before each streamed token
LONG = 60  # tokens of the stream a client leaves
CUT_AT = 5  # output tokens left in the cutting tier's quota after the prompt
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    "app": {"requests_per_minute": 100, "monthly_tokens": 1_000_000, "allowed_models": ["mock-small"]},
    "limited": {"requests_per_minute": 1, "upgrade_hint": "Upgrade to Pro."},
    # Its budget spent, a request is served the cheaper model (the body the app / LiteLLM gets is rewritten).
    "thrifty": {"monthly_budget_usd": "0.001", "fallback": {"model": "mock-small", "extra_budget_usd": "0.01"}},
    "cutting": {"monthly_tokens": PROMPT_TOKENS + CUT_AT, "default_max_tokens": 100, "cut_streams": True,
                "upgrade_hint": "Upgrade to Pro."},
}


def start_litellm(tmp_path: Path, config_path: Path, model_port: int) -> tuple[ManagedProcess, int, float]:
    binary = Path(sys.executable).with_name("litellm")
    assert binary.exists(), "LiteLLM is not installed: make test installs it (the test extra of pyproject.toml)"
    port = free_port()
    site = tmp_path / "litellm.yaml"
    site.write_text(SHIPPED.read_text().replace("__MODEL__", f"127.0.0.1:{model_port}"))
    env = {"QUOTAMETER_CONFIG": str(config_path), "LITELLM_MASTER_KEY": "sk-litellm-admin-for-tests-only-0123",
           "UPSTREAM_API_KEY": "none", "LITELLM_OFFLINE_MODE": "true", "LITELLM_LOCAL_MODEL_COST_MAP": "true"}
    began = time.monotonic()
    process = ManagedProcess("litellm", [str(binary), "--config", str(site), "--host", "127.0.0.1", "--port", str(port)],
                             tmp_path / "litellm.log", env=env, cwd=tmp_path).start()

    def live() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health/liveliness", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        process.wait_until(live, START_TIMEOUT_S, "LiteLLM's /health/liveliness")
    except BaseException:
        process.stop()
        raise
    return process, port, time.monotonic() - began


async def test_litellm_with_quotameter_inside(config_factory, cli_process, tmp_path: Path) -> None:
    config, path = config_factory({"tiers": TIERS, "prices": PRICES})
    model_port = free_port()
    mock = cli_process("mock", "mock-llm", "--port", str(model_port), "--token-delay-ms", str(TOKEN_DELAY_MS))
    await asyncio.to_thread(mock.wait_port, "127.0.0.1", model_port)
    # The worker starts while LiteLLM does (both take long): the events wait for it in the broker.
    (litellm, port, start_s), _ = await asyncio.gather(
        asyncio.to_thread(start_litellm, tmp_path, path, model_port),
        asyncio.to_thread(start_worker, cli_process, config, path, "worker"),
    )
    print(f"LiteLLM ready in {start_s:.1f}s")
    base = f"http://127.0.0.1:{port}/v1"

    def client(key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0, timeout=30)

    try:
        served: dict[str, tuple[int, int, bool]] = {}  # customer -> what the client was told it used
        keys = {c: new_key(config, c, t) for c, t in (("json", "app"), ("stream", "app"), ("quiet", "app"),
                                                      ("limited", "limited"), ("cut", "cutting"),
                                                      ("left", "app"), ("thrifty", "thrifty"),
                                                      ("responses", "app"))}
        # The Responses API: LiteLLM's /v1/responses, admitted and settled by the same hooks.
        async with client(keys["responses"]) as c:
            response = await c.responses.create(model="mock-small", input="Say hello", max_output_tokens=5)
            assert response.output_text and response.usage is not None
            served["responses"] = (response.usage.input_tokens, response.usage.output_tokens, False)
        async with client(keys["json"]) as c:
            raw = await c.chat.completions.with_raw_response.create(
                model="mock-small", messages=MESSAGES, max_tokens=5, user="end-user-7", extra_headers={"x-quotameter-tags": "team=search"})
            completion = raw.parse()
            assert completion.choices[0].message.content == "".join(completion_pieces(5))
            assert raw.headers["x-ratelimit-limit-requests"] == "100", raw.headers
            served["json"] = (completion.usage.prompt_tokens, completion.usage.completion_tokens, False)
            assert served["json"] == (PROMPT_TOKENS, 5, False)
            with pytest.raises(openai.PermissionDeniedError) as denied:
                await c.chat.completions.create(model="mock-large", messages=MESSAGES)
            assert "mock-large" in denied.value.message

        for customer, include in (("stream", True), ("quiet", False)):
            async with client(keys[customer]) as c:
                extra = {"stream_options": {"include_usage": True}} if include else {}
                stream = await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=6,
                                                         stream=True, **extra)
                chunks = [chunk async for chunk in stream]
            text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
            assert text == "".join(completion_pieces(6))
            usages = [ch.usage for ch in chunks if ch.usage]
            assert len(usages) == (1 if include else 0), usages
            if include:
                assert (usages[0].prompt_tokens, usages[0].completion_tokens) == (PROMPT_TOKENS, 6)
            served[customer] = (PROMPT_TOKENS, 6, True)

        async with client(keys["limited"]) as c:
            await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
            served["limited"] = (PROMPT_TOKENS, 2, False)
            with pytest.raises(openai.RateLimitError) as refused:
                await c.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=2)
        error = refused.value
        assert error.status_code == 429 and "1 requests per minute" in error.message, error.message
        assert "Upgrade to Pro." in error.message
        assert 1 <= int(error.response.headers["Retry-After"]) <= 60
        assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert error.response.headers["RateLimit"].startswith('"requests";r=0;')
        async with client("sk-not-a-key") as c:
            with pytest.raises(openai.AuthenticationError):
                await c.chat.completions.create(model="mock-small", messages=MESSAGES)

        # The quota holds the prompt and 5 tokens: the mock streams 16, the client gets 5 and the reason.
        async with client(keys["cut"]) as c:
            stream = await c.chat.completions.create(model="mock-small", messages=MESSAGES, stream=True)
            chunks = []
            with pytest.raises(openai.APIError) as cut:
                async for chunk in stream:
                    chunks.append(chunk)
        assert "Upgrade to Pro." in cut.value.message, cut.value.message
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == "".join(completion_pieces(CUT_AT)), text
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
        served["cut"] = (PROMPT_TOKENS, count_text(text, "mock-small"), True)

        # A client that leaves after 3 tokens: billed for what LiteLLM was handed, not the whole answer.
        async with client(keys["left"]) as c:
            await leave_mid_stream(c, MESSAGES, LONG)

        Shim(config, None, path).set_totals("thrifty", micro_usd=1000)  # its budget is spent
        async with client(keys["thrifty"]) as c:
            raw = await c.chat.completions.with_raw_response.create(model="mock-large", messages=MESSAGES, max_tokens=3)
        # LiteLLM served its mock-small deployment, and names the model asked for in the answer.
        assert raw.headers["x-litellm-model-group"] == "mock-small" and raw.parse().model == "mock-large"
        served["thrifty"] = (PROMPT_TOKENS, 3, False)

        await check_ledger(config, served, PROMPT_TOKENS, LONG)
    finally:
        litellm.stop()
