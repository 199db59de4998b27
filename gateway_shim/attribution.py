"""Who a request's spend is for: its end user, project and tags.

    end user   the end-user header (shim.end_user_header, x-quotameter-user),
               else the body's ``safety_identifier``, ``user`` (chat,
               completions, embeddings, Responses), else Anthropic's
               ``metadata.user_id``. The header wins: the platform that sets
               it knows its users; the body's fields are the client's and go
               upstream unchanged either way.
    project    the project header (shim.project_header); a key created with
               ``--project`` carries its own, which wins (metering.py).
    tags       the tags header (shim.tags_header): ``team=search,feature=ac``,
               sorted by key, at most shim.max_tags.

A value out of bounds (quotameter/labels.py) is refused with an OpenAI-shaped
400 naming the header or field, never dropped or cut: spend silently billed
to nobody, or to a truncated name that another user shares, is worse for the
platform than a request it must fix. A body field of the wrong type is left
to the upstream, as the shim does not own those fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from gateway_shim.errors import InvalidParameter
from quotameter.config import Config
from quotameter.labels import id_problem, tag_problem


@dataclass(frozen=True, slots=True)
class Attribution:
    end_user: str | None
    project: str | None
    tags: tuple[tuple[str, str], ...]  # sorted by key, validated, bounded


NO_ATTRIBUTION = Attribution(None, None, ())


def attribution_of(headers: Mapping[str, str], body: dict | None, config: Config) -> Attribution:
    """The request's attribution, or InvalidParameter (400) for a bad value."""
    shim = config.shim
    end_user = _header(headers, shim.end_user_header)
    where = shim.end_user_header
    if end_user is None and body:
        end_user, where = _from_body(body)
    project = _header(headers, shim.project_header)
    raw_tags = _header(headers, shim.tags_header)
    if end_user is None and project is None and raw_tags is None:
        return NO_ATTRIBUTION
    if end_user is not None and (problem := id_problem(end_user)):
        raise InvalidParameter(f"The end user ({where}) {problem}.", where, "invalid_value")
    if project is not None and (problem := id_problem(project)):
        raise InvalidParameter(f"The project ({shim.project_header}) {problem}.", shim.project_header, "invalid_value")
    tags = () if raw_tags is None else parse_tags(raw_tags, shim.max_tags, shim.tags_header)
    return Attribution(end_user, project, tags)


def parse_tags(raw: str, max_tags: int, header: str) -> tuple[tuple[str, str], ...]:
    """``key=value`` pairs separated by commas (white space around them ignored)."""
    pairs: dict[str, str] = {}
    for item in raw.split(","):
        item = item.strip()
        if not item:
            continue
        key, equals, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not equals:
            raise InvalidParameter(f"{header}: {item[:80]!r} is not key=value.", header, "invalid_value")
        if problem := tag_problem(key, value):
            raise InvalidParameter(f"{header}: {problem}.", header, "invalid_value")
        if key in pairs:
            raise InvalidParameter(f"{header}: tag {key} is given twice.", header, "invalid_value")
        pairs[key] = value
        if len(pairs) > max_tags:
            raise InvalidParameter(f"{header}: at most {max_tags} tags per request.", header, "too_many_items")
    return tuple(sorted(pairs.items()))


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not isinstance(headers, (CIMultiDictProxy, CIMultiDict)):
        lowered = name.lower()  # a plain mapping: names in any case
        value = next((v for k, v in headers.items() if k.lower() == lowered), None)
    return value or None  # an empty header (a proxy's unset variable) names nothing


def _from_body(body: dict) -> tuple[str | None, str]:
    for field in ("safety_identifier", "user"):
        value = body.get(field)
        if isinstance(value, str) and value:
            return value, field
    metadata = body.get("metadata")
    if isinstance(metadata, dict):
        value = metadata.get("user_id")
        if isinstance(value, str) and value:
            return value, "metadata.user_id"
    return None, ""
