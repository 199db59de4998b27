"""``quotameter up`` keeps its parts running: a SIGKILLed part is restarted while
the others keep serving, one that keeps crashing is given up, Ctrl-C drains in
order. The stack is started as a user would, on free ports."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import openai
import pytest
import redis
import yaml

from gateway_shim.keystore import create_key
from quotameter.redis_keys import RedisKeys
from tests.integration.stack_helpers import RunningStack, alive, descendants, stack_config, start_stack


class Traffic:
    """Chat completions sent one after another from a thread, each outcome timed."""

    def __init__(self, base_url: str, key: str) -> None:
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=10)
        self.outcomes: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "hi"}])
                outcome = "200"
            except openai.APIStatusError as exc:
                outcome = str(exc.status_code)
            except openai.APIError as exc:
                outcome = type(exc).__name__
            self.outcomes.append((time.monotonic(), outcome))
            time.sleep(0.05)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def served(self) -> int:
        return sum(1 for _, outcome in self.outcomes if outcome == "200")

    def failures(self) -> list[tuple[float, str]]:
        return [(at, outcome) for at, outcome in self.outcomes if outcome != "200"]


def _pid(stack: RunningStack, name: str) -> int:
    """The pid the stack last reported ready for ``name``."""
    pid = None
    for line in stack.lines:
        match = re.search(rf"(?:^\s+{name}\s+ready in|quotameter: {name} ready again in) .*\(pid (\d+)\)", line)
        if match:
            pid = int(match.group(1))
    assert pid is not None, f"no ready line for {name}:\n{stack.output}"
    return pid


def _customer_key(config: dict, customer: str) -> str:
    client = redis.Redis.from_url(config["services"]["redis_url"])
    try:
        return create_key(client, RedisKeys(config["services"]["redis_prefix"]), customer, "enterprise").plaintext
    finally:
        client.close()


def _ledger_requests(config_path, customer: str) -> int:
    out = subprocess.run(
        [sys.executable, "-m", "quotameter", "usage", "--customer", customer, "--json", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60,
    )
    return int(json.loads(out.stdout)["ledger"]["requests"]) if out.returncode == 0 else -1


def _wait_ledger(config_path, customer: str, expected, timeout_s: float = 45.0) -> int:
    deadline = time.monotonic() + timeout_s
    count = -1
    while time.monotonic() < deadline:
        count = _ledger_requests(config_path, customer)
        if expected(count):
            return count
        time.sleep(1)
    raise AssertionError(f"the ledger holds {count} requests of {customer}")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    directory = tmp_path_factory.mktemp("supervised")
    config_path = stack_config(directory)
    stack = start_stack(config_path, directory / "var")
    try:
        base_url = stack.wait_for(r"quotameter ready on (http://\S+/v1)").group(1)
        stack.wait_for(r"Ctrl-C stops everything")
        yield stack, config_path, yaml.safe_load(config_path.read_text()), base_url
    finally:
        if stack.proc.poll() is None:
            children = descendants(stack.proc.pid)
            mark = stack.mark()
            stack.proc.send_signal(signal.SIGINT)
            assert stack.proc.wait(timeout=90) == 0, stack.output
            stack.wait_for("quotameter: stopped everything", since=mark)
            left = sorted(pid for pid in children if alive(pid))
            assert not left, f"orphans left behind: {left}\n{stack.output}"
            # Drained in order, each step said as it happens.
            steps = [re.match(r"^\s+stopping (\S+):", line) for line in stack.lines[mark:]]
            assert [step.group(1) for step in steps if step] == [
                "dashboard", "shim", "worker", "mock-llm", "broker", "redis"
            ], stack.output
            assert "stopping shim: finishing in-flight requests and delivering spooled events" in stack.output


def test_a_sigkilled_worker_is_restarted_while_the_shim_keeps_serving(running):
    stack, config_path, config, base_url = running
    key = _customer_key(config, "sup-worker")
    old = _pid(stack, "worker")
    mark = stack.mark()
    with Traffic(base_url, key) as traffic:
        time.sleep(1)
        os.kill(old, signal.SIGKILL)
        stack.wait_for(rf"worker \(pid {old}\) crashed: killed by SIGKILL.*restarting it in", 10, since=mark)
        new = int(stack.wait_for(r"restarted worker \(pid (\d+)", 10, since=mark).group(1))
        stack.wait_for(rf"worker ready again in \S+ \(pid {new}\)", 80, since=mark)
        time.sleep(1)
    assert new != old and alive(new) and not alive(old)
    assert traffic.served() > 20 and not traffic.failures(), traffic.failures()
    assert _http_ok(f"{config['services']['worker_url']}/healthz")
    # Nothing was lost or doubled while the worker was away.
    _wait_ledger(config_path, "sup-worker", lambda count: count == traffic.served())


def test_a_sigkilled_broker_is_restarted_and_the_worker_follows(running):
    stack, config_path, config, base_url = running
    key = _customer_key(config, "sup-broker")
    old, worker = _pid(stack, "broker"), _pid(stack, "worker")
    mark = stack.mark()
    with Traffic(base_url, key) as traffic:
        time.sleep(1)
        os.kill(old, signal.SIGKILL)
        stack.wait_for(rf"broker \(pid {old}\) crashed: killed by SIGKILL", 10, since=mark)
        # The embedded broker comes back empty: the worker is stopped meanwhile and started after it.
        stack.wait_for(rf"stopping worker \(pid {worker}\) until broker is ready again", 10, since=mark)
        new = int(stack.wait_for(r"broker ready again in \S+ \(pid (\d+)\)", 20, since=mark).group(1))
        next_worker = int(stack.wait_for(r"restarted worker \(pid (\d+)", 20, since=mark).group(1))
        stack.wait_for(rf"worker ready again in \S+ \(pid {next_worker}\)", 80, since=mark)
        time.sleep(1)
    assert new != old and alive(new) and not alive(worker) and alive(next_worker)
    assert traffic.served() > 20 and not traffic.failures(), traffic.failures()
    assert _http_ok(f"{config['services']['worker_url']}/healthz")
    # What the dead broker held and no worker had read comes again from the
    # shim's spool (after shim.redeliver_after_ms): nothing lost, nothing doubled.
    _wait_ledger(config_path, "sup-broker", lambda count: count == traffic.served(), timeout_s=75)


def test_a_sigkilled_shim_is_restarted_and_clients_fail_only_meanwhile(running):
    stack, config_path, config, base_url = running
    key = _customer_key(config, "sup-shim")
    old = _pid(stack, "shim")
    mark = stack.mark()
    with Traffic(base_url, key) as traffic:
        time.sleep(1)
        killed_at = time.monotonic()
        os.kill(old, signal.SIGKILL)
        stack.wait_for(rf"shim \(pid {old}\) crashed: killed by SIGKILL", 10, since=mark)
        new = int(stack.wait_for(r"shim ready again in \S+ \(pid (\d+)\)", 30, since=mark).group(1))
        ready_at = time.monotonic()
        time.sleep(2)
    assert new != old and alive(new)
    before = [outcome for at, outcome in traffic.outcomes if at < killed_at]
    after = [outcome for at, outcome in traffic.outcomes if at > ready_at]
    assert before and set(before) == {"200"}
    assert len(after) > 10 and set(after) == {"200"}, after
    assert all(killed_at <= at <= ready_at for at, _ in traffic.failures()), traffic.failures()
    # Answered requests were spooled before the kill: the restarted shim delivers them.
    _wait_ledger(config_path, "sup-shim",
                 lambda count: traffic.served() <= count <= traffic.served() + len(traffic.failures()))


def _block(port: int, within_s: float = 5.0) -> socket.socket:
    """Listen on ``port`` as soon as it is free, so whatever starts there next fails."""
    deadline = time.monotonic() + within_s
    while True:
        blocker = socket.socket()
        blocker.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past the killed part's TIME_WAITs
        try:
            blocker.bind(("127.0.0.1", port))
            blocker.listen()
            return blocker
        except OSError:
            blocker.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def test_a_part_that_keeps_crashing_is_given_up(tmp_path):
    config_path = stack_config(tmp_path)
    document = yaml.safe_load(config_path.read_text())
    document["supervisor"] = {"max_crashes": 3, "crash_window_s": 60, "restart_backoff_initial_s": 0.2}
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    stack = start_stack(config_path, tmp_path / "var")
    blockers: list[socket.socket] = []
    try:
        base_url = stack.wait_for(r"quotameter ready on (http://\S+/v1)").group(1)
        stack.wait_for(r"Ctrl-C stops everything")
        key = stack.demo_keys()["enterprise"]
        children = descendants(stack.proc.pid)

        # The dashboard is optional: given up, and the rest keeps serving.
        dashboard_port = int(document["services"]["dashboard_url"].rsplit(":", 1)[1])
        os.kill(_pid(stack, "dashboard"), signal.SIGKILL)
        blockers.append(_block(dashboard_port))
        report = stack.wait_for(r"giving up on dashboard: it crashed 3 times within 60s \(last: exit 1", 60)
        assert f"Its log: {tmp_path / 'var' / 'logs' / 'dashboard.log'}" in report.string
        stack.wait_for(r"address already in use")  # its last log lines say why
        stack.wait_for(r"the rest of the stack keeps running without dashboard")
        time.sleep(3)
        assert len(re.findall(r"restarted dashboard", stack.output)) == 2
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0)
        client.chat.completions.create(model="mock-small", messages=[{"role": "user", "content": "still here"}])

        # The shim is not: given up, the stack stops as a whole and says why.
        children |= descendants(stack.proc.pid)
        os.kill(_pid(stack, "shim"), signal.SIGKILL)
        blockers.append(_block(document["shim"]["port"]))
        stack.wait_for(r"giving up on shim: it crashed 3 times within 60s", 60)
        stack.wait_for(r"the stack cannot run without shim: stopping everything")
        assert stack.proc.wait(timeout=90) == 1
        stack.wait_for("quotameter: stopped everything")
        assert len(re.findall(r"restarted shim", stack.output)) == 2
        left = sorted(pid for pid in children | descendants(stack.proc.pid) if alive(pid))
        assert not left, f"orphans left behind: {left}\n{stack.output}"
    finally:
        for blocker in blockers:
            blocker.close()
        if stack.proc.poll() is None:
            stack.proc.send_signal(signal.SIGINT)
            stack.proc.wait(90)


def test_a_second_ctrl_c_kills_what_is_left(tmp_path):
    stack = start_stack(stack_config(tmp_path), tmp_path / "var")
    mock = None
    try:
        stack.wait_for(r"starting worker", 60)
        children = descendants(stack.proc.pid)
        mock = _pid(stack, "mock-llm")
        os.kill(mock, signal.SIGSTOP)  # a part that will not stop on SIGTERM
        stack.proc.send_signal(signal.SIGINT)
        stack.wait_for("quotameter: interrupted while starting", 10)
        stack.wait_for(r"stopping mock-llm: .*\(up to 10s\)", 30)
        stack.proc.send_signal(signal.SIGINT)
        stack.wait_for(r"quotameter: Ctrl-C again: killing mock-llm, broker, redis$", 5)
        assert stack.proc.wait(timeout=10) == 130
        stack.wait_for("quotameter: stopped everything")
        left = sorted(pid for pid in children if alive(pid))
        assert not left, f"orphans left behind: {left}\n{stack.output}"
    finally:
        if mock is not None and alive(mock):
            os.kill(mock, signal.SIGCONT)
        if stack.proc.poll() is None:
            stack.proc.send_signal(signal.SIGINT)
            stack.proc.wait(90)
