"""OpenAI's Responses API (``POST /v1/responses``).

The prompt is ``instructions`` plus ``input`` (a string, or a list of items
whose content is a string or content parts); the output cap is
``max_output_tokens``. Usage is ``input_tokens`` / ``output_tokens`` with
``input_tokens_details.cached_tokens`` and
``output_tokens_details.reasoning_tokens``: at the top of a JSON answer, and
in a stream inside the ``response`` of its terminal event
(``response.completed``, ``response.incomplete`` or ``response.failed``),
which always carries it: nothing to ask for.

A stream cut at the budget ends with an ``error`` event (the reason: the
official SDK yields it as an event, it does not raise) and a
``response.incomplete`` whose ``incomplete_details.reason`` is
``max_output_tokens``, the terminal event the SDK reads as the normal end of
an answer stopped at its output cap (openai 3.57: ``responses.stream`` and
``create(stream=True)`` both iterate it to the end).
"""

from __future__ import annotations

import time
from typing import Any

from gateway_shim.dialects import CutStream, Dialect, Limits, sse
from gateway_shim.request_checks import check_responses_body
from gateway_shim.usage import Usage, usage_from
from quotameter.tokens import count_response_input

# Stream events whose "delta" is generated text (reasoning, refusals and tool arguments are output too).
_TEXT_DELTAS = frozenset({
    "response.output_text.delta", "response.refusal.delta", "response.reasoning_text.delta",
    "response.reasoning_summary_text.delta", "response.function_call_arguments.delta",
})
_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


class ResponsesDialect(Dialect):
    name = "responses"
    cap_field = "max_output_tokens"

    def check(self, route: str, body: dict[str, Any], limits: Limits) -> None:
        check_responses_body(body, limits)

    def count_prompt(self, body: dict[str, Any], model: str | None) -> int:
        return count_response_input(body, model)

    def usage(self, document: dict[str, Any]) -> Usage | None:
        return usage_from(document)

    def text(self, document: dict[str, Any]) -> str:
        """The generated text of a whole response: messages, refusals, reasoning, tool arguments."""
        output = document.get("output")
        if not isinstance(output, list):
            return ""
        parts: list[str] = []
        for item in output:
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("arguments"), str):
                parts.append(item["arguments"])
            for holder in ("content", "summary"):
                for part in item.get(holder) or ():
                    if isinstance(part, dict):
                        for field in ("text", "refusal"):
                            if isinstance(part.get(field), str):
                                parts.append(part[field])
        return "".join(parts)

    def upstream_error(self, document: dict[str, Any]) -> object | None:
        # A response object that failed is an answer (with its usage), not an error body.
        return document.get("error") if document.get("object") != "response" else None

    def event_model(self, event: dict[str, Any]) -> str | None:
        response = event.get("response")
        return self.served_model(response) if isinstance(response, dict) else None

    def event_id(self, event: dict[str, Any]) -> str | None:
        response = event.get("response")
        value = response.get("id") if isinstance(response, dict) else None
        return value if isinstance(value, str) else None

    def event_text(self, event: dict[str, Any]) -> str:
        delta = event.get("delta")
        return delta if isinstance(delta, str) and event.get("type") in _TEXT_DELTAS else ""

    def event_ends(self, event: dict[str, Any]) -> bool:
        return event.get("type") in _TERMINAL

    def cut_ending(self, cut: CutStream) -> bytes:
        error = {"type": "error", "code": "budget_exceeded", "message": cut.message, "param": None,
                 "sequence_number": cut.sequence_number}
        response = {
            "id": cut.response_id or "resp_quotameter_cut",
            "object": "response",
            "created_at": int(time.time()),
            "status": "incomplete",
            "model": cut.model,
            "output": [{
                "id": "msg_quotameter_cut", "type": "message", "status": "incomplete", "role": "assistant",
                "content": [{"type": "output_text", "text": cut.text, "annotations": []}],
            }],
            "incomplete_details": {"reason": "max_output_tokens"},
            "error": None,
            "usage": {
                "input_tokens": cut.input_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": cut.output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": cut.input_tokens + cut.output_tokens,
            },
        }
        incomplete = {"type": "response.incomplete", "sequence_number": cut.sequence_number + 1, "response": response}
        return sse(error, "error") + sse(incomplete, "response.incomplete")


RESPONSES = ResponsesDialect()
