"""``make run``'s entry point, end to end: what a new user does on day one."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request

import openai
import pytest

from tests.integration.stack_helpers import alive, descendants, stack_config, start_stack


def _usage(config_path, customer: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "quotameter", "usage", "--customer", customer, "--json", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=True,
    )
    return json.loads(out.stdout)


def _wait_usage(config_path, customer: str, predicate, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    report = {}
    while time.monotonic() < deadline:
        report = _usage(config_path, customer)
        if predicate(report):
            return report
        time.sleep(0.5)
    raise AssertionError(f"usage never matched; last report: {report}")


def _stop(stack) -> None:
    children = descendants(stack.proc.pid)
    assert children, "the stack started no child process"
    stack.proc.send_signal(signal.SIGINT)
    assert stack.proc.wait(timeout=90) == 0, stack.output
    stack.wait_for("quotameter: stopped")
    left = sorted(pid for pid in children if alive(pid))
    assert not left, f"orphans left behind: {left}\n{stack.output}"


def test_make_run_meters_a_request_stops_cleanly_and_keeps_history(tmp_path):
    config_path = stack_config(tmp_path)
    data_dir = tmp_path / "var"

    stack = start_stack(config_path, data_dir)
    try:
        ready = stack.wait_for(r"quotameter ready on (http://\S+/v1)")
        stack.wait_for(r"Ctrl-C stops everything")
        base_url = ready.group(1)
        keys = stack.demo_keys()
        assert set(keys) == {"free", "pro", "enterprise"}
        assert "curl -s " + base_url in stack.output

        client = openai.OpenAI(base_url=base_url, api_key=keys["pro"], max_retries=0)
        reply = client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "Hello there"}])
        first = _wait_usage(config_path, "demo-pro", lambda r: r["ledger"]["requests"] == "1" and r["in_sync"])
        dashboard = stack.wait_for(r"^dashboards: (http://\S+/dashboard)").group(1)
        with urllib.request.urlopen(dashboard + "/billing", timeout=30) as page:
            assert page.status == 200 and b"plotly.min.js" in page.read()
        # The same page's data, read through the worker's guarded /query: every panel answers, with the tokens served.
        with urllib.request.urlopen(dashboard.replace("/dashboard", "/api/dashboard") + "/billing", timeout=30) as api:
            panels = {p["key"]: p for p in json.loads(api.read())["panels"]}
        assert {k: p["error"] for k, p in panels.items() if p["error"]} == {}
        (top,) = [r for r in panels["top_customers"]["rows"] if r["customer"] == "demo-pro"]
        assert (top["input_tokens"], top["output_tokens"]) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
        # 3 + "user" 1 + "Hello there" 2 + 3 prompt tokens (o200k_base); the mock's default 16 out.
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (9, 16)
        assert (first["ledger"]["input_tokens"], first["ledger"]["output_tokens"]) == ("9", "16")
    finally:
        if stack.proc.poll() is None:
            _stop(stack)

    # A second run finds the earlier history and adds to it.
    again = start_stack(config_path, data_dir)
    try:
        again.wait_for(r"quotameter ready on ")
        again.wait_for(r"Ctrl-C stops everything")
        client = openai.OpenAI(base_url=base_url, api_key=again.demo_keys()["pro"], max_retries=0)
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "Hello again"}])
        second = _wait_usage(config_path, "demo-pro", lambda r: r["ledger"]["requests"] == "2" and r["in_sync"])
        assert (second["ledger"]["input_tokens"], second["ledger"]["output_tokens"]) == ("18", "32")
    finally:
        if again.proc.poll() is None:
            _stop(again)


def test_a_busy_port_is_a_clear_error(tmp_path):
    import socket

    config_path = stack_config(tmp_path)
    import yaml

    shim_port = yaml.safe_load(config_path.read_text())["shim"]["port"]
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", shim_port))
        blocker.listen()
        stack = start_stack(config_path, tmp_path / "var")
        assert stack.proc.wait(timeout=30) != 0
        stack.wait_for(f"port {shim_port} \\(shim\\) is already in use")
        assert not descendants(stack.proc.pid)


