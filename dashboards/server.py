"""The built-in dashboard of the embedded stack: the same panels as the
Grafana JSON, queried through the worker (or the chDB directory) and drawn
in the browser with plotly.js, served from the installed ``plotly`` wheel
(never a CDN). The Operations page adds the service's live figures, read from
the shim's and the worker's /metrics at each view (``live_metrics``).

    GET /                              → /dashboard/billing
    GET /dashboard/{billing|quotas|operations}?from=now-7d&to=now&customer=a&customer=b&tier=…&model=…&api_key=…
    GET /api/dashboard/{name}?…        the same data as JSON (money and percentages as exact decimal text)
    GET /dashboard/{name}/{panel}.csv?…  one panel's rows as CSV, exact values (``csv_export``)
    GET /static/plotly.min.js
    GET /healthz

With ``services.admin_token`` set, everything but /healthz needs it: a
browser is asked for it by HTTP Basic auth (any user name, the token as the
password), a script may send it as a Bearer. Without one the dashboard serves
loopback only: ``serve`` refuses any other address.
"""

from __future__ import annotations

import asyncio
import html
import importlib.resources
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiohttp import web

from dashboards.catalog import DASHBOARDS, config_constants, dashboard
from dashboards.csv_export import panel_csv
from dashboards.display import display
from dashboards.live_metrics import live_panels
from dashboards.macros import ALL, MacroError, TimeRange, Variables, expand, parse_time
from dashboards.model import Dashboard, Panel
from dashboards.operations import OPERATIONS
from dashboards.query import QueryRunner, ledger_runner, run_panel
from quotameter.config import Config
from quotameter.errors import QuotameterError
from quotameter.service_auth import TokenGate, require_token_off_loopback

RunnerFactory = Callable[[], AbstractContextManager[QueryRunner]]
Clock = Callable[[], datetime]
PAGE = (Path(__file__).parent / "page.html").read_text()


def plotly_js_path() -> Path:
    """plotly.min.js as shipped inside the ``plotly`` wheel (package data)."""
    try:
        resource = importlib.resources.files("plotly") / "package_data" / "plotly.min.js"
    except ModuleNotFoundError:
        raise QuotameterError("the built-in dashboard needs plotly: pip install 'plotly>=5'") from None
    path = Path(str(resource))
    if not path.is_file():
        raise QuotameterError(f"plotly is installed without its bundled plotly.min.js (looked at {path})")
    return path


def _selection(query: Any, name: str) -> list[str] | str:
    values = [v for v in query.getall(name, []) if v != ""]
    return ALL if not values or "All" in values or ALL in values else values


