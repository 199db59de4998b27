"""The Operations page's live figures: the shim's and the worker's own
metrics, read from their ``GET /metrics`` at each page view and parsed with
``prometheus_client.parser``. They are the series Prometheus scrapes for the
service-health dashboard and the alert rules (deploy/prometheus).

Gauges (in flight, the spool, consumer lag) are now; counters and the
freshness histogram count from the process's start, so a restart sets them
back to zero.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from dashboards.display import display
from dashboards.model import Field, Unit
from quotameter.config import Config
from quotameter.errors import QuotameterError

SCRAPE_TIMEOUT_S = 2.0  # a page view waits at most this long for each process


class LiveMetricsError(QuotameterError):
    """A process's /metrics did not answer or was not the Prometheus text format."""


@dataclass(frozen=True)
class Target:
    name: str  # the shim, the worker
    url: str  # /metrics wants no token on either


def targets(config: Config) -> tuple[Target, Target]:
    """Where the configured shim and worker serve their metrics."""
    host = config.shim.host
    host = "127.0.0.1" if host in ("", "0.0.0.0") else "[::1]" if host == "::" else f"[{host}]" if ":" in host else host
    return (Target("shim", f"http://{host}:{config.shim.port}/metrics"),
            Target("worker", config.services.worker_url.rstrip("/") + "/metrics"))


def scrape(target: Target) -> list[Sample]:
    try:
        with urllib.request.urlopen(urllib.request.Request(target.url, headers={"Accept": "text/plain"}),
                                    timeout=SCRAPE_TIMEOUT_S) as response:
            text = response.read().decode("utf-8")
    except urllib.error.HTTPError as exc:
        raise LiveMetricsError(f"the {target.name}'s {target.url} answered {exc.code}") from None
    except urllib.error.URLError as exc:
        raise LiveMetricsError(f"the {target.name}'s {target.url} did not answer: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise LiveMetricsError(f"the {target.name}'s {target.url} did not answer: {exc}") from None
    try:
        return [s for family in text_string_to_metric_families(text) for s in family.samples]
    except ValueError as exc:
        raise LiveMetricsError(f"the {target.name}'s {target.url} is not Prometheus text: {exc}") from None


def grouped(samples: Iterable[Sample], name: str, by: tuple[str, ...], **match: str) -> dict[tuple[str, ...], float]:
    """Sum of the samples called ``name`` with the ``match`` labels, per ``by`` labels."""
    sums: dict[tuple[str, ...], float] = defaultdict(float)
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in match.items()):
            sums[tuple(s.labels.get(k, "") for k in by)] += s.value
    return dict(sums)


def total(samples: Iterable[Sample], name: str, **match: str) -> float | None:
    """Sum over every series of ``name``; None when the process has none yet."""
    sums = grouped(samples, name, (), **match)
    return sums[()] if sums else None


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """``q`` of a cumulative histogram (upper bound -> count), interpolated
    within its bucket as PromQL's histogram_quantile does; None when empty."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] == 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for upper in bounds:
        count = buckets[upper]
        if count >= rank:
            if math.isinf(upper):  # past the last finite bound: that bound is all we know
                return lower
            return lower + (upper - lower) * (rank - below) / (count - below) if count > below else upper
        lower, below = upper, count
    return lower


def histogram_quantile(samples: Iterable[Sample], name: str, q: float, **match: str) -> float | None:
    per_bound = grouped(samples, f"{name}_bucket", ("le",), **match)
    return quantile(q, {float(le): count for (le,), count in per_bound.items()})


def _plain(value: float | None) -> float | int | None:
    """Counts as integers (the exposition writes 3.0); seconds to the microsecond."""
    if value is None:
        return None
    return int(value) if value == int(value) else round(value, 6)


def _panel(key: str, title: str, description: str, viz: str, fields: tuple[Field, ...],
           rows: list[dict[str, Any]], error: str | None, width: int) -> dict[str, Any]:
    """An entry in the page's format (``DashboardApp.gather``), drawn like any stat or table."""
    return {
        "key": key, "id": None, "title": title, "description": description, "viz": viz, "unit": "short",
        "x": None, "series": None, "width": width, "live": True, "error": error, "rows": rows,
        "values": [f.name for f in fields] if viz == "stat" else [],
        "fields": [{"name": f.name, "label": f.label, "unit": str(f.unit)} for f in fields],
        "display": [[display(row.get(f.name), f) for f in fields] for row in rows],
    }


