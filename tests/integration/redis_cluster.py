"""Real Redis topologies for the tests: a three-primary Redis Cluster and a
Sentinel in front of one master, each made of real server processes on free
loopback ports, stopped by PID; and a quotameter stack (mock model, shim,
worker, the embedded broker) on either.

The cluster is put together by hand, as ``redis-cli --cluster create`` would:
each node gets a third of the 16384 slots (CLUSTER ADDSLOTSRANGE), the nodes
meet (CLUSTER MEET), and the fixture waits until every node says
``cluster_state:ok``.
"""

from __future__ import annotations

import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from gateway_shim.keystore import create_key
from quotameter.config import Config, KeyOverrides
from quotameter.embedded.procs import ManagedProcess, free_port
from quotameter.embedded.redis_server import redis_server_binary
from tests.conftest import make_config, merge
from tests.integration.enforcement_helpers import Shim
from tests.integration.pipeline_helpers import WORKER_READY_TIMEOUT_S, health_status

SLOTS = 16384


@dataclass
class RedisCluster:
    ports: list[int]
    processes: list[ManagedProcess]

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports[:2])

    def node(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, decode_responses=True, socket_timeout=5)

    def primary_of(self, key: str) -> int:
        """The port of the primary that owns ``key``'s slot (asked of the cluster)."""
        client = self.node(self.ports[0])
        try:
            slot = client.execute_command("CLUSTER KEYSLOT", key)
            for start, end, owner, *_ in client.execute_command("CLUSTER SLOTS"):
                if start <= slot <= end:
                    return int(owner[1])
        finally:
            client.close()
        raise AssertionError(f"no primary owns the slot of {key!r}")

    def keys_per_node(self, pattern: str) -> dict[int, int]:
        counts = {}
        for port in self.ports:
            client = self.node(port)
            try:
                counts[port] = sum(1 for _ in client.scan_iter(match=pattern, count=1000))
            finally:
                client.close()
        return counts


def spread(cluster: RedisCluster, shim: Shim, stem: str) -> list[str]:
    """One customer per primary: names whose slot each primary owns."""
    found: dict[int, str] = {}
    for i in range(200):
        customer = f"{stem}{i}"
        found.setdefault(cluster.primary_of(shim.names.usage(customer, "x")), customer)
        if len(found) == len(cluster.ports):
            return list(found.values())
    raise AssertionError("no customer names found for every primary")


def _server(directory: Path, name: str, port: int, *extra: str) -> ManagedProcess:
    directory.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--dir", str(directory),
        "--daemonize", "no", "--save", "", "--appendonly", "no", *extra,
    ]
    return ManagedProcess(name, argv, directory / f"{name}.log").start()


def _wait(what: str, ready, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def start_cluster(directory: Path, primaries: int = 3) -> RedisCluster:
    ports = [free_port() for _ in range(primaries)]
    bus_ports = [free_port() for _ in range(primaries)]
    processes = []
    try:
        for port, bus_port in zip(ports, bus_ports, strict=True):
            processes.append(_server(
                directory / f"node-{port}", f"redis-cluster-{port}", port,
                "--cluster-enabled", "yes", "--cluster-config-file", str(directory / f"node-{port}" / "nodes.conf"),
                "--cluster-node-timeout", "5000",
                # The bus defaults to port + 10000, out of range for a high free port.
                "--cluster-port", str(bus_port),
            ))
        for proc, port in zip(processes, ports, strict=True):
            proc.wait_port("127.0.0.1", port, timeout_s=20)
        cluster = RedisCluster(ports, processes)
        share = SLOTS // primaries
        for i, port in enumerate(ports):
            client = cluster.node(port)
            last = SLOTS - 1 if i == primaries - 1 else (i + 1) * share - 1
            client.execute_command("CLUSTER ADDSLOTSRANGE", i * share, last)
            if i:
                client.execute_command("CLUSTER MEET", "127.0.0.1", ports[0], bus_ports[0])
            client.close()

        def ok() -> bool:
            for port in ports:
                client = cluster.node(port)
                try:
                    state = client.execute_command("CLUSTER INFO").get("cluster_state")  # parsed by redis-py
                    known = len(client.execute_command("CLUSTER NODES"))  # address -> node
                finally:
                    client.close()
                if state != "ok" or known != primaries:
                    return False
            return True

        _wait("cluster_state:ok on every node", ok)
        return cluster
    except BaseException:
        for proc in processes:
            proc.stop()
        raise


@dataclass
class RedisSentinel:
    master_port: int
    replica_port: int
    sentinel_port: int
    processes: list[ManagedProcess]
    master_name: str = "qm-master"

    @property
    def url(self) -> str:
        return f"redis+sentinel://127.0.0.1:{self.sentinel_port}/{self.master_name}/0"

    def sentinel(self) -> redis.Redis:
        return redis.Redis(port=self.sentinel_port, decode_responses=True, socket_timeout=5)

    def current_master_port(self) -> int:
        client = self.sentinel()
        try:
            return int(client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name)[1])
        finally:
            client.close()

    def fail_over(self) -> int:
        """Promote the replica (SENTINEL FAILOVER, no quorum needed); its port once done."""
        old = self.current_master_port()
        client = self.sentinel()
        try:
            client.execute_command("SENTINEL", "FAILOVER", self.master_name)
        finally:
            client.close()
        _wait("the sentinel to promote the replica", lambda: self.current_master_port() != old, timeout_s=30)
        return self.current_master_port()


