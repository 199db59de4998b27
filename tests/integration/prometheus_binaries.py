"""Debian's Prometheus 2.42 and promtool (the Makefile's DEBIAN_PACKAGES), and
a Prometheus started for one test: on 127.0.0.1, a free port, a temporary
data directory; never the system service."""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from quotameter.embedded.procs import ManagedProcess, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is not installed: `make test` installs Debian's prometheus package"
    return path


def scrape_config(directory: Path, targets: dict[str, str], scrape_interval: str = "1s") -> Path:
    """deploy/prometheus/prometheus.yml with these ``job -> host:port`` targets and its rules by absolute path."""
    document = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    document["global"] = {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval}
    document["rule_files"] = [str(DEPLOY / name) for name in document["rule_files"]]
    jobs = {job["job_name"]: job for job in document["scrape_configs"]}
    assert set(targets) <= set(jobs), f"prometheus.yml has no job for {set(targets) - set(jobs)}"
    for name, target in targets.items():
        jobs[name]["static_configs"] = [{"targets": [target]}]
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


class Prometheus:
    def __init__(self, config: Path, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = ManagedProcess("prometheus", [
            binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}", "--storage.tsdb.retention.time=1h",
            "--log.level=warn",
        ], directory / "prometheus.log")

    def start(self) -> Prometheus:
        self.proc.start()
        # The API answers 503 (plain text) until the TSDB is open: wait for /-/ready.
        self.proc.wait_until(self._ready, 30, "/-/ready")
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.stop()

    def api(self, path: str, **params: str) -> Any:
        """One HTTP API call; its ``data`` (an error status fails with Prometheus's message)."""
        url = f"{self.url}/api/v1/{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read().decode(errors="replace")
            assert text.startswith("{"), f"{path} {params}: Prometheus answered {exc.code}: {text[:300]}"
            body = json.loads(text)
        assert body["status"] == "success", f"{path} {params}: {body.get('errorType')}: {body.get('error')}"
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return self.api("query", query=expr)["result"]

    def wait_scraped(self, jobs: set[str], timeout_s: float = 20.0) -> None:
        """Until every job has been scraped successfully (up == 1)."""
        deadline = time.monotonic() + timeout_s
        while True:
            up = {r["metric"]["job"]: r["value"][1] for r in self.query("up")}
            if all(up.get(job) == "1" for job in jobs):
                return
            assert time.monotonic() < deadline, f"Prometheus did not scrape {jobs} in {timeout_s} s: up = {up}"
            time.sleep(0.5)
