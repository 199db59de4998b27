"""Child processes that are started, awaited and stopped by PID, never by name."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from quotameter.errors import ServiceError


PORTS_ENV = "QUOTAMETER_PORTS"  # "LO-HI": the range free_port() takes its ports from
_next_port: int | None = None


def free_port() -> int:
    """A port nothing listens on now, for a service started a little later.

    By default the kernel's pick (bind to port 0), from the ephemeral range.
    With ``QUOTAMETER_PORTS=LO-HI``, the next free port of that range, never
    one this process handed out before, until the range wraps. Processes that
    each pick ports ahead of starting their services (the suite's parallel
    workers, each with its own range) then cannot pick the same one: from the
    kernel's shared range they can, in the time between the pick and the bind,
    and the loser's health check then reaches the winner's service.
    """
    span = os.environ.get(PORTS_ENV)
    if not span:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    try:
        low, high = (int(end) for end in span.split("-"))
    except ValueError:
        raise ServiceError(f"{PORTS_ENV}={span!r}: expected LO-HI, e.g. 20000-26999") from None
    if not 0 < low <= high < 65536:
        raise ServiceError(f"{PORTS_ENV}={span!r}: expected 0 < LO <= HI < 65536")
    global _next_port
    if _next_port is None or not low <= _next_port <= high:
        # A child given the same range (a bench script a test runs) starts elsewhere in it.
        _next_port = low + os.getpid() % (high - low + 1)
    for _ in range(high - low + 1):
        port, _next_port = _next_port, low if _next_port == high else _next_port + 1
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # taken: listened on, or still held by a closed connection
            return port
    raise ServiceError(f"{PORTS_ENV}={span}: no free port in the range")


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class ManagedProcess:
    """One child in its own process group, logging to a file.

    Its own group means a terminal's Ctrl-C reaches only the launcher, which
    then stops each child in order; stopping signals the whole group so a
    child's own children go too.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            raise ServiceError(f"{self.name}: cannot start {self.argv[0]}: {exc.strerror}") from None
        finally:
            log.close()
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc else None

    def log_tail(self, lines: int = 20) -> str:
        # Only the end of the file: a long-running child's log can be large.
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(log.seek(0, os.SEEK_END) - 64 * 1024, 0))
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def note(self, line: str) -> None:
        """Append a line of our own to the child's log (e.g. where a restart begins)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a") as log:
            log.write(f"{line}\n")

    def wait_until(self, ready: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise ServiceError(f"{self.name} exited before {what}; last log lines:\n{self.log_tail()}")
            if ready():
                return
            time.sleep(0.05)
        raise ServiceError(f"{self.name}: no {what} within {timeout_s:.0f}s; last log lines:\n{self.log_tail()}")

    def wait_port(self, host: str, port: int, timeout_s: float = 30.0) -> None:
        self.wait_until(lambda: port_open(host, port), timeout_s, f"listener on {host}:{port}")

    def send_signal(self, sig: int) -> None:
        if self.alive():
            assert self.proc is not None
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def stop(self, timeout_s: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Ask the group to stop, then kill it after ``timeout_s``. Returns the exit code."""
        if self.proc is None:
            return None
        self.send_signal(sig)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        self.reap_group()
        return self.proc.returncode

    def reap_group(self) -> None:
        """Kill what is left of the group once its leader is gone (a child's own children)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def kill(self) -> None:
        if self.proc is None:
            return
        self.send_signal(signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
