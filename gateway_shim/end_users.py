"""Which end user a request's per-user limits apply to, and the day its day
quota counts.

The end user comes from the request (attribution.py: the body's ``user`` /
``safety_identifier``, or ``x-quotameter-user``). A tier with ``per_user``
limits holds each end user of a customer to them; a request naming none is
held to the customer's limits only, unless ``per_user.require_user`` refuses
it. The id is the customer's own string: bounded here, and only its digest
ever reaches Redis or the in-process limiter.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from gateway_shim.errors import InvalidParameter
from gateway_shim.metering import RequestMeter
from quotameter.events import Decision
from quotameter.policy import EndUser, Policy, end_user_digest

# OpenAI accepts end-user ids of up to 256 characters in ``user``.
MAX_END_USER_CHARS = 256


def end_user_limits(policy: Policy, end_user: str | None, meter: RequestMeter) -> EndUser | None:
    """The per-user limits of ``end_user`` under ``policy`` (None: none apply), or
    the 400 of a request the tier refuses for its end user."""
    if end_user is None:
        if policy.require_user:
            meter.decision, meter.reason = Decision.REFUSED, "user_required"
            raise InvalidParameter(
                f"The {policy.tier_name.capitalize()} tier limits each end user: name yours in the request's "
                "'user' field or the x-quotameter-user header.",
                "user",
                "missing_required_parameter",
            )
        return None
    if not policy.per_user:
        return None
    if len(end_user) > MAX_END_USER_CHARS:
        meter.decision, meter.reason = Decision.REFUSED, "user_too_long"
        raise InvalidParameter(
            f"The end-user id is {len(end_user)} characters long; at most {MAX_END_USER_CHARS} are accepted.",
            "user",
            "invalid_value",
        )
    return policy.end_user(end_user_digest(end_user))


def day_of(timezone: str, now_ms: int) -> tuple[str, int, int]:
    """The calendar day of ``now_ms`` in ``timezone``: its name (YYYY-MM-DD), start and end ms."""
    zone = ZoneInfo(timezone)
    local = datetime.fromtimestamp(now_ms / 1000, UTC).astimezone(zone)
    start = local.replace(hour=0, minute=0, second=0, microsecond=0)
    # Wall-clock arithmetic (one zone): the next local midnight, however long the
    # day (23 or 25 hours across a daylight-saving change).
    following = start + timedelta(days=1)
    start_ms = int(start.astimezone(UTC).timestamp() * 1000)
    end_ms = int(following.astimezone(UTC).timestamp() * 1000)
    return local.date().isoformat(), start_ms, end_ms
