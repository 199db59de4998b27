import signal

from quotameter.embedded.restart_policy import CrashHistory, RestartPolicy
from quotameter.embedded.supervisor import describe_exit

POLICY = RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4.0, healthy_after_s=60.0, max_crashes=5,
                       crash_window_s=120.0)


def test_the_wait_doubles_up_to_the_cap():
    history = CrashHistory(RestartPolicy(backoff_initial_s=0.5, backoff_max_s=4.0, max_crashes=100))
    waits = [history.crashed(now=float(i), healthy_for_s=1.0) for i in range(6)]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_a_healthy_run_starts_the_backoff_over():
    history = CrashHistory(POLICY)
    assert history.crashed(now=0.0, healthy_for_s=0.0) == 0.5
    assert history.crashed(now=10.0, healthy_for_s=5.0) == 1.0
    assert history.crashed(now=100.0, healthy_for_s=60.0) == 0.5


def test_too_many_crashes_within_the_window_give_up():
    history = CrashHistory(POLICY)
    assert [history.crashed(now=float(i), healthy_for_s=0.0) for i in range(4)] == [0.5, 1.0, 2.0, 4.0]
    assert history.crashed(now=4.0, healthy_for_s=0.0) is None
    assert history.recent(now=4.0) == 5


def test_crashes_older_than_the_window_are_forgotten():
    history = CrashHistory(POLICY)
    for at in (0.0, 30.0, 60.0, 90.0):
        assert history.crashed(now=at, healthy_for_s=0.0) is not None
    # The first crash left the window: this is the fourth within 120 s, not the fifth.
    assert history.crashed(now=121.0, healthy_for_s=0.0) is not None
    assert history.recent(now=121.0) == 4


def test_exits_are_described_by_code_signal_and_meaning():
    meanings = {75: "EX_TEMPFAIL: the ledger or the broker failed"}
    assert describe_exit(-signal.SIGKILL, meanings) == "killed by SIGKILL"
    assert describe_exit(75, meanings) == "exit 75 (EX_TEMPFAIL: the ledger or the broker failed)"
    assert describe_exit(1, meanings) == "exit 1"