def start_sentinel(directory: Path) -> RedisSentinel:
    """One master, one replica of it, one sentinel watching them (quorum 1)."""
    master_port, replica_port, sentinel_port = free_port(), free_port(), free_port()
    processes = [_server(directory / "master", "redis-master", master_port)]
    try:
        processes[0].wait_port("127.0.0.1", master_port, timeout_s=20)
        processes.append(_server(directory / "replica", "redis-replica", replica_port,
                                 "--replicaof", "127.0.0.1", str(master_port)))
        processes[1].wait_port("127.0.0.1", replica_port, timeout_s=20)
        conf = directory / "sentinel" / "sentinel.conf"
        conf.parent.mkdir(parents=True, exist_ok=True)
        # A sentinel rewrites its config file: it must be its own, writable.
        conf.write_text(
            f"sentinel monitor qm-master 127.0.0.1 {master_port} 1\n"
            "sentinel down-after-milliseconds qm-master 5000\n"
        )
        processes.append(ManagedProcess(
            "redis-sentinel",
            [redis_server_binary(), str(conf), "--sentinel", "--bind", "127.0.0.1", "--port", str(sentinel_port),
             "--dir", str(conf.parent), "--daemonize", "no"],
            conf.parent / "sentinel.log",
        ).start())
        processes[2].wait_port("127.0.0.1", sentinel_port, timeout_s=20)
        sentinel = redis.Redis(port=sentinel_port, decode_responses=True, socket_timeout=5)

        def replica_known() -> bool:  # learnt from the master's INFO, in sync
            replicas = sentinel.execute_command("SENTINEL", "REPLICAS", "qm-master")
            return any(str(r.get("port")) == str(replica_port) and "disconnected" not in str(r.get("flags"))
                       and str(r.get("master-link-status")) == "ok" for r in replicas)

        try:
            _wait("the sentinel to know the master and its replica", replica_known, timeout_s=30)
        finally:
            sentinel.close()
        return RedisSentinel(master_port, replica_port, sentinel_port, processes)
    except BaseException:
        for proc in reversed(processes):
            proc.stop()
        raise


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    cluster = start_cluster(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    for proc in cluster.processes:
        proc.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisSentinel]:
    sentinel = start_sentinel(tmp_path_factory.mktemp("redis-sentinel"))
    yield sentinel
    for proc in reversed(sentinel.processes):
        proc.stop()


@dataclass
class SharedClientShim(Shim):
    """A cluster client learns the slot map when it starts (~30 ms): the 100-client
    race creates 200 keys, so keys are created through one shared client."""

    shared: Any = None

    def new_key(self, customer: str, tier: str, priority: str = "interactive", **limits: Any) -> str:
        if self.shared is None:
            self.shared = self.redis()
        overrides = KeyOverrides(**limits) if limits else None
        return create_key(self.shared, self.names, customer, tier, priority=priority, limits=overrides).plaintext


@dataclass
class Stack:
    """A shim, a worker and the mock model on one Redis topology (module-scoped)."""

    shim: SharedClientShim
    worker: ManagedProcess
    processes: list[ManagedProcess]

    @property
    def config(self) -> Config:
        return self.shim.config

    def stop(self) -> None:
        if self.shim.shared is not None:
            self.shim.shared.close()
        for proc in reversed(self.processes):
            proc.stop()


def start_stack(
    directory: Path, redis_url: str, kafka_bootstrap: str, overrides: dict[str, Any], token_delay_ms: float = 0,
) -> Stack:
    """The real processes, as ``quotameter mock-llm``, ``proxy`` and ``worker`` run them."""
    unique = uuid.uuid4().hex[:10]
    mock_port = free_port()
    document = merge({"upstream": {"url": f"http://127.0.0.1:{mock_port}/v1"}}, overrides)
    config, path = make_config(directory, redis_url, kafka_bootstrap, unique, document)
    processes: list[ManagedProcess] = []

    def run(name: str, *args: str) -> ManagedProcess:
        proc = ManagedProcess(name, [sys.executable, "-m", "quotameter", *args], directory / f"{name}.log",
                              env={"QUOTAMETER_CONFIG": str(path)}).start()
        processes.append(proc)
        return proc

    try:
        mock = run("mock", "mock-llm", "--port", str(mock_port), "--token-delay-ms", str(token_delay_ms))
        worker = run("worker", "worker")
        shim = run("shim", "proxy")
        mock.wait_port("127.0.0.1", mock_port)
        shim.wait_port(config.shim.host, config.shim.port)
        worker.wait_until(lambda: health_status(config) == 200, WORKER_READY_TIMEOUT_S, "/healthz 200")
        return Stack(SharedClientShim(config, shim, path), worker, processes)
    except BaseException:
        for proc in reversed(processes):
            proc.stop()
        raise
