"""The usage-history query: checked inputs, and values only ever bound, never in the SQL text."""

import pytest

from pipeline.history.usage_buckets import BucketQuery


def test_customer_and_tag_keys_are_bound_never_spliced() -> None:
    query = BucketQuery.from_json({"customer": "x' OR '1'='1", "start_s": 3600, "end_s": 7200, "width_s": 60,
                                   "group_by": ["user", "tag:team-1.a", "model"]})
    sql, params = query.sql()
    assert "x' OR" not in sql and "team-1.a" not in sql and "tags[{tag_1:String}] AS g_1" in sql
    assert params["customer"] == "x' OR '1'='1" and params["tag_1"] == "team-1.a"
    assert (params["start"], params["end"], params["width_s"]) == ("1970-01-01 01:00:00.000", "1970-01-01 02:00:00.000", "60")
    result = query.result({"bucket_s": "3600", "g_0": "", "g_1": "search", "g_2": "m", "input_tokens": "3",
                           "output_tokens": 2, "cached_tokens": 0, "reasoning_tokens": 0, "num_model_requests": 1,
                           "cost_usd": "0.0000011"})
    assert result == {"bucket_s": 3600, "input_tokens": 3, "output_tokens": 2, "cached_tokens": 0, "reasoning_tokens": 0,
                      "num_model_requests": 1, "cost_usd": "0.000001100000", "user": None, "model": "m",
                      "tags": {"team-1.a": "search"}}


@pytest.mark.parametrize("bad", [
    {"group_by": ["tag:te'am"]}, {"group_by": ["tag:"]}, {"group_by": ["customer"]}, {"group_by": ["user", "user"]},
    {"group_by": [f"tag:k{n}" for n in range(5)]}, {"width_s": 120}, {"start_s": 30}, {"end_s": 0},
    {"start_s": "0"}, {"customer": ""}, {"group_by": "user"},
])
def test_bad_queries_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        BucketQuery.from_json({"customer": "c", "start_s": 0, "end_s": 3600, "width_s": 60, "group_by": []} | bad)
