"""``quotameter up`` (what ``make run`` starts): the whole product on one machine.

Starts, in order, a real redis-server, the Tansu broker, the mock model (unless
an upstream is given), a pipeline worker, the shim and the built-in dashboard,
each as a child process in its own process group, logging under
``DATA_DIR/logs``. Prints one line
with ``quotameter ready`` when all of it answers, then a demo key per tier.
From then on it supervises them (supervisor.py): a part that crashes is
restarted with backoff while the others keep running; one that keeps crashing
is given up. Ctrl-C (or SIGTERM) drains them in reverse order: dashboard,
shim, worker, mock, broker, Redis; a second Ctrl-C kills what is left.
"""

from __future__ import annotations

import os
import signal
import sys
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config, load_config
from quotameter.embedded.broker import broker_process
from pipeline.retry import EXIT_UNAVAILABLE, RETRY_S
from quotameter.embedded.procs import ManagedProcess, port_open
from quotameter.embedded.redis_server import redis_process
from quotameter.embedded.restart_policy import RestartPolicy
from quotameter.embedded.supervisor import Part, Supervisor
from quotameter.errors import ServiceError
from quotameter.redis_keys import RedisKeys

WORKER_READY_TIMEOUT_S = 120.0
# Ctrl-C: how long each part may take after SIGTERM. The shim finishes its
# in-flight requests (up to 30 s, gateway_shim/server.py) and flushes its
# spool; the worker flushes the ledger and commits. The total is capped by
# supervisor.shutdown_timeout_s.
SHIM_STOP_S = 40.0
WORKER_STOP_S = 25.0
WORKER_EXITS = {EXIT_UNAVAILABLE: f"EX_TEMPFAIL: the ledger or the broker failed for {RETRY_S:.0f}s, nothing committed"}


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
        limits = self.config.supervisor
        self.supervisor = Supervisor(
            RestartPolicy(
                backoff_initial_s=limits.restart_backoff_initial_s,
                backoff_max_s=limits.restart_backoff_max_s,
                healthy_after_s=limits.healthy_after_s,
                max_crashes=limits.max_crashes,
                crash_window_s=limits.crash_window_s,
            ),
            _say,
        )

    def _check_free(self, what: str, host: str, port: int) -> None:
        if port_open(host, port):
            raise ServiceError(
                f"port {port} ({what}) is already in use: is another `quotameter up` running? "
                f"Stop it, or change the port in the config."
            )

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
        start = self.supervisor.start
        start(Part(redis_process(redis_port, self.data_dir / "redis", self.logs / "redis.log"),
                   lambda: port_open(redis_host, redis_port), f"redis on port {redis_port}",
                   stopping="saving its data"))
        start(Part(broker_process(kafka_port, self.logs / "broker.log"),
                   lambda: port_open(kafka_host, kafka_port), f"broker on port {kafka_port}"))
        if self.use_mock:
            start(Part(self._quotameter("mock-llm", "mock-llm", "--host", mock_host, "--port", str(mock_port)),
                       lambda: port_open(mock_host, mock_port), f"mock model on port {mock_port}"))
        start(Part(self._quotameter("worker", "worker"), lambda: _http_ok(f"{services.worker_url}/healthz"),
                   "worker joined to its group", WORKER_READY_TIMEOUT_S, stop_timeout_s=WORKER_STOP_S,
                   stopping="writing the ledger and committing its offsets", exit_meanings=WORKER_EXITS,
                   needs=("broker",)))
        start(Part(self._quotameter("shim", "proxy"), lambda: _http_ok(f"http://{shim.host}:{shim.port}/healthz"),
                   f"shim on port {shim.port}", stop_timeout_s=SHIM_STOP_S,
                   stopping="finishing in-flight requests and delivering spooled events"))
        start(Part(self._quotameter("dashboard", "dashboard"), lambda: _http_ok(f"{services.dashboard_url}/healthz"),
                   f"dashboard on port {dash_port}", stop_timeout_s=5.0, essential=False))

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

    def supervise(self, stop_requested) -> int:  # noqa: ANN001
        """Restart crashed parts until asked to stop (0) or an essential part is given up (1)."""
        return self.supervisor.run(stop_requested)

    def stop(self, escalated) -> None:  # noqa: ANN001
        self.supervisor.drain(self.config.supervisor.shutdown_timeout_s, escalated)


def run_stack(config_path: Path | None, data_dir: Path, upstream_url: str | None) -> int:
    signals = 0
    started = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal signals
        signals += 1
        if signals == 1 and not started:  # still starting: abandon the waits, then stop what is up
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(config_path, data_dir, upstream_url)
    try:
        stack.start()
        started = True
        stack.announce()
        return stack.supervise(lambda: signals > 0)
    except KeyboardInterrupt:
        _say("quotameter: interrupted while starting")
        return 130
    finally:
        started = True  # from here on a signal only counts, it never interrupts the drain
        stack.stop(lambda: signals > 1)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
