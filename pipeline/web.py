"""The worker's HTTP endpoints, served by Faust's web server.

    GET  /healthz                     200 {"status": "ready"} once the worker has
                                      joined its group and consumes; 503 before
    GET  /usage?customer=C&period=P   the ledger's exact totals (P = YYYY-MM)
    POST /usage/buckets               body: JSON {customer, start_s, end_s, width_s,
                                      group_by}; 200 {"results": […], "truncated": bool}
                                      (``pipeline.history.usage_buckets``), 400 if invalid
    POST /query                       body: one read-only SELECT (text, or JSON
                                      {"sql": …}); 200 {"rows": […]}, 400 if rejected
    POST /rebuild-state?customer=C&month=P&force=1
                                      Redis's period totals from the ledger, between
                                      two batches (``pipeline.rebuild``)
    GET  /stats                       counters and freshness p50/p99 per sink
    GET  /windows?customer=C          this worker's window tables for C (404 when
                                      another worker owns C's partition)
    GET  /metrics                     OpenTelemetry metrics as Prometheus text
                                      (pipeline.telemetry; with telemetry.metrics)

Other processes cannot open the worker's chDB directory, so they read the
ledger here (``pipeline.history.reader``).

With ``services.admin_token`` set, every view but /healthz and /metrics answers 401
unless the request presents it (``quotameter.service_auth``); without one
the worker listens on loopback only (``pipeline.worker.serve`` refuses
otherwise). /query runs its SQL past ``pipeline.history.sql_guard``.
"""

from __future__ import annotations

import json
from typing import Any

from faust.web import Request, Response, View

from pipeline.app import FaustParts
from pipeline.rebuild import rebuild_state
from pipeline.usage_agent import UsageSink
from quotameter.windows import Granularity
from pipeline.history.sql_guard import guarded_query
from pipeline.history.store import AsyncHistory, HistoryError, QueryRejected
from pipeline.history.usage_buckets import MAX_ROWS, BucketQuery
from quotameter.periods import BillingCalendar
from quotameter.service_auth import TokenGate
from telemetry.prometheus import metrics_handler

_UNAUTHORIZED = {"error": "this endpoint needs services.admin_token: send Authorization: Bearer <token>"}


class Readiness:
    def __init__(self) -> None:
        self.ready = False


def register_views(
    parts: FaustParts, history: AsyncHistory, readiness: Readiness, sink: UsageSink, calendar: BillingCalendar,
    gate: TokenGate, *, metrics: bool = False,
) -> None:
    app = parts.app

    def refused(view: View, request: Request) -> Response | None:
        if gate.allows(request.headers):
            return None
        return view.json(_UNAUTHORIZED, status=401, headers={"WWW-Authenticate": 'Bearer realm="quotameter"'})

    @app.page("/rebuild-state")
    class Rebuild(View):
        async def post(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            customer = request.query.get("customer") or None
            month = request.query.get("month") or None
            force = request.query.get("force", "") in ("1", "true")
            if month is not None:
                try:
                    calendar.validate(month)
                except ValueError as exc:
                    return self.json({"error": str(exc)}, status=400)
            try:
                async with sink.lock:  # between two batches: the ledger has every applied event
                    await sink.ledger.flush()
                    counts = await rebuild_state(history, sink.writer, calendar, customer, month, force)
            except (HistoryError, ConnectionError) as exc:
                return self.json({"error": str(exc)}, status=503)
            return self.json(counts)

    @app.page("/stats")
    class Stats(View):
        async def get(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            return self.json(
                {
                    **sink.counts,
                    "ledger_rows": sink.ledger.inserted,
                    "ledger_inserts": sink.ledger.inserts,
                    "ledger_lookups": sink.dedupe.ledger_lookups,
                    "skipped_offsets_filled": sink.guard.filled,
                    # events partitions this worker processed since its last rebalance
                    "partitions": sorted(sink.guard.expected),
                    "freshness": sink.freshness.summary(),
                }
            )

    @app.page("/windows")
    class Windows(View):
        async def get(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            customer = request.query.get("customer", "")
            records = {g.value: sink.windows.record(g, customer) for g in Granularity}
            if not any(records.values()):
                return self.json({"error": f"no windows of {customer!r} on this worker"}, status=404)
            return self.json({name: record.to_json() if record else None for name, record in records.items()})

    @app.page("/healthz")
    class Health(View):
        async def get(self, request: Request) -> Response:
            if not readiness.ready:
                return self.json({"status": "starting"}, status=503)
            return self.json({"status": "ready", "app_id": app.conf.id})

    if metrics:
        # Open like /healthz, for a scraper that holds no admin token: the
        # worker's metrics name no customer, key or event (pipeline.telemetry;
        # telemetry.customer_labels adds customers to the shim's only).
        @app.page("/metrics")
        class Metrics(View):
            async def get(self, request: Request) -> Response:
                return await metrics_handler(request)  # Faust's aiohttp driver hands over aiohttp's request

    @app.page("/usage")
    class Usage(View):
        async def get(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            customer = request.query.get("customer", "")
            period = request.query.get("period", "")
            if not customer:
                return self.json({"error": "customer is required"}, status=400)
            try:
                calendar.validate(period)
            except ValueError as exc:
                return self.json({"error": str(exc)}, status=400)
            try:
                return self.json(await history.usage(customer, period, calendar))
            except HistoryError as exc:
                return self.json({"error": str(exc)}, status=500)

    @app.page("/usage/buckets")
    class UsageBuckets(View):
        async def post(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            try:
                query = BucketQuery.from_json(json.loads(await request.text()))
            except ValueError as exc:  # also a body that is not JSON
                return self.json({"error": str(exc)}, status=400)
            try:
                rows = await history.select(*query.sql())
            except HistoryError as exc:
                return self.json({"error": str(exc)}, status=503)
            results = [query.result(row) for row in rows[:MAX_ROWS]]
            return self.json({"results": results, "truncated": len(rows) > MAX_ROWS})

    @app.page("/query")
    class Query(View):
        async def post(self, request: Request) -> Response:
            if (denied := refused(self, request)) is not None:
                return denied
            sql = _sql_of(await request.text())
            try:
                rows = await guarded_query(history, sql)
            except QueryRejected as exc:
                return self.json({"error": str(exc)}, status=400)
            except HistoryError as exc:
                return self.json({"error": str(exc)}, status=400)
            return self.json({"rows": rows})


def _sql_of(body: str) -> str:
    stripped = body.strip()
    if stripped.startswith("{"):
        try:
            document: Any = json.loads(stripped)
        except json.JSONDecodeError:
            return stripped
        if isinstance(document, dict) and isinstance(document.get("sql"), str):
            return document["sql"]
    return stripped