class DashboardApp:
    def __init__(self, config: Config, runner_factory: RunnerFactory | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.constants = config_constants(config)
        self.runner_factory = runner_factory or (lambda: ledger_runner(config))
        self.clock = clock or (lambda: datetime.now(UTC))
        # One query thread: chDB and urllib block, and one page's queries share one runner.
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashboard-query")

    def _time_range(self, board: Dashboard, query: Any) -> TimeRange:
        now = self.clock()
        start = parse_time(query.get("from", board.time_from), now)
        end = parse_time(query.get("to", board.time_to), now)
        return TimeRange(start, end)

    def _variables(self, runner: QueryRunner, board: Dashboard, time_range: TimeRange,
                   query: Any) -> tuple[Variables, dict[str, list[str]]]:
        selected = {v.name: _selection(query, v.name) for v in board.variables}
        base = Variables(constants=self.constants)
        options: dict[str, list[str]] = {}
        for variable in board.variables:
            try:
                rows = runner.rows(expand(variable.sql, time_range, base))
                options[variable.name] = [str(next(iter(r.values()))) for r in rows]
            except QuotameterError:
                options[variable.name] = []
        return Variables(selected=selected, options=options, constants=self.constants), options

    def gather(self, board: Dashboard, query: Any) -> dict[str, Any]:
        """Run every panel of ``board`` for the request's range and variables (blocking)."""
        time_range = self._time_range(board, query)
        panels: list[dict[str, Any]] = []
        with self.runner_factory() as runner:
            variables, options = self._variables(runner, board, time_range, query)
            for panel in board.panels:
                entry: dict[str, Any] = {
                    "key": panel.key, "id": panel.id, "title": panel.title, "description": panel.description,
                    "viz": str(panel.viz), "unit": panel.unit, "x": panel.x, "series": panel.series,
                    "values": list(panel.values), "width": panel.width, "rows": [], "error": None,
                    "fields": [{"name": f.name, "label": f.label, "unit": str(f.unit)} for f in panel.fields],
                    "display": [],
                }
                try:
                    entry["rows"] = run_panel(runner, panel, time_range, variables)
                except QuotameterError as exc:
                    entry["error"] = str(exc)
                entry["display"] = [[display(row.get(f.name), f) for f in panel.fields] for row in entry["rows"]]
                panels.append(entry)
            source = getattr(runner, "source", "ledger")
        if board.uid == OPERATIONS.uid:
            panels += live_panels(self.config)
        return {
            "dashboard": {"uid": board.uid, "title": board.title, "description": board.description},
            "from": time_range.start.isoformat(), "to": time_range.end.isoformat(),
            "interval_s": time_range.effective_interval_s, "selected": dict(variables.selected),
            "options": options, "source": source, "panels": panels,
        }

    def panel_rows(self, board: Dashboard, panel: Panel, query: Any) -> list[dict[str, Any]]:
        """One panel's rows for the request's range and variables (blocking): what its CSV holds."""
        time_range = self._time_range(board, query)
        with self.runner_factory() as runner:
            variables, _ = self._variables(runner, board, time_range, query)
            return run_panel(runner, panel, time_range, variables)

    @staticmethod
    def _board(request: web.Request) -> Dashboard:
        try:
            return dashboard(request.match_info["name"])
        except KeyError:
            names = ", ".join(d.uid.removeprefix("quotameter-") for d in DASHBOARDS)
            raise web.HTTPNotFound(text=f"no dashboard {request.match_info['name']!r}; try one of: {names}") from None

    async def _run(self, work: Callable[..., Any], *args: Any) -> Any:
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)
        except MacroError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None
        except QuotameterError as exc:
            raise web.HTTPServiceUnavailable(text=str(exc)) from None

    async def _gather(self, request: web.Request) -> tuple[Dashboard, dict[str, Any]]:
        board = self._board(request)
        return board, await self._run(self.gather, board, request.query)

    async def csv(self, request: web.Request) -> web.Response:
        board = self._board(request)
        try:
            panel = board.panel(request.match_info["panel"])
        except KeyError:
            keys = ", ".join(p.key for p in board.panels)
            raise web.HTTPNotFound(text=f"no panel {request.match_info['panel']!r}; try one of: {keys}") from None
        rows = await self._run(self.panel_rows, board, panel, request.query)
        name = f"{board.uid.removeprefix('quotameter-')}-{panel.key}.csv"
        # A BOM, so a spreadsheet reads the file as UTF-8 (customer ids are any text).
        return web.Response(body=("\ufeff" + panel_csv(panel, rows)).encode(), headers={
            "Content-Type": "text/csv; charset=utf-8", "Content-Disposition": f'attachment; filename="{name}"'})

    async def page(self, request: web.Request) -> web.Response:
        board, data = await self._gather(request)
        return web.Response(text=render_page(board, data, request.query), content_type="text/html")

    async def api(self, request: web.Request) -> web.Response:
        _, data = await self._gather(request)
        return web.json_response(data)

    async def plotly(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(plotly_js_path(), headers={"Cache-Control": "public, max-age=86400",
                                                           "Content-Type": "application/javascript"})

    async def root(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/dashboard/billing")

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _options_html(name: str, options: list[str], selected: list[str] | str) -> str:
    chosen = set() if selected == ALL else set(selected)
    items = [f'<option value="All"{" selected" if selected == ALL else ""}>All</option>']
    items += [
        f'<option value="{html.escape(o)}"{" selected" if o in chosen else ""}>{html.escape(o)}</option>' for o in options
    ]
    return f'<select name="{name}" multiple>{"".join(items)}</select>'


def render_page(board: Dashboard, data: dict[str, Any], query: Any) -> str:
    nav = " ".join(
        f'<a href="/dashboard/{d.uid.removeprefix("quotameter-")}"{" class=current" if d.uid == board.uid else ""}>'
        f"{html.escape(d.title.split('·')[-1].strip())}</a>"
        for d in DASHBOARDS
    )
    fields = [
        f'<label>From<input name="from" value="{html.escape(query.get("from", board.time_from))}"></label>',
        f'<label>To<input name="to" value="{html.escape(query.get("to", board.time_to))}"></label>',
    ]
    for variable in board.variables:
        select = _options_html(variable.name, data["options"].get(variable.name, []), data["selected"][variable.name])
        fields.append(f"<label>{html.escape(variable.label)}{select}</label>")
    form = f'<form method="get">{"".join(fields)}<button type="submit">Apply</button></form>'
    meta = html.escape(
        f"{data['from']} → {data['to']} · interval {data['interval_s']} s · read from {data['source']}"
    )
    payload = json.dumps(data, default=str).replace("</", "<\\/")
    return (
        PAGE.replace("__TITLE__", html.escape(board.title))
        .replace("__NAV__", nav)
        .replace("__FORM__", form)
        .replace("__META__", meta)
        .replace("__DATA__", payload)
    )


def make_app(config: Config, runner_factory: RunnerFactory | None = None, clock: Clock | None = None) -> web.Application:
    plotly_js_path()  # fail at start, not on the first page, when plotly is missing
    handler = DashboardApp(config, runner_factory, clock)
    gate = TokenGate.from_services(config.services)

    @web.middleware
    async def admin_token(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
        if request.path == "/healthz" or gate.allows(request.headers):
            return await handler(request)
        return web.Response(status=401, text="this dashboard needs services.admin_token (as the password)\n",
                            headers={"WWW-Authenticate": 'Basic realm="quotameter dashboard", charset="UTF-8"'})

    app = web.Application(middlewares=[admin_token])
    app.add_routes([
        web.get("/", handler.root),
        web.get("/dashboard", handler.root),
        web.get("/dashboard/{name}", handler.page),
        web.get("/dashboard/{name}/{panel}.csv", handler.csv),
        web.get("/api/dashboard/{name}", handler.api),
        web.get("/static/plotly.min.js", handler.plotly),
        web.get("/healthz", handler.health),
    ])

    async def shutdown(_: web.Application) -> None:
        handler.close()

    app.on_cleanup.append(shutdown)
    return app


def serve(config: Config, host: str = "127.0.0.1", port: int = 8090) -> None:
    """Raises ConfigError, before listening, for a non-loopback ``host`` without a token."""
    require_token_off_loopback(host, TokenGate.from_services(config.services), "the dashboard")
    print(f"quotameter dashboard on http://{host}:{port}/dashboard (ledger via {config.services.worker_url}, "
          f"else {config.services.history_dir})", flush=True)
    web.run_app(make_app(config), host=host, port=port, print=None)
