"""Service health: the shim's and the worker's own metrics, as Prometheus
scrapes them (deploy/prometheus/prometheus.yml), for Grafana's Prometheus
datasource. The Operations dashboard tells what the ledger recorded; this one
tells how the service is doing now: traffic and refusals, latency the shim
adds, the model's errors, the spool, consumer lag, how fresh Redis's quota
state and the ledger are, and Redis outages (fail-mode decisions).

Names are the OpenTelemetry instruments as the Prometheus exporter writes
them: dots as underscores, ``_seconds`` for a unit of s, ``_total`` on
counters. The alert rules (deploy/prometheus/alerts.yml) read the same series.
"""

from __future__ import annotations

from dashboards.model import Dashboard, Panel, PromQuery, Viz

RATE = "$__rate_interval"  # Grafana's: at least four scrape intervals


def rate(series: str, by: str) -> str:
    return f"sum by ({by}) (rate({series}[{RATE}]))"


def quantiles(histogram: str, *, selector: str = "", by: str = "") -> tuple[PromQuery, ...]:
    """p50 and p99 of a histogram, over all instances (per ``by`` label when given)."""
    group = f"{by}, le" if by else "le"
    legend = f"{by} {{{{{by}}}}} " if by else ""  # "streamed true p99"
    return tuple(
        PromQuery(f"histogram_quantile({q}, sum by ({group}) (rate({histogram}_bucket{selector}[{RATE}])))",
                  f"{legend}p{int(q * 100)}")
        for q in (0.5, 0.99)
    )


TARGETS_UP = Panel(
    id=1, key="targets_up", title="Shims and workers answering", viz=Viz.STAT, width=6, height=5,
    description="Targets Prometheus scraped successfully, per job (QuotameterTargetDown fires on a missing one).",
    promql=(PromQuery('sum by (job) (up{job=~"quotameter-shim|quotameter-worker"})', "{{job}}"),),
)

INFLIGHT = Panel(
    id=2, key="inflight", title="Requests in flight", viz=Viz.STAT, width=6, height=5,
    description="Requests the shims hold now, admitted and not yet answered.",
    promql=(PromQuery("sum(quotameter_shim_inflight)", "In flight"),),
)

SPOOL_WAITING = Panel(
    id=3, key="spool_waiting", title="Spool: events waiting", viz=Viz.STAT, width=6, height=5,
    description="Usage events on the shims' disks not yet delivered.",
    promql=(PromQuery("sum(quotameter_shim_spool_depth)", "Events waiting"),),
)

SPOOL_OLDEST = Panel(
    id=19, key="spool_oldest", title="Spool: oldest event", viz=Viz.STAT, unit="s", width=6, height=5,
    description="How long the oldest undelivered event has waited (0 when the spool is empty).",
    promql=(PromQuery("max(quotameter_shim_spool_age_seconds)", "Oldest event"),),
)

REQUESTS = Panel(
    id=4, key="requests_by_outcome", title="Requests per second by outcome", viz=Viz.TIMESERIES, unit="reqps",
    promql=(PromQuery(rate("quotameter_shim_requests_total", "outcome"), "{{outcome}}"),),
)

REFUSALS = Panel(
    id=5, key="refusals_by_reason", title="Refusals per second by reason", viz=Viz.TIMESERIES, unit="reqps",
    promql=(PromQuery(rate('quotameter_shim_requests_total{outcome="refused"}', "reason, limit_kind"),
                      "{{reason}} {{limit_kind}}"),),
)

ADMISSION = Panel(
    id=6, key="admission_latency", title="Admission latency p50 / p99", viz=Viz.TIMESERIES, unit="s",
    description="Deciding admit or refuse: the Redis round trip and the policy.",
    promql=quantiles("quotameter_shim_admission_duration_seconds"),
)

ADDED = Panel(
    id=7, key="added_latency", title="Latency the shim adds p50 / p99", viz=Viz.TIMESERIES, unit="s",
    description="The whole request minus the model's time, streamed and not.",
    promql=quantiles("quotameter_shim_added_duration_seconds", by="streamed"),
)

UPSTREAM_LATENCY = Panel(
    id=8, key="upstream_latency", title="Model latency p50 / p99", viz=Viz.TIMESERIES, unit="s",
    description="The upstream's answer time, failed calls left out.",
    promql=quantiles("quotameter_shim_upstream_duration_seconds", selector='{status_class!="error"}'),
)

