"""What an attribution value may be: the end user, the project and the tags a
request is billed under (gateway_shim/attribution.py reads them from the
request; the event schema checks them again on every reported event).

These strings come from customers, so each is bounded and plain: an end user
or a project is 1-256 printable characters (any script; no control
characters, no lone surrogates, so it encodes as UTF-8 JSON and as a CSV
cell), a tag key 1-64 of ``A-Z a-z 0-9 _ . -`` starting with a letter or
digit, a tag value 1-128 of those plus ``: / @ +``. Keys are unique, at most
MAX_TAGS of them. Nothing here is ever spliced into SQL: the ledger binds
them as parameters.
"""

from __future__ import annotations

import re

MAX_ID_CHARS = 256  # an end user or a project
MAX_TAG_KEY_CHARS = 64
MAX_TAG_VALUE_CHARS = 128
MAX_TAGS = 16  # the most a request may carry; shim.max_tags may lower it

TAG_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}")
TAG_VALUE = re.compile(r"[A-Za-z0-9_.:/@+\-]{1,128}")
# C0 and C1 controls, DEL, lone surrogates, and the line/paragraph separators
# some CSV readers and log viewers split on.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u2028\u2029]")


def id_problem(value: str) -> str | None:
    """Why ``value`` cannot name an end user or a project, or None."""
    if not value:
        return "is empty"
    if len(value) > MAX_ID_CHARS:
        return f"is longer than {MAX_ID_CHARS} characters"
    if _UNPRINTABLE.search(value):
        return "contains a control character"
    if value != value.strip():
        return "starts or ends with white space"
    return None


def tag_problem(key: str, value: str) -> str | None:
    """Why ``key=value`` cannot be a tag, or None."""
    if TAG_KEY.fullmatch(key) is None:
        return (f"tag key {key[:80]!r} must be 1-{MAX_TAG_KEY_CHARS} characters of A-Z a-z 0-9 _ . - "
                "starting with a letter or digit")
    if TAG_VALUE.fullmatch(value) is None:
        return f"tag {key}'s value must be 1-{MAX_TAG_VALUE_CHARS} characters of A-Z a-z 0-9 _ . - : / @ +"
    return None
