"""The built-in dashboard, served by `quotameter dashboard` over a seeded chDB
directory (no worker running: it opens the directory read-only), rendered in
headless Chromium; the charts must carry the seeded numbers. Its Operations
page also shows a real shim's live figures, read from the shim's /metrics."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml

from quotameter.config import DEFAULT_CONFIG
from quotameter.embedded.procs import free_port
from tests.conftest import ARTIFACTS
from tests.integration.dashboard_seed import CONFIG_OVERRIDES, seed
from tests.integration.enforcement_helpers import MESSAGES, ShimFactory, shim_factory  # noqa: F401

RANGE = "from=2025-03-01T00:00:00Z&to=2025-03-11T00:00:00Z"
LIVE_SHIM_PORT = free_port()  # the shim whose /metrics the Operations page reads (started by one test)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars", "--virtual-time-budget=20000", "--run-all-compositor-stages-before-draw"]


def chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("Debian's chromium is needed for this test: apt-get install -y chromium")
    return path


def browse(url: str, *extra: str) -> str:
    with tempfile.TemporaryDirectory(prefix="qm-chromium-") as profile:
        done = subprocess.run(
            [chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *extra, url],
            capture_output=True, text=True, timeout=120, check=False,
        )
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


class Dom(HTMLParser):
    """What the browser drew, per panel: its data-* attributes, its stats and table
    cells (exact value, text shown, tooltip), its headers, its CSV link, and the
    points plotly drew in the SVG for each trace; and all the page's visible text."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, Any] = {}
        self.panels: dict[str, dict[str, Any]] = {}
        self.text: list[str] = []
        self._panel: dict[str, Any] | None = None
        self._into: tuple[dict[str, str], str] | None = None  # where the next text goes
        self._hidden = 0  # inside <script> or <style>

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag in ("script", "style"):
            self._hidden += 1
        if tag == "body":
            self.body = found
        if "data-panel" in found:  # panels are siblings: what follows is this one's
            self._panel = {**found, "stats": {}, "rows": [], "drawn": [], "headers": [], "csv": None}
            self.panels[found["data-panel"]] = self._panel
            return
        panel = self._panel
        if panel is None:
            return
        classes = (found.get("class") or "").split()
        if tag == "tr":
            panel["rows"].append({})
        elif tag == "th":
            panel["headers"].append({"text": ""})
            self._into = (panel["headers"][-1], "text")
        elif tag == "td":
            cell = {"value": found["data-value"], "text": "", "title": found.get("title") or ""}
            panel["rows"][-1][found["data-column"]] = cell
            self._into = (cell, "text")
        elif "stat" in classes:
            panel["stats"][found["data-column"]] = {"value": found["data-value"], "text": "", "title": "", "label": ""}
        elif tag == "div" and ("value" in classes or "label" in classes) and panel["stats"]:
            stat = list(panel["stats"].values())[-1]
            if "value" in classes:
                stat["title"] = found.get("title") or ""
            self._into = (stat, "text" if "value" in classes else "label")
        elif tag == "a" and "csv" in classes:
            panel["csv"] = found["href"]
        if tag == "g" and "trace" in classes:
            panel["drawn"].append(0)
        elif "point" in classes and panel["drawn"]:
            panel["drawn"][-1] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._hidden -= 1
        if tag in ("td", "th", "div"):
            self._into = None

    def handle_data(self, data: str) -> None:
        if self._hidden:
            return
        self.text.append(data)
        if self._into is not None:
            target, key = self._into
            target[key] += data

    @property
    def visible_text(self) -> str:
        return " ".join(self.text)

    def stats(self, key: str) -> dict[str, str]:
        return {column: stat["value"] for column, stat in self.panels[key]["stats"].items()}

    def stats_shown(self, key: str) -> dict[str, tuple[str, str, str]]:
        """column -> (label, text, tooltip)."""
        return {c: (s["label"], s["text"], s["title"]) for c, s in self.panels[key]["stats"].items()}

    def rows(self, key: str) -> list[dict[str, str]]:
        return [{c: cell["value"] for c, cell in row.items()} for row in self.panels[key]["rows"] if row]

    def shown(self, key: str) -> list[list[str]]:
        """The table as read: the header, then each row's text, a tooltip as "text [exact]"."""
        panel = self.panels[key]
        body = [[c["text"] + (f" [{c['title']}]" if c["title"] else "") for c in row.values()]
                for row in panel["rows"] if row]
        return [[h["text"] for h in panel["headers"]], *body]

    def chart(self, key: str) -> tuple[dict[str, list[tuple[str, float | None]]], str, list[int]]:
        """(trace name -> its (x, y) points as handed to plotly, the series
        plotly reports, the points it drew per trace)."""
        panel = self.panels[key]
        plotted = {t["name"]: list(zip(t["x"], t["y"])) for t in json.loads(panel["data-plotted"])}
        return plotted, panel["data-series"], panel["drawn"]

    def axis(self, key: str) -> dict[str, Any]:
        return json.loads(self.panels[key]["data-axis"])


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from quotameter.embedded.procs import ManagedProcess
    import sys

    tmp = tmp_path_factory.mktemp("dash-browser")
    seed(tmp / "history")
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document.update(CONFIG_OVERRIDES)
    document["services"] = {**document["services"], "history_dir": str(tmp / "history"),
                            "worker_url": f"http://127.0.0.1:{free_port()}"}  # nobody listens: read the directory
    document["shim"] = {**document["shim"], "port": LIVE_SHIM_PORT}
    config_path = tmp / "config.yaml"
    config_path.write_text(yaml.safe_dump(document))
    port = free_port()
    proc = ManagedProcess(
        "dashboard", [sys.executable, "-m", "quotameter", "dashboard", "--port", str(port), "-c", str(config_path)],
        tmp / "dashboard.log",
    ).start()
    try:
        proc.wait_port("127.0.0.1", port, timeout_s=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def render(base: str, name: str, query: str = RANGE, shot: str | None = None) -> Dom:
    url = f"{base}/dashboard/{name}?{query}"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    png = ARTIFACTS / f"dashboard-{shot or name}.png"
    dom = Dom()
    dom.feed(browse(url, f"--screenshot={png}", "--window-size=1400,2000", "--dump-dom"))  # one browser run: both
    assert dom.body.get("data-ready") == "true", f"the page did not finish drawing: {dom.body} {dom.visible_text[:500]}"
    assert png.stat().st_size > 10_000
    return dom


def fetch(url: str) -> tuple[str, bytes]:
    with urllib.request.urlopen(url, timeout=60) as response:
        assert response.status == 200
        return response.headers.get("Content-Type", ""), response.read()


def table(columns: str, *rows: tuple[object, ...]) -> list[dict[str, str]]:
    """Rows as the page writes them into data-value (JavaScript's String())."""
    return [dict(zip(columns.split(), map(str, row))) for row in rows]


# Column names a person must never read on the billing page (labels stand in for them).
RAW_NAMES = ("currencyUSD", "spend_usd", "mtd_spend_usd", "budget_usd", "budget_used_pct", "forecast_usd",
             "forecast_budget_pct", "current_tier", "input_tokens", "output_tokens", "customer_series")


def test_billing_page_reads_like_a_bill(served: str) -> None:
    dom = render(served, "billing")
    text = dom.visible_text
    assert [raw for raw in RAW_NAMES if raw in text] == []
    for label in ("Spend in range", "Requests served", "Requests refused", "Spend (USD)", "Customer", "Model",
                  "Spend this period", "Monthly budget", "Budget used", "API key", "End user", "Project", "Tag",
                  "Download CSV"):
        assert label in text, f"{label!r} is not on the page"
    assert dom.stats("total_spend") == {"spend_usd": "0.0338"}  # exact, from the ledger's Decimal
    assert dom.stats_shown("total_spend") == {"spend_usd": ("Spend", "$0.03", "$0.0338")}
    assert dom.stats_shown("total_requests") == {"requests": ("Requests served", "6", ""),
                                                 "refused": ("Requests refused", "3", "")}
    # Bars per customer and per model, on an axis from zero.
    assert dom.chart("spend_per_customer") == (
        {"Spend": [("acme", 0.0225), ("beta", 0.0095), ("cito", 0.0018)]}, "1", [3])
    assert dom.chart("spend_per_model") == (
        {"Spend": [("gpt-4o", 0.0225), ("mock-small", 0.0095), ("gpt-4o-mini", 0.0018)]}, "1", [3])
    for key, x_title in (("spend_per_customer", "Customer"), ("spend_per_model", "Model")):
        axis = dom.axis(key)
        assert (axis["x"], axis["y"], axis["range"][0]) == (x_title, "Spend (USD)", 0)
        assert 0.0225 < axis["range"][1] < 0.03
    # Over time: hourly points of three customers, lines (more than one interval).
    assert dom.chart("spend_over_time") == (
        {
            "acme": [("2025-03-02T10:00:00Z", 0.0075), ("2025-03-05T12:00:00Z", 0.015)],
            "beta": [("2025-03-03T09:00:00Z", 0.009), ("2025-03-04T09:00:00Z", 0), ("2025-03-06T08:00:00Z", 0.0005)],
            "cito": [("2025-03-07T15:00:00Z", 0.0018), ("2025-03-08T16:00:00Z", 0), ("2025-03-09T10:00:00Z", 0)],
        },
        "3",
        [2, 3, 3],
    )
    assert dom.axis("spend_over_time")["range"][0] == 0
    assert "data-drawn-as" not in dom.panels["spend_over_time"]
    # A share of the budget under 0.005 % reads "<0.01 %", its exact value in the tooltip; never 0.
    assert dom.rows("mtd_vs_budget") == table(
        "customer current_tier mtd_spend_usd budget_usd budget_used_pct",
        ("acme", "pro", "0.0225", "500", "0.0045"), ("beta", "free", "0.0095", "1.9", "0.5"),
        ("cito", "enterprise", "0.0018", "50000", "0.0000036"),
    )
    assert dom.shown("mtd_vs_budget") == [
        ["Customer", "Tier", "Spend this period", "Monthly budget", "Budget used"],
        ["acme", "pro", "$0.02 [$0.0225]", "$500.00", "<0.01 % [0.0045 %]"],
        ["beta", "free", "$0.01 [$0.0095]", "$1.90", "0.5 %"],
        ["cito", "enterprise", "<$0.01 [$0.0018]", "$50,000.00", "<0.01 % [0.0000036 %]"],
    ]
    # 10 of March's 31 days gone: x 3.1
    assert dom.shown("forecast") == [
        ["Customer", "Tier", "Spend this period", "Forecast for the period", "Monthly budget", "Forecast against budget"],
        ["acme", "pro", "$0.02 [$0.0225]", "$0.07 [$0.06975]", "$500.00", "0.01 % [0.01395 %]"],
        ["beta", "free", "$0.01 [$0.0095]", "$0.03 [$0.02945]", "$1.90", "1.55 %"],
        ["cito", "enterprise", "<$0.01 [$0.0018]", "$0.01 [$0.00558]", "$50,000.00", "<0.01 % [0.00001116 %]"],
    ]
    assert dom.shown("top_customers") == [
        ["Customer", "Tier", "Requests served", "Requests refused", "Input tokens", "Output tokens", "Spend"],
        ["acme", "pro", "2", "1", "3,000", "1,500", "$0.02 [$0.0225]"],
        ["beta", "free", "2", "1", "51,000", "11,000", "$0.01 [$0.0095]"],
        ["cito", "enterprise", "2", "1", "4,000", "2,000", "<$0.01 [$0.0018]"],
    ]
    assert dom.panels["top_customers"]["csv"] == f"/dashboard/billing/top_customers.csv?{RANGE}"


APRIL = "from=2025-04-01T00:00:00Z&to=2025-04-11T00:00:00Z"


def test_a_sub_cent_customer_through_one_api_key(served: str) -> None:
    # delta spent $0.0000216 of its $0.10 budget: 0.0216 %. Its one request is one interval.
    dom = render(served, "billing", f"{APRIL}&api_key=key-delta", shot="billing-one-key")
    assert dom.stats_shown("total_spend") == {"spend_usd": ("Spend", "<$0.01", "$0.0000216")}
    assert dom.shown("mtd_vs_budget") == [
        ["Customer", "Tier", "Spend this period", "Monthly budget", "Budget used"],
        ["delta", "pro", "<$0.01 [$0.0000216]", "$0.10", "0.02 % [0.0216 %]"],
    ]
    # One interval is no time series: drawn as a bar, from zero.
    assert dom.panels["spend_over_time"]["data-drawn-as"] == "bar"
    assert dom.chart("spend_over_time") == ({"delta": [("delta", 0.0000216)]}, "1", [1])
    axis = dom.axis("spend_over_time")
    assert axis["range"][0] == 0 and 0.0000216 < axis["range"][1] < 0.00003
    assert dom.panels["mtd_vs_budget"]["csv"] == f"/dashboard/billing/mtd_vs_budget.csv?{APRIL}&api_key=key-delta"


def test_csv_download_is_exact_and_never_a_formula(served: str) -> None:
    content_type, body = fetch(f"{served}/dashboard/billing/mtd_vs_budget.csv?{APRIL}")
    assert content_type == "text/csv; charset=utf-8"
    # Most spent first; customer ids a spreadsheet would run are behind a quote; money to every
    # decimal the ledger keeps (98765432.123456789012 has more digits than a binary float holds).
    assert body.decode("utf-8") == (
        "\ufeffCustomer,Tier,Spend this period (USD),Monthly budget (USD),Budget used (%)\r\n"
        '"plain, with comma",enterprise,98765432.123456789012,50000,197530.864246913578\r\n'
        '"\'+cmd ""quoted"", x",free,2.5,1,250\r\n'
        '"\'=SUM(1,2)",free,1.005,1,100.5\r\n'
        '"\'@evil\nline",free,0.333333333333,1,33.3333333333\r\n'
        "delta,pro,0.0000216,0.1,0.0216\r\n"
        "'-2+3,free,0,1,0\r\n"
    )
    parsed = list(csv.reader(io.StringIO(body.decode("utf-8-sig"), newline="")))
    assert [row[0] for row in parsed[1:]] == [
        "plain, with comma", "'+cmd \"quoted\", x", "'=SUM(1,2)", "'@evil\nline", "delta", "'-2+3"]
    # The same query as the table: a filtered page's CSV holds the filtered rows.
    _, one = fetch(f"{served}/dashboard/billing/top_customers.csv?{APRIL}&api_key=key-delta")
    assert one.decode("utf-8-sig") == (
        "Customer,Tier,Requests served,Requests refused,Input tokens,Output tokens,Spend (USD)\r\n"
        "delta,pro,1,0,100,6,0.0000216\r\n")


def test_quotas_page_shows_refusals_and_utilisation(served: str) -> None:
    dom = render(served, "quotas")
    assert dom.rows("utilisation_per_customer") == table(
        "customer current_tier mtd_tokens token_quota token_quota_pct mtd_spend_usd budget_usd budget_used_pct",
        ("beta", "free", 62000, 100000, 62, 0.0095, 1.9, 0.5),
        ("acme", "pro", 4500, 50000000, 0.009, 0.0225, 500, 0.0045),
        ("cito", "enterprise", 6000, 5000000000, 0.00012, 0.0018, 50000, "0.0000036"),
    )
    assert dom.shown("utilisation_per_customer")[0] == [
        "Customer", "Tier", "Tokens this period", "Monthly token quota", "Token quota used", "Spend this period",
        "Monthly budget", "Budget used"]
    assert dom.chart("utilisation_per_tier") == (
        {
            "Token quota used": [("enterprise", 0.00012), ("free", 62), ("pro", 0.009)],
            "Budget used": [("enterprise", 0.0000036), ("free", 0.5), ("pro", 0.0045)],
        },
        "2",
        [3, 3],
    )
    assert dom.chart("refusals_by_tier_reason") == (
        {"queued": [("enterprise", 1)], "quota_tokens": [("free", 1)], "rate_limit_requests": [("pro", 1)]},
        "3",
        [1, 1, 1],
    )
    # One interval: drawn as a bar of its series.
    assert dom.chart("fallbacks") == ({"mock-small": [("mock-small", 1)]}, "1", [1])
    assert dom.panels["fallbacks"]["data-drawn-as"] == "bar"


def test_operations_page_shows_traffic(served: str) -> None:
    dom = render(served, "operations")
    assert dom.stats("traffic") == {"events": "9", "refused": "3", "upstream_errors": "1"}
    assert dom.chart("upstream_errors") == ({"mock": [("mock", 1)]}, "1", [1])
    plotted, series, drawn = dom.chart("latency")
    # Refusals are left out: six hours with an answered request.
    assert [y for _, y in plotted["Median"]] == [100, 300, 200, 300, 400, 50]
    assert (series, drawn) == ("3", [6, 6, 6])
    assert dom.axis("latency")["y"] == "Milliseconds"
    plotted, series, drawn = dom.chart("ttft")
    assert plotted["Median"] == [("2025-03-02T10:00:00Z", 40), ("2025-03-05T12:00:00Z", 60), ("2025-03-07T15:00:00Z", 80)]
    assert (series, drawn) == ("2", [3, 3])


async def test_operations_page_shows_the_service_now(served: str, shim_factory: ShimFactory) -> None:
    shim = await shim_factory({"tight": {"requests_per_minute": 1}}, shim={"port": LIVE_SHIM_PORT})
    client = shim.client(shim.new_key("live", "tight"))
    try:
        await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=4)
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="mock-small", messages=MESSAGES, max_tokens=4)
    finally:
        await client.close()
    dom = await asyncio.to_thread(render, served, "operations", RANGE, "operations-live")
    assert "The service now" in dom.visible_text
    assert dom.rows("live_refusals") == table("reason limit_kind refused", ("rate_limit_requests", "rpm", 2))
    assert dom.shown("live_refusals") == [["Reason", "Limit", "Requests refused"], ["rate_limit_requests", "rpm", "2"]]
    now = dom.stats_shown("live_shim")
    assert now["inflight"] == ("Requests in flight", "0", "")
    assert set(now) == {"inflight", "spool_depth", "spool_age_s"}
    assert dom.panels["live_fail_modes"]["data-rows"] == "0"  # Redis never went away
    # No worker runs here: its panel says where it looked, once.
    assert dom.panels["live_worker"].get("data-error") == "true"
    assert "did not answer" in dom.visible_text and "live_lag" not in dom.panels
    assert all(dom.panels[k]["csv"] is None for k in ("live_shim", "live_refusals"))  # live: nothing to download


def test_plotly_is_served_from_the_installed_wheel(served: str) -> None:
    with urllib.request.urlopen(f"{served}/static/plotly.min.js", timeout=30) as response:
        body = response.read()
    import plotly

    assert body == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def test_a_hostile_variable_is_quoted_not_run(served: str) -> None:
    url = f"{served}/api/dashboard/billing?{RANGE}&customer=x%27)%20OR%20(%271%27=%271"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = json.loads(response.read())
    assert data["panels"][0]["rows"] == [{"spend_usd": "0"}]
