"""Keeps the parts of ``quotameter up`` running, and drains them on Ctrl-C.

A part that exits without being asked to (any exit code, a signal, the
worker's exit 75) is restarted with the same arguments after a backoff
(restart_policy.py) and waits for its readiness check again, polled from the
same loop that watches the others, so no part waits on another's restart.
The rest keeps running meanwhile: the shim spools events while the broker or
the worker is away, and answers again as soon as Redis is back. A part that
``needs`` another (the worker needs the embedded broker, which comes back
empty) is stopped while that one is down and started again once it is ready,
so it never carries offsets and table state into a broker that lost them.

A part that keeps crashing is given up. Without an essential part the stack
stops as a whole and ``quotameter up`` exits 1: Redis, the broker and the
shim are the product itself; without the worker quota totals stop advancing
(enforcement weakens as reservations expire) and the spool only grows; without
the mock the shim answers 502 to everything. A stack that looks up but
does not meter is worse than a stopped one whose exit code its own supervisor
or operator sees; every event is kept (spool, ledger) for the next run. Only
the dashboard is optional: the rest keeps running without it.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from quotameter.embedded.procs import ManagedProcess
from quotameter.embedded.restart_policy import CrashHistory, RestartPolicy

TICK_S = 0.2
READY_POLL_S = 0.5
HOLD_STOP_S = 5.0  # a part whose dependency died gets this long after SIGTERM, then SIGKILL
TAIL_LINES = 12


@dataclass
class Part:
    proc: ManagedProcess
    ready: Callable[[], bool]
    what: str  # what its readiness check waits for, for messages
    ready_timeout_s: float = 30.0
    # Ctrl-C: SIGTERM, then this long to finish before it is killed, and what
    # it does meanwhile (said on the console).
    stop_timeout_s: float = 10.0
    stopping: str = "waiting for it to exit"
    essential: bool = True
    exit_meanings: dict[int, str] = field(default_factory=dict)
    needs: tuple[str, ...] = ()  # parts it cannot outlive (see the module docstring)

    @property
    def name(self) -> str:
        return self.proc.name


class State(Enum):
    STARTING = "starting"
    RUNNING = "running"
    WAITING = "waiting to restart"
    HELD = "stopped while a part it needs is down"
    GIVEN_UP = "given up"


@dataclass
class _Watch:
    part: Part
    history: CrashHistory
    state: State = State.RUNNING
    started_at: float = 0.0
    ready_at: float | None = None
    restart_at: float = 0.0
    next_poll: float = 0.0
    kill_at: float = 0.0
    restarts: int = 0


def describe_exit(returncode: int | None, meanings: dict[int, str]) -> str:
    if returncode is None:
        return "still running"
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    meaning = meanings.get(returncode)
    return f"exit {returncode} ({meaning})" if meaning else f"exit {returncode}"


def _seconds(value: float) -> str:
    return f"{value:.1f}s" if value < 10 else f"{value:.0f}s"


def _indented(tail: str) -> str:
    return "\n".join(f"    | {line}" for line in tail.splitlines()) or "    | (log is empty)"


class Supervisor:
    def __init__(
        self,
        policy: RestartPolicy,
        say: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy
        self.say = say
        self.clock = clock
        self.watches: list[_Watch] = []

    def _event(self, message: str) -> None:
        # Supervision happens long after start-up: its lines carry the time.
        self.say(f"{time.strftime('%H:%M:%S')} quotameter: {message}")

    # -- start-up: in order, each waiting for the previous to be ready --------

    def start(self, part: Part) -> None:
        began = self.clock()
        self.say(f"  starting {part.name:<8} … (log: {part.proc.log_path})")
        watch = _Watch(part, CrashHistory(self.policy))
        self.watches.append(watch)
        part.proc.start()
        part.proc.wait_until(part.ready, part.ready_timeout_s, part.what)
        watch.started_at = began
        watch.ready_at = self.clock()
        self.say(f"  {part.name:<8} ready in {watch.ready_at - began:.1f}s (pid {part.proc.pid})")

    # -- supervision ----------------------------------------------------------

    def run(self, stop_requested: Callable[[], bool]) -> int:
        """Supervise until asked to stop (0) or an essential part is given up (1)."""
        while not stop_requested():
            code = self.tick()
            if code is not None:
                return code
            time.sleep(TICK_S)
        return 0

    def tick(self) -> int | None:
        for watch in self.watches:
            now = self.clock()
            if watch.state in (State.RUNNING, State.STARTING) and not watch.part.proc.alive():
                if self._crashed(watch, now) and watch.part.essential:
                    self._event(f"the stack cannot run without {watch.part.name}: stopping everything")
                    return 1
            elif watch.state is State.STARTING:
                self._check_ready(watch, now)
            elif watch.state is State.WAITING and now >= watch.restart_at and self._ready_to_restart(watch):
                self._restart(watch, now)
            elif watch.state is State.HELD:
                self._release(watch, now)
        return None

    def _needs_met(self, watch: _Watch) -> bool:
        running = {w.part.name for w in self.watches if w.state is State.RUNNING}
        return all(name in running for name in watch.part.needs)

    def _ready_to_restart(self, watch: _Watch) -> bool:
        # Its own needs are up, and what needs it is gone: a worker still
        # running when the broker returns would write stale state into it.
        dependents_gone = not any(
            watch.part.name in w.part.needs and w.part.proc.alive() for w in self.watches
        )
        return dependents_gone and self._needs_met(watch)

    def _hold_dependents(self, name: str, now: float) -> None:
        for watch in self.watches:
            if name not in watch.part.needs or watch.state in (State.HELD, State.GIVEN_UP):
                continue
            watch.state = State.HELD
            watch.ready_at = None
            if watch.part.proc.alive():
                self._event(f"stopping {watch.part.name} (pid {watch.part.proc.pid}) until {name} is ready again")
                watch.part.proc.send_signal(signal.SIGTERM)
                watch.kill_at = now + HOLD_STOP_S

    def _release(self, watch: _Watch, now: float) -> None:
        proc = watch.part.proc
        if proc.alive():
            if now >= watch.kill_at:
                proc.send_signal(signal.SIGKILL)
            return
        proc.reap_group()
        if self._needs_met(watch):
            self._restart(watch, now)

    def _crashed(self, watch: _Watch, now: float) -> bool:
        """Record the crash and schedule the restart; True if the part is given up."""
        part, proc = watch.part, watch.part.proc
        how = describe_exit(proc.returncode, part.exit_meanings)
        proc.reap_group()
        healthy_for_s = now - watch.ready_at if watch.ready_at is not None else 0.0
        up = f"ready for {healthy_for_s:.1f}s" if watch.ready_at is not None else "before it was ready"
        wait_s = watch.history.crashed(now, healthy_for_s)
        tail = _indented(proc.log_tail(TAIL_LINES))
        watch.ready_at = None
        if wait_s is None:
            watch.state = State.GIVEN_UP
            self._event(
                f"giving up on {part.name}: it crashed {watch.history.recent(now)} times within "
                f"{self.policy.crash_window_s:.0f}s (last: {how}, {up}); not restarting it. "
                f"Its log: {proc.log_path}; last lines:\n{tail}"
            )
            if not part.essential:
                self._event(f"the rest of the stack keeps running without {part.name}")
            self._hold_dependents(part.name, now)
            return True
        watch.state = State.WAITING
        watch.restart_at = now + wait_s
        self._event(
            f"{part.name} (pid {proc.pid}) crashed: {how}, {up}; restarting it in {wait_s:.1f}s "
            f"(crash {watch.history.recent(now)} of {self.policy.max_crashes} allowed within "
            f"{self.policy.crash_window_s:.0f}s). Last lines of {proc.log_path}:\n{tail}"
        )
        self._hold_dependents(part.name, now)
        return False

    def _restart(self, watch: _Watch, now: float) -> None:
        part = watch.part
        watch.restarts += 1
        part.proc.note(f"--- quotameter up: restart {watch.restarts} of {part.name} ---")
        part.proc.start()
        watch.state = State.STARTING
        watch.started_at = now
        watch.next_poll = now
        self._event(
            f"restarted {part.name} (pid {part.proc.pid}, restart {watch.restarts}); waiting for its readiness check "
            f"({part.what})"
        )

    def _check_ready(self, watch: _Watch, now: float) -> None:
        part = watch.part
        if now - watch.started_at > part.ready_timeout_s:
            self._event(f"{part.name}: no {part.what} within {part.ready_timeout_s:.0f}s of its restart: killing it")
            part.proc.kill()  # the next tick counts it as a crash
            return
        if now < watch.next_poll:
            return
        watch.next_poll = now + READY_POLL_S
        if part.ready():
            watch.state = State.RUNNING
            watch.ready_at = self.clock()
            self._event(f"{part.name} ready again in {watch.ready_at - watch.started_at:.1f}s (pid {part.proc.pid})")

    # -- Ctrl-C -----------------------------------------------------------------

    def drain(self, total_s: float, escalated: Callable[[], bool]) -> None:
        """Stop every part in reverse start order, each within its own bound and
        all within ``total_s``; once ``escalated()``, kill what is left."""
        began = self.clock()
        deadline = began + total_s
        self.say(f"quotameter: stopping (at most {total_s:.0f}s; Ctrl-C again kills what is left)")
        for watch in reversed(self.watches):
            part, proc = watch.part, watch.part.proc
            if escalated():
                break
            if not proc.alive():
                proc.reap_group()
                self.say(f"  {part.name} was not running ({watch.state.value})")
                continue
            bound_s = max(min(part.stop_timeout_s, deadline - self.clock()), 0.0)
            step = self.clock()
            self.say(f"  stopping {part.name}: {part.stopping}… (up to {_seconds(bound_s)})")
            proc.send_signal(signal.SIGTERM)
            while proc.alive() and self.clock() - step < bound_s and not escalated():
                time.sleep(0.05)
            if proc.alive() and escalated():
                break
            if proc.alive():
                proc.kill()
                self.say(f"  {part.name} did not stop within {_seconds(bound_s)}: killed")
            else:
                how = describe_exit(proc.returncode, part.exit_meanings)
                self.say(f"  stopped {part.name} in {self.clock() - step:.1f}s ({how})")
            proc.reap_group()
        if escalated():
            left = [watch.part for watch in reversed(self.watches) if watch.part.proc.alive()]
            self.say(f"quotameter: Ctrl-C again: killing {', '.join(p.name for p in left) or 'nothing (all stopped)'}")
            for part in left:
                part.proc.kill()
                part.proc.reap_group()
        self.say(f"quotameter: stopped everything in {self.clock() - began:.1f}s")
