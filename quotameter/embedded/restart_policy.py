"""When a crashed part of the embedded stack starts again, and when it does not.

Pure bookkeeping: the supervisor passes ``now`` (monotonic seconds) in, so the
policy is tested without sleeping.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 15.0
    # Running this long after its readiness check counts as healthy: the
    # next crash waits backoff_initial_s again.
    healthy_after_s: float = 60.0
    max_crashes: int = 5
    crash_window_s: float = 120.0


class CrashHistory:
    """One part's recent crashes and the wait before its next start."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.crashes: deque[float] = deque()
        self.next_backoff_s = policy.backoff_initial_s

    def recent(self, now: float) -> int:
        """Crashes within the window ending at ``now``."""
        while self.crashes and self.crashes[0] <= now - self.policy.crash_window_s:
            self.crashes.popleft()
        return len(self.crashes)

    def crashed(self, now: float, healthy_for_s: float) -> float | None:
        """Record a crash at ``now``; the wait before restarting, or None to give up.

        ``healthy_for_s`` is how long the part had been ready before it died
        (0 if it never became ready).
        """
        if healthy_for_s >= self.policy.healthy_after_s:
            self.next_backoff_s = self.policy.backoff_initial_s
        self.crashes.append(now)
        if self.recent(now) >= self.policy.max_crashes:
            return None
        wait_s = self.next_backoff_s
        self.next_backoff_s = min(wait_s * 2, self.policy.backoff_max_s)
        return wait_s
