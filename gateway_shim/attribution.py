"""Who a request is for, inside the customer: the end user it names.

The end user is the body's ``user`` (OpenAI's end-user id) or
``safety_identifier`` (its successor) or ``metadata.user_id`` (Anthropic's
Messages API), else the ``x-quotameter-user`` header
a gateway in front may set. Project and tags are not read yet.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from quotameter.config import Config

USER_HEADER = "x-quotameter-user"


@dataclass(frozen=True, slots=True)
class Attribution:
    end_user: str | None
    project: str | None
    tags: tuple[tuple[str, str], ...]


NO_ATTRIBUTION = Attribution(None, None, ())


def attribution_of(headers: Mapping[str, str], body: dict | None, config: Config) -> Attribution:
    end_user = None
    if body is not None:
        for field in ("user", "safety_identifier"):
            value = body.get(field)
            if isinstance(value, str) and value:
                end_user = value
                break
        metadata = body.get("metadata")  # Anthropic's Messages API: metadata.user_id
        if end_user is None and isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
            end_user = metadata["user_id"] or None
    if end_user is None:
        end_user = _header(headers, USER_HEADER) or None
    return NO_ATTRIBUTION if end_user is None else Attribution(end_user, None, ())


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:  # a plain dict: not case-insensitive
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value