UPSTREAM_ERRORS = Panel(
    id=9, key="upstream_errors", title="Model errors per second by kind", viz=Viz.TIMESERIES, unit="short",
    description="Timeouts, refused connections, 5xx and unreadable answers (QuotameterUpstreamErrors: over 5 %).",
    promql=(PromQuery(rate("quotameter_shim_upstream_errors_total", "kind"), "{{kind}}"),),
)

TOKENS = Panel(
    id=10, key="tokens_by_type", title="Tokens per second by type", viz=Viz.TIMESERIES, unit="short",
    promql=(PromQuery(rate("quotameter_shim_tokens_total", "type"), "{{type}}"),),
)

SPOOL = Panel(
    id=11, key="spool_depth", title="Spool depth", viz=Viz.TIMESERIES, unit="short",
    description="Events each shim keeps until they are delivered (QuotameterSpoolGrowing).",
    promql=(PromQuery("sum by (instance) (quotameter_shim_spool_depth)", "{{instance}}"),),
)

SPOOL_AGE = Panel(
    id=12, key="spool_age", title="Spool: oldest event's age", viz=Viz.TIMESERIES, unit="s",
    promql=(PromQuery("max by (instance) (quotameter_shim_spool_age_seconds)", "{{instance}}"),),
)

CONSUMER_LAG = Panel(
    id=13, key="consumer_lag", title="Consumer lag", viz=Viz.TIMESERIES, unit="short",
    description="Records the workers have yet to read, per topic (QuotameterConsumerLag).",
    promql=(PromQuery("sum by (topic) (quotameter_worker_consumer_lag)", "{{topic}}"),),
)

FRESHNESS = Panel(
    id=14, key="freshness", title="Freshness p99: Redis and ledger", viz=Viz.TIMESERIES, unit="s",
    description="From an event's time to its being in Redis's quota state / in the ledger (QuotameterFreshnessSlow: over 5 s).",
    promql=(PromQuery(
        f"histogram_quantile(0.99, sum by (target, le) (rate(quotameter_worker_freshness_seconds_bucket[{RATE}])))",
        "{{target}} p99"),),
)

LEDGER_LATENCY = Panel(
    id=15, key="ledger_insert_latency", title="Ledger insert latency p50 / p99", viz=Viz.TIMESERIES, unit="s",
    promql=quantiles("quotameter_worker_ledger_insert_duration_seconds"),
)

LEDGER_FAILURES = Panel(
    id=16, key="ledger_insert_failures", title="Ledger insert failures per second", viz=Viz.TIMESERIES, unit="short",
    description="Batches the ledger refused; the worker retries them before committing (QuotameterLedgerInsertFailures).",
    promql=(PromQuery(rate("quotameter_worker_ledger_insert_failures_total", "instance"), "{{instance}}"),),
)

FAIL_MODE = Panel(
    id=17, key="fail_mode_decisions", title="Decisions without Redis per second", viz=Viz.TIMESERIES, unit="short",
    description="Admission by fail mode while Redis is unreachable: open (local limiter) or closed (503).",
    promql=(PromQuery(rate("quotameter_shim_fail_mode_decisions_total", "mode, limit_kind"),
                      "{{mode}} {{limit_kind}}"),),
)

INFLIGHT_OVER_TIME = Panel(
    id=18, key="inflight_over_time", title="Requests in flight per shim", viz=Viz.TIMESERIES, unit="short",
    promql=(PromQuery("sum by (instance) (quotameter_shim_inflight)", "{{instance}}"),),
)

SERVICE_HEALTH = Dashboard(
    uid="quotameter-service-health",
    title="quotameter · Service health",
    description="The shims' and workers' metrics from Prometheus: traffic, latency, the model, the spool, "
                "consumer lag, freshness, the ledger and Redis outages.",
    time_from="now-3h",
    tags=("quotameter", "prometheus"),
    panels=(TARGETS_UP, INFLIGHT, SPOOL_WAITING, SPOOL_OLDEST, REQUESTS, REFUSALS, ADMISSION, ADDED, UPSTREAM_LATENCY, UPSTREAM_ERRORS,
            TOKENS, FAIL_MODE, SPOOL, SPOOL_AGE, CONSUMER_LAG, FRESHNESS, LEDGER_LATENCY, LEDGER_FAILURES,
            INFLIGHT_OVER_TIME),
)
