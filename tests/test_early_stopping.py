import math

import pytest

from advanced_training_utils import EarlyStopping


def test_stops_after_patience_with_min_delta():
    es = EarlyStopping(patience=2, min_delta=0.05)
    assert [es.step(v) for v in (1.0, 0.97, 0.96)] == [False, False, True]
    assert es.best == 1.0 and es.best_epoch == 0


def test_improvement_resets_counter_and_max_mode():
    es = EarlyStopping(patience=2, mode="max")
    assert [es.step(v) for v in (0.1, 0.2, 0.2, 0.3, 0.25, 0.25)] == [
        False, False, False, False, False, True]
    assert es.best == 0.3 and es.best_epoch == 3


def test_nan_is_never_improvement():
    es = EarlyStopping(patience=1)
    es.step(1.0)
    assert es.step(math.nan) is True


def test_state_dict_round_trip_into_fresh_object():
    es = EarlyStopping(patience=3, min_delta=0.01)
    for v in (1.0, 0.9, 0.95):
        es.step(v)
    fresh = EarlyStopping()
    fresh.load_state_dict(es.state_dict())
    seq = (0.95, 0.93)
    assert [fresh.step(v) for v in seq] == [es.step(v) for v in seq] == [False, True]
    assert fresh.state_dict() == es.state_dict()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(patience=0), ValueError, "patience must be >= 1, got 0"),
        (dict(patience=1.5), TypeError, "patience must be an integer"),
        (dict(min_delta=-0.1), ValueError, "min_delta must be >= 0, got -0.1"),
        (dict(mode="up"), ValueError, "mode must be one of 'min', 'max'; got 'up'"),
    ],
)
def test_rejects_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        EarlyStopping(**kwargs)
