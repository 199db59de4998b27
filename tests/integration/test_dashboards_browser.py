"""The built-in dashboard, served by `quotameter dashboard` over a seeded chDB
directory (no worker running: it opens the directory read-only), rendered in
headless Chromium; the charts must carry the seeded numbers."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import yaml

from quotameter.config import DEFAULT_CONFIG
from quotameter.embedded.procs import free_port
from tests.conftest import ARTIFACTS
from tests.integration.dashboard_seed import CONFIG_OVERRIDES, seed

RANGE = "from=2025-03-01T00:00:00Z&to=2025-03-11T00:00:00Z"
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
    """What the browser drew, per panel: its data-* attributes, its stat values,
    its table rows, and the points plotly drew in the SVG for each trace."""

    def __init__(self) -> None:
        super().__init__()
        self.body: dict[str, Any] = {}
        self.panels: dict[str, dict[str, Any]] = {}
        self._panel: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        if "data-panel" in found:  # panels are siblings: what follows is this one's
            self._panel = {**found, "stats": {}, "rows": [], "drawn": []}
            self.panels[found["data-panel"]] = self._panel
            return
        panel = self._panel
        if panel is None:
            return
        if tag == "tr":
            panel["rows"].append({})
        elif "data-column" in found:
            target = panel["rows"][-1] if tag == "td" else panel["stats"]
            target[found["data-column"]] = found["data-value"]
        classes = (found.get("class") or "").split()
        if tag == "g" and "trace" in classes:
            panel["drawn"].append(0)
        elif "point" in classes and panel["drawn"]:
            panel["drawn"][-1] += 1

    def stats(self, key: str) -> dict[str, str]:
        return self.panels[key]["stats"]

    def rows(self, key: str) -> list[dict[str, str]]:
        return [row for row in self.panels[key]["rows"] if row]  # the header row has no cells

    def chart(self, key: str) -> tuple[dict[str, list[tuple[str, float | None]]], str, list[int]]:
        """(trace name -> its (x, y) points as handed to plotly, the series
        plotly reports, the points it drew per trace)."""
        panel = self.panels[key]
        plotted = {t["name"]: list(zip(t["x"], t["y"])) for t in json.loads(panel["data-plotted"])}
        return plotted, panel["data-series"], panel["drawn"]


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


def render(base: str, name: str) -> Dom:
    url = f"{base}/dashboard/{name}?{RANGE}"
    with urllib.request.urlopen(url, timeout=60) as response:  # the server answers before the browser looks
        assert response.status == 200
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browse(url, f"--screenshot={ARTIFACTS / f'dashboard-{name}.png'}", "--window-size=1400,2000")
    dom = Dom()
    dom.feed(browse(url, "--dump-dom"))
    assert dom.body.get("data-ready") == "true", f"the page did not finish drawing: {dom.body}"
    assert (ARTIFACTS / f"dashboard-{name}.png").stat().st_size > 10_000
    return dom


def table(columns: str, *rows: tuple[object, ...]) -> list[dict[str, str]]:
    """Rows as the page writes them into data-value (JavaScript's String())."""
    return [dict(zip(columns.split(), map(str, row))) for row in rows]


def test_billing_page_shows_the_seeded_spend(served: str) -> None:
    dom = render(served, "billing")
    assert dom.stats("total_spend") == {"spend_usd": "0.0338"}
    assert dom.stats("total_requests") == {"requests": "6", "refused": "3"}
    assert dom.chart("spend_per_customer") == (
        {
            "acme": [("2025-03-02T10:00:00Z", 0.0075), ("2025-03-05T12:00:00Z", 0.015)],
            "beta": [("2025-03-03T09:00:00Z", 0.009), ("2025-03-04T09:00:00Z", 0), ("2025-03-06T08:00:00Z", 0.0005)],
            "cito": [("2025-03-07T15:00:00Z", 0.0018), ("2025-03-08T16:00:00Z", 0), ("2025-03-09T10:00:00Z", 0)],
        },
        "3",
        [2, 3, 3],
    )
    plotted, series, drawn = dom.chart("spend_per_model")
    assert {name: sum(y for _, y in points) for name, points in plotted.items()} == {
        "gpt-4o": 0.0225, "mock-small": 0.0095, "gpt-4o-mini": 0.0018}
    assert (series, drawn) == ("3", [2, 3, 3])
    assert dom.rows("mtd_vs_budget") == table(
        "customer current_tier mtd_spend_usd budget_usd budget_used_pct",
        ("acme", "pro", 0.0225, 500, 0), ("beta", "free", 0.0095, 1.9, 0.5), ("cito", "enterprise", 0.0018, 50000, 0),
    )
    # 10 of March's 31 days gone: x 3.1
    assert dom.rows("forecast") == table(
        "customer current_tier mtd_spend_usd forecast_usd budget_usd forecast_budget_pct",
        ("acme", "pro", 0.0225, 0.06975, 500, 0.01), ("beta", "free", 0.0095, 0.02945, 1.9, 1.55),
        ("cito", "enterprise", 0.0018, 0.00558, 50000, 0),
    )
    assert dom.rows("top_customers") == table(
        "customer current_tier requests refused input_tokens output_tokens spend_usd",
        ("acme", "pro", 2, 1, 3000, 1500, 0.0225), ("beta", "free", 2, 1, 51000, 11000, 0.0095),
        ("cito", "enterprise", 2, 1, 4000, 2000, 0.0018),
    )


def test_quotas_page_shows_refusals_and_utilisation(served: str) -> None:
    dom = render(served, "quotas")
    assert dom.rows("utilisation_per_customer") == table(
        "customer current_tier mtd_tokens token_quota token_quota_pct mtd_spend_usd budget_usd budget_used_pct",
        ("beta", "free", 62000, 100000, 62, 0.0095, 1.9, 0.5),
        ("acme", "pro", 4500, 50000000, 0.01, 0.0225, 500, 0),
        ("cito", "enterprise", 6000, 5000000000, 0, 0.0018, 50000, 0),
    )
    assert dom.chart("utilisation_per_tier") == (
        {
            "token_quota_pct": [("enterprise", 0), ("free", 62), ("pro", 0.01)],
            "budget_used_pct": [("enterprise", 0), ("free", 0.5), ("pro", 0)],
        },
        "2",
        [3, 3],
    )
    assert dom.chart("refusals_by_tier_reason") == (
        {"queued": [("enterprise", 1)], "quota_tokens": [("free", 1)], "rate_limit_requests": [("pro", 1)]},
        "3",
        [1, 1, 1],
    )
    assert dom.chart("fallbacks") == ({"mock-small": [("2025-03-06T08:00:00Z", 1)]}, "1", [1])


def test_operations_page_shows_traffic(served: str) -> None:
    dom = render(served, "operations")
    assert dom.stats("traffic") == {"events": "9", "refused": "3", "upstream_errors": "1"}
    assert dom.chart("upstream_errors") == ({"mock": [("2025-03-08T16:00:00Z", 1)]}, "1", [1])
    plotted, series, drawn = dom.chart("latency")
    # Refusals are left out: six hours with an answered request.
    assert [y for _, y in plotted["p50_ms"]] == [100, 300, 200, 300, 400, 50]
    assert (series, drawn) == ("3", [6, 6, 6])
    plotted, series, drawn = dom.chart("ttft")
    assert plotted["p50_ms"] == [("2025-03-02T10:00:00Z", 40), ("2025-03-05T12:00:00Z", 60), ("2025-03-07T15:00:00Z", 80)]
    assert (series, drawn) == ("2", [3, 3])


def test_plotly_is_served_from_the_installed_wheel(served: str) -> None:
    with urllib.request.urlopen(f"{served}/static/plotly.min.js", timeout=30) as response:
        body = response.read()
    import plotly

    assert body == (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()


def test_a_hostile_variable_is_quoted_not_run(served: str) -> None:
    url = f"{served}/api/dashboard/billing?{RANGE}&customer=x%27)%20OR%20(%271%27=%271"
    with urllib.request.urlopen(url, timeout=60) as response:
        data = json.loads(response.read())
    assert data["panels"][0]["rows"] == [{"spend_usd": 0}]