SHIM_NOW = (Field("inflight", "Requests in flight"), Field("spool_depth", "Spool: events waiting"),
            Field("spool_age_s", "Spool: oldest event", Unit.SECONDS))
WORKER_NOW = (Field("consumer_lag", "Consumer lag (records)"),
              Field("freshness_redis_p99_s", "Freshness p99, Redis", Unit.SECONDS),
              Field("freshness_ledger_p99_s", "Freshness p99, ledger", Unit.SECONDS))
REFUSALS = (Field("reason", "Reason", Unit.TEXT), Field("limit_kind", "Limit", Unit.TEXT),
            Field("refused", "Requests refused"))
FAIL_MODES = (Field("mode", "Fail mode", Unit.TEXT), Field("limit_kind", "Limit", Unit.TEXT),
              Field("decisions", "Decisions without Redis"))
LAG = (Field("topic", "Topic", Unit.TEXT), Field("partition", "Partition", Unit.TEXT),
       Field("lag", "Records behind"))


def _table(sums: dict[tuple[str, ...], float], fields: tuple[Field, ...]) -> list[dict[str, Any]]:
    """One row per label set, the largest first."""
    names = [f.name for f in fields]
    ordered = sorted(sums.items(), key=lambda item: (-item[1], item[0]))
    return [dict(zip(names, (*labels, _plain(value)), strict=True)) for labels, value in ordered]


def shim_panels(samples: list[Sample] | None, error: str | None) -> list[dict[str, Any]]:
    s = samples or []
    now = [] if error else [{
        "inflight": _plain(total(s, "quotameter_shim_inflight")),
        "spool_depth": _plain(total(s, "quotameter_shim_spool_depth")),
        "spool_age_s": _plain(total(s, "quotameter_shim_spool_age_seconds")),
    }]
    refused = grouped(s, "quotameter_shim_requests_total", ("reason", "limit_kind"), outcome="refused")
    fail_modes = grouped(s, "quotameter_shim_fail_mode_decisions_total", ("mode", "limit_kind"))
    first = _panel("live_shim", "The shim now", "In flight and the spool of undelivered usage events.", "stat",
                   SHIM_NOW, now, error, 12)
    if error:  # said once, on the first of its panels
        return [first]
    return [
        first,
        _panel("live_refusals", "Refusals by reason since the shim started", "", "table", REFUSALS,
               _table(refused, REFUSALS), error, 12),
        _panel("live_fail_modes", "Decisions without Redis since the shim started",
               "Admissions decided by the fail modes while Redis was unreachable (none is the healthy answer).",
               "table", FAIL_MODES, _table(fail_modes, FAIL_MODES), error, 12),
    ]


def worker_panels(samples: list[Sample] | None, error: str | None) -> list[dict[str, Any]]:
    s = samples or []
    freshness = "quotameter_worker_freshness_seconds"
    now = [] if error else [{
        "consumer_lag": _plain(total(s, "quotameter_worker_consumer_lag")),
        "freshness_redis_p99_s": _plain(histogram_quantile(s, freshness, 0.99, target="redis")),
        "freshness_ledger_p99_s": _plain(histogram_quantile(s, freshness, 0.99, target="ledger")),
    }]
    lag = grouped(s, "quotameter_worker_consumer_lag", ("topic", "partition"))
    first = _panel("live_worker", "The worker now",
                   "Records not yet read, and from an event's time to Redis's quota state and to the ledger "
                   "(99th percentile since the worker started).", "stat", WORKER_NOW, now, error, 12)
    if error:
        return [first]
    return [
        first,
        _panel("live_lag", "Consumer lag per partition", "", "table", LAG, _table(lag, LAG), error, 12),
    ]


def live_panels(config: Config) -> list[dict[str, Any]]:
    """Scrape the configured shim and worker now (blocking); their panels, each
    carrying the error of a process that did not answer."""
    panels: list[dict[str, Any]] = []
    for target, build in zip(targets(config), (shim_panels, worker_panels), strict=True):
        try:
            panels += build(scrape(target), None)
        except LiveMetricsError as exc:
            panels += build(None, str(exc))
    return panels
