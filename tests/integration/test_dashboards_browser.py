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
    """The attributes of every element carrying a data-* attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict[str, Any]] = []
        self.body: dict[str, Any] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "body":
            self.body = found
        if any(k.startswith("data-") for k in found):
            self.elements.append({"tag": tag, **found})

    def panel(self, key: str) -> dict[str, Any]:
        return next(e for e in self.elements if e.get("data-panel") == key)

    def cells(self, column: str) -> list[str]:
        return [e["data-value"] for e in self.elements if e.get("data-column") == column]


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


def plotted_total(panel: dict[str, Any]) -> dict[str, float]:
    return {t["name"]: round(sum(y for y in t["y"] if y is not None), 6) for t in json.loads(panel["data-plotted"])}


def test_billing_page_shows_the_seeded_spend(served: str) -> None:
    dom = render(served, "billing")
    assert dom.panel("total_spend") and dom.cells("spend_usd")[0] == "0.0338"
    chart = dom.panel("spend_per_customer")
    assert chart["data-series"] == "3"  # plotly drew three lines
    assert plotted_total(chart) == {"acme": 0.0225, "beta": 0.0095, "cito": 0.0018}
    assert dom.cells("budget_used_pct")[:2] == ["0", "0.5"] or "0.5" in dom.cells("budget_used_pct")
    assert "0.06975" in dom.cells("forecast_usd")


def test_quotas_page_shows_refusals_and_utilisation(served: str) -> None:
    dom = render(served, "quotas")
    assert plotted_total(dom.panel("refusals_by_tier_reason")) == {"queued": 1, "quota_tokens": 1,
                                                                   "rate_limit_requests": 1}
    assert "62" in dom.cells("token_quota_pct")


def test_operations_page_shows_traffic(served: str) -> None:
    dom = render(served, "operations")
    assert dom.cells("events")[0] == "9" and dom.cells("upstream_errors")[0] == "1"
    assert plotted_total(dom.panel("upstream_errors")) == {"mock": 1}


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



