"""PreemptionHandler: the first signal asks for a checkpoint, the second waits, the third
forces the exit through the previous handler."""

import os
import signal

import pytest

from advanced_training_utils.engine.preemption import PreemptionHandler, TrainingPreempted


class Forced(Exception):
    pass


@pytest.fixture
def previous():
    """A previous SIGTERM handler that records being called (instead of ending pytest)."""
    calls = []

    def handler(signum, frame):
        calls.append(signum)
        raise Forced()
    old = signal.signal(signal.SIGTERM, handler)
    yield calls
    signal.signal(signal.SIGTERM, old)


def test_second_signal_waits_third_forces(previous):
    with PreemptionHandler() as p:
        os.kill(os.getpid(), signal.SIGTERM)
        assert p.requested and p.signum == signal.SIGTERM and previous == []
        os.kill(os.getpid(), signal.SIGTERM)  # still ours: the checkpoint would go on
        assert p.count == 2 and previous == []
        with pytest.raises(Forced):
            os.kill(os.getpid(), signal.SIGTERM)
        assert previous == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGTERM).__name__ == "handler"  # restored on exit


def test_disabled_handler_installs_nothing(previous):
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionHandler(enabled=False) as p:
        assert signal.getsignal(signal.SIGTERM) is before and not p.requested


def test_training_preempted_exit_codes():
    assert TrainingPreempted(signal.SIGTERM, None).code == 143
    assert TrainingPreempted(signal.SIGINT, None).code == 130
