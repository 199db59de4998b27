"""Usage history in time buckets, grouped by who spent it: the query behind
``GET /v1/usage?start_time=…`` (the shim asks the worker's
``POST /usage/buckets``, pipeline/web.py).

Only requests the model answered count: admitted, status below 400 (a
refusal, a malformed request or an upstream error uses nothing). The ledger is
read ``FINAL``, so a redelivered event counts once. Every customer-supplied
value (customer, tag key) is a bound ``{name:Type}`` parameter, never text of
the query; group-by names are checked against ``DIMENSIONS`` and only their
fixed expressions go into the SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from pipeline.history.schema import EVENTS, _clickhouse_time
from quotameter.aggregate import format_usd
from quotameter.labels import TAG_KEY

WIDTHS_S = {"1m": 60, "1h": 3600, "1d": 86400}
# group_by name → the ledger expression it groups by, and the answer's field.
DIMENSIONS = {
    "model": ("coalesce(model_served, model_requested, '')", "model"),
    "api_key": ("api_key_id", "api_key_id"),
    "user": ("end_user", "user"),
    "project": ("project", "project"),
}
TAG_PREFIX = "tag:"
MAX_TAG_GROUPS = 4
MAX_ROWS = 5_000  # results in one page at most (the stores return up to 10 000 rows)


@dataclass(frozen=True)
class BucketQuery:
    customer: str
    start_s: int  # inclusive, a multiple of width_s
    end_s: int  # exclusive
    width_s: int
    group_by: tuple[str, ...]  # "model", "api_key", "user", "project", "tag:KEY"

    @classmethod
    def from_json(cls, document: Any) -> BucketQuery:
        """Checked, or ValueError saying what is wrong."""
        if not isinstance(document, dict):
            raise ValueError("the body must be a JSON object")
        customer, group_by = document.get("customer"), document.get("group_by", [])
        numbers = [document.get(name) for name in ("start_s", "end_s", "width_s")]
        if not isinstance(customer, str) or not customer:
            raise ValueError("customer is required")
        if not all(type(n) is int for n in numbers):
            raise ValueError("start_s, end_s and width_s must be integers")
        if not isinstance(group_by, list) or not all(isinstance(g, str) for g in group_by):
            raise ValueError("group_by must be a list of names")
        query = cls(customer, *numbers, tuple(group_by))
        query.check()
        return query

    def check(self) -> None:
        if self.width_s not in WIDTHS_S.values():
            raise ValueError(f"width_s must be one of {sorted(WIDTHS_S.values())}")
        if not 0 <= self.start_s < self.end_s or self.start_s % self.width_s:
            raise ValueError("start_s must be a bucket boundary before end_s")
        if len(set(self.group_by)) != len(self.group_by):
            raise ValueError("a group_by name is given twice")
        tags = [name for name in self.group_by if name.startswith(TAG_PREFIX)]
        if len(tags) > MAX_TAG_GROUPS:
            raise ValueError(f"at most {MAX_TAG_GROUPS} tag groups")
        for name in self.group_by:
            if name not in DIMENSIONS and not (name.startswith(TAG_PREFIX) and TAG_KEY.fullmatch(name[len(TAG_PREFIX):])):
                raise ValueError(f"cannot group by {name[:80]!r}: use model, api_key, user, project or tag:KEY")

    def sql(self) -> tuple[str, dict[str, str]]:
        """The statement and its bound parameters."""
        params = {
            "customer": self.customer,
            "start": _clickhouse_time(datetime.fromtimestamp(self.start_s, UTC)),
            "end": _clickhouse_time(datetime.fromtimestamp(self.end_s, UTC)),
            "width_s": str(self.width_s),
            "limit": str(MAX_ROWS + 1),
        }
        groups = []
        for n, name in enumerate(self.group_by):
            if name.startswith(TAG_PREFIX):
                params[f"tag_{n}"] = name[len(TAG_PREFIX):]
                groups.append(f"tags[{{tag_{n}:String}}] AS g_{n}")
            else:
                groups.append(f"{DIMENSIONS[name][0]} AS g_{n}")
        keys = ", ".join(["bucket_s", *(f"g_{n}" for n in range(len(groups)))])
        sql = f"""SELECT intDiv(toUnixTimestamp(time), {{width_s:UInt32}}) * {{width_s:UInt32}} AS bucket_s,
    {''.join(g + ', ' for g in groups)}count() AS num_model_requests,
    sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
    sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens,
    toString(sum(cost_usd)) AS cost_usd
FROM {EVENTS} FINAL
WHERE customer = {{customer:String}} AND decision = 'admitted' AND status < 400
  AND time >= {{start:DateTime64(3, 'UTC')}} AND time < {{end:DateTime64(3, 'UTC')}}
GROUP BY {keys}
ORDER BY {keys}
LIMIT {{limit:UInt32}}"""
        return sql, params

    def result(self, row: dict[str, Any]) -> dict[str, Any]:
        """One ledger row as an answer's result (the bucket stays in ``bucket_s``)."""
        out: dict[str, Any] = {"bucket_s": int(row["bucket_s"])}
        for name in ("input_tokens", "output_tokens", "cached_tokens", "reasoning_tokens", "num_model_requests"):
            out[name] = int(row[name])
        out["cost_usd"] = format_usd(Decimal(str(row["cost_usd"])))
        tags = {}
        for n, name in enumerate(self.group_by):
            value = row[f"g_{n}"] or None  # '' in the ledger: none given
            if name.startswith(TAG_PREFIX):
                tags[name[len(TAG_PREFIX):]] = value
            else:
                out[DIMENSIONS[name][1]] = value
        if tags:
            out["tags"] = tags
        return out
