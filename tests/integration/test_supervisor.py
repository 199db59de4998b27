"""The supervisor of ``quotameter up`` on small real processes: restarts, giving
up, parts that need another, and a bounded, escalating drain."""

from __future__ import annotations

import re
import sys
import threading
import time

from quotameter.embedded.procs import ManagedProcess
from quotameter.embedded.restart_policy import RestartPolicy
from quotameter.embedded.supervisor import Part, Supervisor

FAST = RestartPolicy(backoff_initial_s=0.1, backoff_max_s=0.4, healthy_after_s=60.0, max_crashes=3, crash_window_s=30.0)
SLEEPS = "import time; time.sleep(120)"
IGNORES_SIGTERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"


def _part(tmp_path, name: str, code: str, **options) -> Part:
    proc = ManagedProcess(name, [sys.executable, "-c", code], tmp_path / f"{name}.log")
    return Part(proc, ready=lambda: True, what=f"{name} up", **options)


def _supervise(supervisor: Supervisor, until, timeout_s: float = 20.0) -> int | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = supervisor.tick()
        if code is not None or until():
            return code
        time.sleep(0.05)
    raise AssertionError("supervision never reached the expected state")


def test_a_part_exiting_75_is_restarted_until_it_is_given_up(tmp_path):
    said: list[str] = []
    supervisor = Supervisor(FAST, said.append)
    gives_up = "import sys, time; print('ledger unavailable', flush=True); time.sleep(0.3); sys.exit(75)"
    failing = _part(tmp_path, "worker", gives_up,
                    exit_meanings={75: "EX_TEMPFAIL: the ledger or the broker failed"})
    steady = _part(tmp_path, "shim", SLEEPS)
    supervisor.start(steady)
    supervisor.start(failing)
    try:
        code = _supervise(supervisor, lambda: False)
        assert code == 1  # the worker is essential: the stack stops
        text = "\n".join(said)
        pattern = r"worker \(pid \d+\) crashed: exit 75 \(EX_TEMPFAIL: the ledger or the broker failed"
        crashes = re.findall(pattern, text)
        assert len(crashes) == 2, text
        assert text.count("restarted worker") == 2
        assert f"giving up on worker: it crashed 3 times within 30s (last: exit 75" in text
        assert f"Its log: {tmp_path / 'worker.log'}" in text and "    | ledger unavailable" in text
        assert "the stack cannot run without worker" in text
        assert steady.proc.alive()  # never touched meanwhile
    finally:
        supervisor.drain(10, lambda: False)


def test_an_optional_part_given_up_leaves_the_rest_running(tmp_path):
    said: list[str] = []
    supervisor = Supervisor(FAST, said.append)
    dashboard = _part(tmp_path, "dashboard", "import sys, time; time.sleep(0.3); sys.exit(1)", essential=False)
    supervisor.start(_part(tmp_path, "shim", SLEEPS))
    supervisor.start(dashboard)
    try:
        assert _supervise(supervisor, lambda: any("giving up on dashboard" in line for line in said)) is None
        for _ in range(20):  # not restarted any more
            assert supervisor.tick() is None
            time.sleep(0.05)
        assert "\n".join(said).count("restarted dashboard") == 2
        assert any("keeps running without dashboard" in line for line in said)
    finally:
        supervisor.drain(10, lambda: False)


def test_a_part_is_stopped_while_what_it_needs_is_down(tmp_path):
    said: list[str] = []
    worker_alive_at_broker_restart: list[bool] = []

    def say(line: str) -> None:
        said.append(line)
        if "restarted broker" in line:
            worker_alive_at_broker_restart.append(worker.proc.alive())

    supervisor = Supervisor(FAST, say)
    broker = _part(tmp_path, "broker", SLEEPS)
    worker = _part(tmp_path, "worker", IGNORES_SIGTERM, needs=("broker",))
    supervisor.start(broker)
    supervisor.start(worker)
    old_worker = worker.proc.pid
    try:
        time.sleep(0.3)  # the worker installs its SIGTERM handler
        broker.proc.kill()
        _supervise(supervisor, lambda: any("worker ready again" in line for line in said))
        text = "\n".join(said)
        assert f"stopping worker (pid {old_worker}) until broker is ready again" in text
        # The broker came back only once the old worker was gone (SIGKILLed after its grace).
        assert worker_alive_at_broker_restart == [False]
        assert worker.proc.pid != old_worker and worker.proc.alive() and broker.proc.alive()
        assert "crashed" not in text.split("restarted broker")[1]  # the worker was held, not crashed
    finally:
        supervisor.drain(10, lambda: False)


def test_the_drain_is_bounded_and_a_second_interrupt_kills_what_is_left(tmp_path):
    said: list[str] = []
    supervisor = Supervisor(FAST, said.append)
    supervisor.start(_part(tmp_path, "redis", SLEEPS))
    supervisor.start(_part(tmp_path, "worker", IGNORES_SIGTERM, stop_timeout_s=60))
    supervisor.start(_part(tmp_path, "shim", IGNORES_SIGTERM, stop_timeout_s=0.5,
                           stopping="finishing in-flight requests and delivering spooled events"))
    time.sleep(0.3)
    escalate = threading.Event()
    threading.Timer(1.5, escalate.set).start()
    began = time.monotonic()
    supervisor.drain(60, escalate.is_set)
    took = time.monotonic() - began
    text = "\n".join(said)
    assert 1.4 < took < 5, text
    assert "stopping shim: finishing in-flight requests and delivering spooled events" in text
    assert "shim did not stop within 0.5s: killed" in text
    assert "stopping worker" in text and "Ctrl-C again: killing worker, redis" in text
    assert not any(w.part.proc.alive() for w in supervisor.watches)


def test_the_whole_drain_fits_its_total_bound(tmp_path):
    said: list[str] = []
    supervisor = Supervisor(FAST, said.append)
    for name in ("broker", "worker", "shim"):
        supervisor.start(_part(tmp_path, name, IGNORES_SIGTERM, stop_timeout_s=30))
    time.sleep(0.3)
    began = time.monotonic()
    supervisor.drain(2, lambda: False)
    assert time.monotonic() - began < 4
    assert not any(w.part.proc.alive() for w in supervisor.watches)
    assert re.search(r"broker did not stop within 0\.\ds: killed", "\n".join(said))
