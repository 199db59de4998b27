"""Operations: requests/s, latency percentiles, time to first token,
upstream errors, pipeline lag (ingested_at - time).

Requests per second and the traffic counts come from the rollups (a range
with minute points reads the ledger: ``sources.usage``); upstream errors are
counted from the ledger deduplicated; the percentiles read the ledger without
``FINAL`` (see ``dashboards.sources``).
"""

from __future__ import annotations

from dashboards import fields as f
from dashboards.model import Dashboard, Field, Panel, Unit, Viz
from dashboards.sources import ledger, usage

# From the request's end at the shim to its row in the ledger.
LAG_MS = "dateDiff('millisecond', time, ingested_at)"
# An upstream failure: reason upstream_error, or an admitted request answered 5xx.
UPSTREAM_ERROR = "reason = 'upstream_error' OR (decision = 'admitted' AND status >= 500)"

REQUESTS_PER_S = Panel(
    id=1,
    key="requests_per_s",
    title="Requests per second",
    viz=Viz.TIMESERIES,
    unit="reqps",
    x="t",
    series="decision",
    values=("requests_per_s",),
    fields=(f.TIME, Field("decision", "Outcome", Unit.TEXT), Field("requests_per_s", "Requests per second", Unit.PER_SECOND)),
    sql=f"""SELECT t, decision, round(n / $__interval_s, 6) AS requests_per_s
FROM (SELECT $__timeInterval(time) AS t, sum(requests) AS admitted, sum(refused) AS refused
      FROM {usage(step="$__interval_s")}
      GROUP BY t)
ARRAY JOIN ['admitted', 'refused'] AS decision, [admitted, refused] AS n
WHERE n > 0
ORDER BY t, decision""",
)

LATENCY = Panel(
    id=2,
    key="latency",
    title="Latency p50 / p95 / p99 (admitted requests)",
    description="The shim's latency_ms per request, upstream included.",
    viz=Viz.TIMESERIES,
    unit="ms",
    x="t",
    values=("p50_ms", "p95_ms", "p99_ms"),
    fields=(f.TIME, Field("p50_ms", "Median", Unit.MS), Field("p95_ms", "95th percentile", Unit.MS),
            Field("p99_ms", "99th percentile", Unit.MS)),
    sql=f"""SELECT $__timeInterval(time) AS t, quantilesExactInclusive(0.5, 0.95, 0.99)(latency_ms) AS q,
       round(q[1], 3) AS p50_ms, round(q[2], 3) AS p95_ms, round(q[3], 3) AS p99_ms
FROM {ledger("decision = 'admitted'", final=False)}
GROUP BY t
ORDER BY t""",
)

TTFT = Panel(
    id=3,
    key="ttft",
    title="Time to first token p50 / p95 (streamed)",
    viz=Viz.TIMESERIES,
    unit="ms",
    x="t",
    values=("p50_ms", "p95_ms"),
    fields=(f.TIME, Field("p50_ms", "Median", Unit.MS), Field("p95_ms", "95th percentile", Unit.MS)),
    sql=f"""SELECT $__timeInterval(time) AS t, quantilesExactInclusive(0.5, 0.95)(ttft_ms) AS q,
       round(q[1], 3) AS p50_ms, round(q[2], 3) AS p95_ms
FROM {ledger("streamed AND ttft_ms IS NOT NULL", final=False)}
GROUP BY t
ORDER BY t""",
)

UPSTREAM_ERRORS = Panel(
    id=4,
    key="upstream_errors",
    title="Upstream errors",
    description="Requests the upstream failed: reason upstream_error, or an admitted request answered 5xx.",
    viz=Viz.TIMESERIES,
    unit="short",
    x="t",
    series="upstream_name",
    values=("errors",),
    fields=(f.TIME, Field("upstream_name", "Upstream", Unit.TEXT), Field("errors", "Errors")),
    sql=f"""SELECT $__timeInterval(time) AS t, ifNull(upstream, 'unknown') AS upstream_name, count() AS errors
FROM {ledger(UPSTREAM_ERROR, final=True)}
GROUP BY t, upstream_name
ORDER BY t, upstream_name""",
)

PIPELINE_LAG = Panel(
    id=5,
    key="pipeline_lag",
    title="Pipeline lag (ingested_at - time)",
    description="From the request's end at the shim to its row in the ledger: spool, Kafka, worker, sink.",
    viz=Viz.TIMESERIES,
    unit="s",
    x="t",
    values=("p50_lag_s", "p99_lag_s", "max_lag_s"),
    fields=(f.TIME, Field("p50_lag_s", "Median lag", Unit.SECONDS), Field("p99_lag_s", "99th percentile lag", Unit.SECONDS),
            Field("max_lag_s", "Longest lag", Unit.SECONDS)),
    sql=f"""SELECT $__timeInterval(time) AS t, quantilesExactInclusive(0.5, 0.99)({LAG_MS}) AS q,
       round(q[1] / 1000, 3) AS p50_lag_s, round(q[2] / 1000, 3) AS p99_lag_s, round(max({LAG_MS}) / 1000, 3) AS max_lag_s
FROM {ledger(final=False)}
GROUP BY t
ORDER BY t""",
)

TRAFFIC = Panel(
    id=6,
    key="traffic",
    title="Requests, refusals and upstream errors in range",
    viz=Viz.STAT,
    unit="short",
    values=("events", "refused", "upstream_errors"),
    fields=(Field("events", "Requests"), f.REFUSED, Field("upstream_errors", "Upstream errors")),
    sql=f"""SELECT sum(events) AS events, sum(refused) AS refused,
       (SELECT count() FROM {ledger(UPSTREAM_ERROR, final=True)}) AS upstream_errors
FROM {usage()}""",
)

OPERATIONS = Dashboard(
    uid="quotameter-operations",
    title="quotameter · Operations",
    description="Traffic, latency, upstream health and how far the ledger trails the shim.",
    time_from="now-6h",
    panels=(TRAFFIC, REQUESTS_PER_S, LATENCY, TTFT, UPSTREAM_ERRORS, PIPELINE_LAG),
)
