"""When the recent-ids window alone may answer "seen before?" (no ledger lookup)."""

from __future__ import annotations

from pipeline.dedupe import CLOCK_SKEW_S, RecentIds


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def window(now: float = 10_000.0, window_s: float = 600.0, max_ids: int = 100) -> tuple[RecentIds, Clock]:
    wall = Clock(now)
    return RecentIds(window_s, max_ids, clock=wall, wall=wall), wall


def test_an_event_made_after_the_window_began_and_still_inside_it_needs_no_lookup() -> None:
    recent, wall = window()
    made_ms = int((wall.now + CLOCK_SKEW_S + 1) * 1000)
    assert recent.answers_for(made_ms)
    wall.now += 600 + 2 * CLOCK_SKEW_S  # its row may have left the window by now
    assert not recent.answers_for(made_ms)


def test_an_event_made_before_the_window_began_is_looked_up() -> None:
    recent, wall = window()
    assert not recent.answers_for(int(wall.now * 1000))  # within the clock skew of the start
    assert not recent.answers_for(int((wall.now - 3600) * 1000))  # a re-send an hour later


def test_emptying_the_window_or_evicting_young_ids_restarts_it() -> None:
    recent, wall = window(max_ids=2)
    made_ms = int((wall.now + CLOCK_SKEW_S + 1) * 1000)
    wall.now += 5
    recent.clear()  # a rebalance
    assert not recent.answers_for(made_ms)

    recent, wall = window(max_ids=2)
    recent.add(["a", "b", "c"])
    wall.now += 7
    recent.confirm(["a", "b", "c"])  # three young ids, room for two: one is evicted
    assert len(recent) == 2 and recent.complete_since == wall.now
