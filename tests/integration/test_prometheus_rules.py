"""deploy/prometheus: promtool checks the scrape config and the alert rules,
and runs the rules' unit tests (deploy/prometheus/alerts_test.yml), where each
alert fires on failing synthetic series and stays silent on healthy ones.
Every PromQL expression of the shipped service-health dashboard parses in a
real Prometheus (2.42 has no parse endpoint: each is run by /api/v1/query)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from tests.integration.prometheus_binaries import DEPLOY, Prometheus, binary, scrape_config

DASHBOARD = DEPLOY.parent / "grafana" / "dashboards" / "quotameter-service-health.json"


def promtool(*args: str) -> str:
    done = subprocess.run([binary("promtool"), *args], capture_output=True, text=True, timeout=60, check=False,
                          cwd=DEPLOY)
    assert done.returncode == 0, f"promtool {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def alert_rules() -> list[dict]:
    groups = yaml.safe_load((DEPLOY / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def test_config_and_rules_are_valid() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    out = promtool("check", "rules", "alerts.yml")
    assert f"SUCCESS: {len(alert_rules())} rules found" in out


def test_every_alert_tells_the_operator_what_it_means() -> None:
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    for rule in alert_rules():
        assert rule.get("for"), f"{rule['alert']}: no `for:` (a single bad scrape would page)"
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) >= {"summary", "description"}, rule["alert"]
        assert len(rule["annotations"]["description"]) > 120, f"{rule['alert']}: say what it means and what to check"


def test_each_alert_fires_on_failure_and_not_on_health() -> None:
    tests = yaml.safe_load((DEPLOY / "alerts_test.yml").read_text())["tests"]
    fired, silent_when_healthy = set(), set()
    for group in tests:
        for case in group["alert_rule_test"]:
            if case["exp_alerts"]:
                fired.add(case["alertname"])
            elif group["name"] == "a healthy service raises nothing":
                silent_when_healthy.add(case["alertname"])
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names, f"alerts never seen firing in alerts_test.yml: {names - fired}"
    assert silent_when_healthy == names, f"alerts not checked against healthy series: {names - silent_when_healthy}"
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_the_dashboard_promql_parses(tmp_path: Path) -> None:
    document = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for panel in document["panels"] for t in panel["targets"]]
    assert len(exprs) >= len(document["panels"])
    prometheus = Prometheus(scrape_config(tmp_path, {}), tmp_path).start()
    try:
        for expr in exprs:
            # Grafana's macro, as it would expand it at a 15 s scrape interval
            prometheus.query(expr.replace("$__rate_interval", "1m"))
    finally:
        prometheus.stop()
