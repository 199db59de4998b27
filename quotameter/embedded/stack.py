"""``quotameter up`` (what ``make run`` starts): the whole product on one machine.

Starts, in order, a real redis-server, the Tansu broker, the mock model (unless
an upstream is given), a pipeline worker, the shim and the built-in dashboard,
each as a child process in its own process group, logging under
``DATA_DIR/logs``. Prints one line
with ``quotameter ready`` when all of it answers, then a demo key per tier.
Ctrl-C (or SIGTERM) stops every child, newest first, and waits for each.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config, load_config
from quotameter.embedded.broker import broker_process
from quotameter.embedded.procs import ManagedProcess, port_open
from quotameter.embedded.redis_server import redis_process
from quotameter.errors import ServiceError
from quotameter.redis_keys import RedisKeys

WORKER_READY_TIMEOUT_S = 120.0


def _host_port(url: str, default_port: int) -> tuple[str, int]:
    parts = urlsplit(url if "://" in url else f"tcp://{url}")
    return parts.hostname or "127.0.0.1", parts.port or default_port


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _say(message: str) -> None:
    print(message, flush=True)


class Stack:
    def __init__(self, config_path: Path | None, data_dir: Path, upstream_url: str | None) -> None:
        self.data_dir = data_dir.resolve()
        self.logs = self.data_dir / "logs"
        # Children read the same file; the environment points their data here.
        self.env = {
            "QUOTAMETER_SERVICES__HISTORY_DIR": str(self.data_dir / "history"),
            "QUOTAMETER_SHIM__SPOOL_DIR": str(self.data_dir / "spool"),
            "PYTHONUNBUFFERED": "1",
        }
        if config_path is not None:
            self.env["QUOTAMETER_CONFIG"] = str(Path(config_path).resolve())
        if upstream_url:
            self.env["QUOTAMETER_UPSTREAM__URL"] = upstream_url
        os.environ.update(self.env)
        self.config: Config = load_config(config_path)
        self.use_mock = not upstream_url
        self.children: list[ManagedProcess] = []

    def _check_free(self, what: str, host: str, port: int) -> None:
        if port_open(host, port):
            raise ServiceError(
                f"port {port} ({what}) is already in use: is another `quotameter up` running? "
                f"Stop it, or change the port in the config."
            )

    def _start(self, proc: ManagedProcess, ready, what: str, timeout_s: float = 30.0) -> None:  # noqa: ANN001
        began = time.monotonic()
        _say(f"  starting {proc.name:<8} … (log: {proc.log_path})")
        self.children.append(proc.start())
        proc.wait_until(ready, timeout_s, what)
        _say(f"  {proc.name:<8} ready in {time.monotonic() - began:.1f}s (pid {proc.pid})")

    def _quotameter(self, name: str, *args: str) -> ManagedProcess:
        return ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], self.logs / f"{name}.log", env=self.env)

    def start(self) -> None:
        services, shim = self.config.services, self.config.shim
        redis_host, redis_port = _host_port(services.redis_url, 6379)
        kafka_host, kafka_port = _host_port(services.kafka_bootstrap, 9092)
        worker_host, worker_port = _host_port(services.worker_url, 6066)
        dash_host, dash_port = _host_port(services.dashboard_url, 8090)
        mock_host, mock_port = _host_port(self.config.upstream.url, 80)
        planned = [("redis", redis_host, redis_port), ("broker", kafka_host, kafka_port),
                   ("worker", worker_host, worker_port), ("shim", shim.host, shim.port),
                   ("dashboard", dash_host, dash_port)]
        if self.use_mock:
            planned.append(("mock-llm", mock_host, mock_port))
        for what, host, port in planned:
            self._check_free(what, host, port)

        _say(f"quotameter: starting the embedded stack in {self.data_dir}")
        self._start(redis_process(redis_port, self.data_dir / "redis", self.logs / "redis.log"),
                    lambda: port_open(redis_host, redis_port), f"redis on port {redis_port}")
        self._start(broker_process(kafka_port, self.logs / "broker.log"),
                    lambda: port_open(kafka_host, kafka_port), f"broker on port {kafka_port}")
        if self.use_mock:
            self._start(self._quotameter("mock-llm", "mock-llm", "--host", mock_host, "--port", str(mock_port)),
                        lambda: port_open(mock_host, mock_port), f"mock model on port {mock_port}")
        self._start(self._quotameter("worker", "worker"), lambda: _http_ok(f"{services.worker_url}/healthz"),
                    "worker joined to its group", WORKER_READY_TIMEOUT_S)
        self._start(self._quotameter("shim", "proxy"), lambda: _http_ok(f"http://{shim.host}:{shim.port}/healthz"),
                    f"shim on port {shim.port}")
        self._start(self._quotameter("dashboard", "dashboard"), lambda: port_open(dash_host, dash_port),
                    f"dashboard on port {dash_port}")

    def announce(self) -> None:
        shim = self.config.shim
        base = f"http://{shim.host}:{shim.port}/v1"
        upstream = "the built-in mock" if self.use_mock else self.config.upstream.url
        _say(f"quotameter ready on {base} (in front of {upstream})")
        client = redis.Redis.from_url(self.config.services.redis_url)
        names = RedisKeys(self.config.services.redis_prefix)
        _say("demo API keys (new for this run; shown once, stored hashed):")
        first_key = ""
        for tier in self.config.tiers:
            new = create_key(client, names, f"demo-{tier}", tier)
            first_key = first_key or new.plaintext
            _say(f"  {tier:<11} customer demo-{tier:<11} {new.plaintext}")
        client.close()
        model = next((p.model for p in self.config.prices), "mock-small")
        _say("try:")
        _say(
            f"  curl -s {base}/chat/completions -H 'Authorization: Bearer {first_key}' "
            f"-H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
        )
        _say(f"  quotameter usage --customer demo-{next(iter(self.config.tiers))}")
        _say(f"dashboards: {self.config.services.dashboard_url}/dashboard")
        _say("Ctrl-C stops everything.")

    def watch(self, stop_requested) -> int:  # noqa: ANN001
        """Block until asked to stop (0) or until a child dies (1)."""
        while not stop_requested():
            for proc in self.children:
                if not proc.alive():
                    _say(f"quotameter: {proc.name} exited unexpectedly; last log lines:\n{proc.log_tail()}")
                    return 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        for proc in reversed(self.children):
            code = proc.stop(timeout_s=20)
            _say(f"  stopped {proc.name} (exit {code})")
        self.children.clear()


def run_stack(config_path: Path | None, data_dir: Path, upstream_url: str | None) -> int:
    stopping = False
    started = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if not started:  # still starting: abandon the waits, then stop what is up
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config_path, data_dir, upstream_url)
    try:
        stack.start()
        started = True
        stack.announce()
        code = stack.watch(lambda: stopping)
        _say("quotameter: stopping…")
        return code
    except KeyboardInterrupt:
        _say("quotameter: interrupted while starting")
        return 130
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _say("quotameter: stopped")
