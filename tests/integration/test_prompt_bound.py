"""A large prompt is admitted on its size in bytes, and counted only when that
bound does not fit (gateway_shim/estimates.py): what is reserved, released
and refused, through the real shim, Redis and the mock."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from gateway_shim.estimates import PROMPT_BOUND_BYTES
from quotameter.tokens import count_prompt
from tests.integration.enforcement_helpers import Shim, ShimFactory, shim_factory  # noqa: F401

_WORDS = "the quota of each customer holds while the gateway meters every token it serves".split()
TEXT = " ".join(_WORDS[i % len(_WORDS)] + ("." if i % 11 == 10 else "") for i in range(4000))  # ~20 KB


def _body(**fields: Any) -> bytes:
    return json.dumps({"model": "mock-small", "messages": [{"role": "user", "content": TEXT}], **fields}).encode()


BODY = _body(max_tokens=16)
COUNT = count_prompt(json.loads(BODY), "mock-small")  # what the mock reports, and the shim's own count


async def _post(shim: Shim, key: str, body: bytes) -> tuple[int, Any, dict[str, Any]]:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(shim.base_url + "/chat/completions", data=body, headers=headers) as response:
            return response.status, response.headers, await response.json()


async def test_the_bound_is_reserved_the_count_only_where_it_does_not_fit(shim_factory: ShimFactory) -> None:
    assert len(BODY) >= PROMPT_BOUND_BYTES and COUNT < len(BODY) // 3, (len(BODY), COUNT)
    shim = await shim_factory({
        "roomy": {"tokens_per_minute": 10_000_000},
        "rate": {"tokens_per_minute": COUNT + 16 + 5},
        "quota": {"monthly_tokens": COUNT + 16 + 5},
        "short": {"monthly_tokens": COUNT + 16 - 1},
        "cut": {"monthly_tokens": len(BODY) + 50, "cut_streams": True, "default_max_tokens": 1000},
    })

    # Room for the bound: admitted on the body's size, the prompt never counted before the answer.
    status, headers, answer = await _post(shim, shim.new_key("roomy-co", "roomy"), BODY)
    assert status == 200 and answer["usage"]["prompt_tokens"] == COUNT
    charged = 10_000_000 - int(headers["x-ratelimit-remaining-tokens"])  # GCRA's clock: a token either way
    assert abs(charged - (len(BODY) + 16)) <= 1, (charged, len(BODY), COUNT)

    # The bound is refused where the count fits: counted, asked again, admitted on the count.
    status, headers, _ = await _post(shim, shim.new_key("rate-co", "rate"), BODY)
    assert status == 200 and headers["x-ratelimit-remaining-tokens"] in ("4", "5")
    status, _, answer = await _post(shim, shim.new_key("quota-co", "quota"), BODY)
    assert status == 200, answer
    tokens, _, pending = shim.reserved("quota-co")
    assert tokens == COUNT + 16 and len(pending) == 1  # the settled usage, nothing more held

    # Refused on the count, and the refusal names it.
    status, _, answer = await _post(shim, shim.new_key("short-co", "short"), BODY)
    assert status == 429, answer
    assert f"{COUNT + 15} tokens per billing period (used 0, this request needs up to {COUNT + 16})" in \
        answer["error"]["message"]
    assert shim.reserved("short-co")[0] == 0

    # Admitted on the bound with its output cut to fit: released, counted, admitted in full.
    status, _, answer = await _post(shim, shim.new_key("cut-co", "cut"), _body())
    assert status == 200, answer
    output = answer["usage"]["completion_tokens"]
    tokens, _, pending = shim.reserved("cut-co")
    assert tokens == COUNT + output and len(pending) == 1, (tokens, COUNT, output, pending)
