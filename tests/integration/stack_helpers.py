"""Start ``quotameter up`` as a user would, on free ports, and read what it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from quotameter.config import DEFAULT_CONFIG
from quotameter.embedded.procs import free_port


def stack_config(directory: Path) -> Path:
    """The example config with every port moved to a free one."""
    document = yaml.safe_load(DEFAULT_CONFIG.read_text())
    document["upstream"]["url"] = f"http://127.0.0.1:{free_port()}/v1"
    document["shim"]["port"] = free_port()
    services = document["services"]
    services["redis_url"] = f"redis://127.0.0.1:{free_port()}/0"
    services["kafka_bootstrap"] = f"127.0.0.1:{free_port()}"
    services["worker_url"] = f"http://127.0.0.1:{free_port()}"
    services["dashboard_url"] = f"http://127.0.0.1:{free_port()}"
    path = directory / "stack.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@dataclass
class RunningStack:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        with self.proc.stdout:  # closed at EOF, when the stack has exited
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))

    def wait_for(self, pattern: str, timeout_s: float = 180.0, since: int = 0) -> re.Match[str]:
        """The first line from index ``since`` on that matches (``mark()`` gives an index)."""
        deadline = time.monotonic() + timeout_s
        seen = since
        while time.monotonic() < deadline:
            while seen < len(self.lines):
                match = re.search(pattern, self.lines[seen])
                seen += 1
                if match:
                    return match
            if self.proc.poll() is not None and seen >= len(self.lines):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; output so far:\n" + "\n".join(self.lines))

    def mark(self) -> int:
        """Where the output ends now: ``wait_for(..., since=mark)`` ignores what came before."""
        return len(self.lines)

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def demo_keys(self) -> dict[str, str]:
        keys = {}
        for line in self.lines:
            match = re.match(r"^\s+(\w+)\s+customer (demo-\w+)\s+(qm_\S+)$", line)
            if match:
                keys[match.group(1)] = match.group(3)
        return keys


def start_stack(config_path: Path, data_dir: Path) -> RunningStack:
    env = {**os.environ, "QUOTAMETER_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
    env.pop("UPSTREAM_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quotameter", "up", "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    stack = RunningStack(proc)
    threading.Thread(target=stack._pump, daemon=True).start()
    return stack


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may hold spaces: the fields after its ')' are fixed.
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        for child, parent in parents.items():
            if parent == current and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return state[state.rindex(")") + 2] != "Z"
