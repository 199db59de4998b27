"""The whole product as the benchmarks run it: redis-server, the embedded broker,
the mock model (0 token delay), a worker (ledger and quota state) and the shim,
all real processes on loopback, stopped by PID by the caller.

Two tiers: ``limited`` has every limit kind (requests and tokens per minute,
concurrency, monthly tokens, a budget), each set far above what a bench sends,
so every request is estimated with its prompt counted, reserved, settled and
metered and none is refused; ``unlimited`` has none (the shim's cheapest path).
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import redis
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway_shim.keystore import create_key  # noqa: E402
from quotameter.config import DEFAULT_CONFIG, parse_config  # noqa: E402
from quotameter.embedded.broker import broker_process  # noqa: E402
from quotameter.embedded.procs import ManagedProcess, free_port  # noqa: E402
from quotameter.embedded.redis_server import redis_process  # noqa: E402
from quotameter.redis_keys import RedisKeys  # noqa: E402

LIMITED_TIER = {
    "requests_per_minute": 10_000_000,
    "tokens_per_minute": 10_000_000_000,
    "concurrent_requests": 100_000,
    "monthly_tokens": 10_000_000_000_000,
    "monthly_budget_usd": "10000000.00",
}
TIERS = {"limited": LIMITED_TIER, "unlimited": {}}
INGEST_TOKEN = "bench-ingest-token"


@dataclass
class Stack:
    work: Path
    procs: list[ManagedProcess] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # tier -> API key (customer "bench-<tier>")
    config_document: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return self.keys["limited"]

    @property
    def mock_port(self) -> int:
        return self.ports["mock"]

    @property
    def shim_port(self) -> int:
        return self.ports["shim"]

    @property
    def ext_proc_port(self) -> int | None:
        return self.ports.get("ext_proc")

    def start(self, proc: ManagedProcess, *ports: int, timeout_s: float = 30) -> ManagedProcess:
        self.procs.append(proc.start())
        for port in ports:
            proc.wait_port("127.0.0.1", port, timeout_s=timeout_s)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def ledger_usage(self, tier: str) -> dict[str, Any]:
        """The worker's exact ledger totals of a tier's customer this period."""
        config = parse_config(self.config_document)
        period = config.billing.calendar.current(datetime.now(UTC))
        url = f"http://127.0.0.1:{self.ports['worker']}/usage?customer=bench-{tier}&period={period}"
        with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 - loopback
            return json.loads(answer.read())

    def reserved_tokens(self, tier: str) -> int:
        """Tokens still held by unsettled reservations of a tier's customer."""
        config = parse_config(self.config_document)
        period = config.billing.calendar.current(datetime.now(UTC))
        names = RedisKeys(config.services.redis_prefix)
        client = redis.Redis(port=self.ports["redis"])
        try:
            return int(client.hget(names.reserved(f"bench-{tier}", period), "tokens") or 0)
        finally:
            client.close()

    def wait_metered(self, tier: str, requests: int, timeout_s: float = 60) -> dict[str, Any]:
        """The ledger's totals once it holds ``requests`` requests (or at the timeout)."""
        deadline = time.monotonic() + timeout_s
        usage = self.ledger_usage(tier)
        while usage["requests"] < requests and time.monotonic() < deadline:
            time.sleep(0.5)
            usage = self.ledger_usage(tier)
        return usage


def _python(*args: str) -> list[str]:
    return [sys.executable, *args]


def start_product(work: Path, with_ext_proc: bool = False) -> Stack:
    """Start everything; the caller stops it (``Stack.stop``), also on failure."""
    stack = Stack(work)
    try:
        _start(stack, with_ext_proc)
    except BaseException:
        stack.stop()
        raise
    return stack


def _start(stack: Stack, with_ext_proc: bool) -> None:
    work, ports = stack.work, stack.ports
    for name in ("redis", "broker", "mock", "shim", "worker") + (("ext_proc",) if with_ext_proc else ()):
        ports[name] = free_port()
    stack.start(redis_process(ports["redis"], work / "redis", work / "redis.log", persist=False), ports["redis"])
    stack.start(broker_process(ports["broker"], work / "broker.log"), ports["broker"])
    env = {"PYTHONPATH": str(ROOT)}
    stack.start(ManagedProcess("mock", _python("-m", "quotameter", "mock-llm", "--port", str(ports["mock"])),
                               work / "mock.log", env=env), ports["mock"])
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["tiers"].update({f"bench-{name}": tier for name, tier in TIERS.items()})
    document["upstream"] = {"url": f"http://127.0.0.1:{ports['mock']}/v1"}
    shim = {"port": ports["shim"], "spool_dir": str(work / "spool"), "ingest_token": INGEST_TOKEN}
    if with_ext_proc:
        shim["ext_proc_port"] = ports["ext_proc"]
    document["shim"] = {**document.get("shim", {}), **shim}
    document["services"] = {**document["services"], "redis_url": f"redis://127.0.0.1:{ports['redis']}/0",
                            "kafka_bootstrap": f"127.0.0.1:{ports['broker']}", "events_topic": "bench-events",
                            "history_dir": str(work / "history"), "worker_url": f"http://127.0.0.1:{ports['worker']}"}
    stack.config_document = document
    config_path = work / "config.yaml"
    config_path.write_text(yaml.safe_dump(document, sort_keys=False))
    config_env = {**env, "QUOTAMETER_CONFIG": str(config_path)}
    stack.start(ManagedProcess("worker", _python("-m", "quotameter", "worker"), work / "worker.log", env=config_env),
                ports["worker"], timeout_s=90)
    shim_ports = [ports["shim"]] + ([ports["ext_proc"]] if with_ext_proc else [])
    stack.start(ManagedProcess("shim", _python("-m", "quotameter", "proxy"), work / "shim.log", env=config_env),
                *shim_ports)
    client = redis.Redis(port=ports["redis"])
    names = RedisKeys(document["services"]["redis_prefix"])
    for tier in TIERS:
        stack.keys[tier] = create_key(client, names, f"bench-{tier}", f"bench-{tier}").plaintext
    client.close()
