"""Anthropic's Messages API (``POST /v1/messages``) as a dialect of the
request lifecycle. What it reads and writes is in anthropic_messages.py
(request, usage, stream events, the cut's ending) and anthropic_answers.py
(error bodies, rate-limit headers); this class is the lifecycle's view of them.

Differences from OpenAI's that the lifecycle sees:
- ``max_tokens`` is required, so it is a ceiling rather than a demand: a
  tier that cuts streams may lower it to what the budget holds
  (``cap_required``);
- usage always comes in a stream (``message_start``, then ``message_delta``):
  nothing to ask for;
- keys arrive as ``x-api-key`` as well as ``Authorization: Bearer``;
- every answer carries ``request-id``, the request's event id.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gateway_shim import anthropic_answers, anthropic_messages
from gateway_shim.dialects import CutStream, Dialect, Limits
from gateway_shim.usage import Usage
from quotameter.config import TokenCount
from quotameter.message_tokens import count_messages_prompt


class MessagesDialect(Dialect):
    name = "messages"
    cap_field = "max_tokens"
    cap_required = True
    request_id_header = anthropic_answers.REQUEST_ID_HEADER

    def check(self, route: str, body: dict[str, Any], limits: Limits) -> None:
        anthropic_messages.check_request(body, limits)

    def count_prompt(self, body: dict[str, Any], model: str | None) -> int:
        return count_messages_prompt(body, model)

    def credentials(self, headers: Mapping[str, str]) -> str | None:
        authorization = headers.get("authorization") or headers.get("Authorization")
        if authorization:
            return authorization
        api_key = (headers.get("x-api-key") or headers.get("X-Api-Key") or "").strip()
        return f"Bearer {api_key}" if api_key else None

    def usage(self, document: dict[str, Any]) -> Usage | None:
        return anthropic_messages.answer_usage(document)

    def text(self, document: dict[str, Any]) -> str:
        return anthropic_messages.answer_text(document)

    def upstream_error(self, document: dict[str, Any]) -> object | None:
        return (document.get("error") or "error") if anthropic_messages.is_error(document) else None

    def event_model(self, event: dict[str, Any]) -> str | None:
        return anthropic_messages.event_model(event)

    def event_id(self, event: dict[str, Any]) -> str | None:
        return anthropic_messages.event_id(event)

    def event_usage(self, event: dict[str, Any], previous: Usage | None) -> Usage | None:
        return anthropic_messages.event_usage(event, previous)

    def event_text(self, event: dict[str, Any]) -> str:
        return anthropic_messages.event_text(event)

    def event_ends(self, event: dict[str, Any]) -> bool:
        return anthropic_messages.ends(event)

    def cut_ending(self, cut: CutStream) -> bytes:
        return anthropic_messages.cut_ending(anthropic_messages.open_block(cut.last_event), cut.output_tokens,
                                             cut.message)

    def error_body(self, status: int, error_type: str, code: str, message: str, param: str | None) -> bytes:
        return anthropic_answers.error_body(status, message)

    def limit_headers(self, headers: dict[str, str], counts: TokenCount = TokenCount.TOTAL) -> dict[str, str]:
        return anthropic_answers.ratelimit_headers(headers, counts, datetime.now(UTC))


MESSAGES = MessagesDialect()
