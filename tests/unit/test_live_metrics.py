"""The Operations page's live figures from a shim's and a worker's /metrics text."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from dashboards.live_metrics import shim_panels, worker_panels

SHIM = """\
# TYPE quotameter_shim_requests_total counter
quotameter_shim_requests_total{route="chat",outcome="admitted",reason="",limit_kind="",tier="pro",model="gpt-4o"} 40.0
quotameter_shim_requests_total{route="chat",outcome="refused",reason="rate_limit_requests",limit_kind="rpm",tier="pro",model="gpt-4o"} 3.0
quotameter_shim_requests_total{route="embeddings",outcome="refused",reason="rate_limit_requests",limit_kind="rpm",tier="free",model="other"} 2.0
quotameter_shim_requests_total{route="chat",outcome="refused",reason="quota_tokens",limit_kind="tpm",tier="free",model="gpt-4o"} 1.0
# TYPE quotameter_shim_inflight gauge
quotameter_shim_inflight 2.0
# TYPE quotameter_shim_spool_depth gauge
quotameter_shim_spool_depth 17.0
# TYPE quotameter_shim_spool_age_seconds gauge
quotameter_shim_spool_age_seconds 4.25
# TYPE quotameter_shim_fail_mode_decisions_total counter
quotameter_shim_fail_mode_decisions_total{mode="open",limit_kind="rpm"} 5.0
"""

WORKER = """\
# TYPE quotameter_worker_consumer_lag gauge
quotameter_worker_consumer_lag{topic="quotameter.events",partition="0"} 7.0
quotameter_worker_consumer_lag{topic="quotameter.events",partition="1"} 0.0
# TYPE quotameter_worker_freshness_seconds histogram
quotameter_worker_freshness_seconds_bucket{target="redis",le="0.5"} 0.0
quotameter_worker_freshness_seconds_bucket{target="redis",le="5.0"} 0.0
quotameter_worker_freshness_seconds_bucket{target="redis",le="10.0"} 60.0
quotameter_worker_freshness_seconds_bucket{target="redis",le="+Inf"} 60.0
quotameter_worker_freshness_seconds_count{target="redis"} 60.0
quotameter_worker_freshness_seconds_sum{target="redis"} 420.0
"""


def samples(text: str) -> list:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def by_key(panels: list[dict]) -> dict[str, dict]:
    return {p["key"]: p for p in panels}


def test_the_shim_now_and_its_refusals() -> None:
    panels = by_key(shim_panels(samples(SHIM), None))
    assert panels["live_shim"]["rows"] == [{"inflight": 2, "spool_depth": 17, "spool_age_s": 4.25}]
    assert panels["live_shim"]["display"] == [[("2", ""), ("17", ""), ("4.25 s", "")]]
    # summed over routes, tiers and models; the most first
    assert panels["live_refusals"]["rows"] == [
        {"reason": "rate_limit_requests", "limit_kind": "rpm", "refused": 5},
        {"reason": "quota_tokens", "limit_kind": "tpm", "refused": 1},
    ]
    assert panels["live_fail_modes"]["rows"] == [{"mode": "open", "limit_kind": "rpm", "decisions": 5}]
    assert all(p["live"] and p["error"] is None for p in panels.values())


def test_the_worker_now_with_freshness_as_promql_reads_it() -> None:
    panels = by_key(worker_panels(samples(WORKER), None))
    # every event in (5, 10]: histogram_quantile(0.99, …) interpolates to 9.95 (as alerts_test.yml's promtool does);
    # no ledger series yet: no value rather than zero
    assert panels["live_worker"]["rows"] == [
        {"consumer_lag": 7, "freshness_redis_p99_s": 9.95, "freshness_ledger_p99_s": None}]
    assert panels["live_worker"]["display"][0][2] == ("–", "")
    assert panels["live_lag"]["rows"] == [{"topic": "quotameter.events", "partition": "0", "lag": 7},
                                          {"topic": "quotameter.events", "partition": "1", "lag": 0}]


def test_a_process_that_did_not_answer_says_so() -> None:
    panels = worker_panels(None, "the worker's http://127.0.0.1:1/metrics did not answer")
    assert [p["key"] for p in panels] == ["live_worker"]  # said once
    assert panels[0]["rows"] == [] and "did not answer" in panels[0]["error"]
