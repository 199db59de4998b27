"""Token usage as the upstream reports it, or as the shim counts it.

Reads OpenAI's shapes: chat / completions / embeddings (``prompt_tokens``,
``completion_tokens``, ``*_tokens_details``) and the Responses API
(``input_tokens``, ``output_tokens``), which vLLM and most gateways follow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quotameter.events import UsageSource
from quotameter.tokens import count_prompt, count_text


@dataclass(frozen=True, slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    source: UsageSource = UsageSource.NONE
    cache_write_tokens: int = 0  # part of input_tokens, as cached_tokens is (Anthropic reports cache writes)


NO_USAGE = Usage()


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def usage_from(document: Any) -> Usage | None:
    """The ``usage`` a response body or SSE chunk reports, or None."""
    if not isinstance(document, dict):
        return None
    usage = document.get("usage")
    if not isinstance(usage, dict):
        response = document.get("response")  # Responses API stream events nest it
        usage = response.get("usage") if isinstance(response, dict) else None
        if not isinstance(usage, dict):
            return None
    input_details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details") or {}
    output_details = usage.get("completion_tokens_details") or usage.get("output_tokens_details") or {}
    return Usage(
        input_tokens=_int(usage.get("prompt_tokens", usage.get("input_tokens"))),
        output_tokens=_int(usage.get("completion_tokens", usage.get("output_tokens"))),
        cached_tokens=_int(input_details.get("cached_tokens")) if isinstance(input_details, dict) else 0,
        reasoning_tokens=_int(output_details.get("reasoning_tokens")) if isinstance(output_details, dict) else 0,
        source=UsageSource.UPSTREAM,
    )


def model_from(document: Any) -> str | None:
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) and model else None


def completion_text(document: Any) -> str:
    """The generated text of a response body or of one SSE chunk."""
    if not isinstance(document, dict) or not isinstance(document.get("choices"), list):
        return ""
    parts: list[str] = []
    for choice in document["choices"]:
        if not isinstance(choice, dict):
            continue
        for holder in (choice.get("delta"), choice.get("message")):
            if isinstance(holder, dict):
                for field in ("content", "reasoning_content", "refusal"):
                    if isinstance(holder.get(field), str):
                        parts.append(holder[field])
        if isinstance(choice.get("text"), str):  # legacy completions
            parts.append(choice["text"])
    return "".join(parts)


def counted_usage(request_body: dict[str, Any] | None, model: str | None, output_text: str) -> Usage:
    """The shim's own count, for when the upstream reported nothing usable."""
    return Usage(
        input_tokens=count_prompt(request_body, model) if request_body else 0,
        output_tokens=count_text(output_text, model),
        source=UsageSource.COUNTED,
    )
