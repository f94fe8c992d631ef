"""The collector rule (engine.runtime.collector): raised in a driver only from CPython's defaults, while
engines run, and put back after the last one."""

import gc

import pytest

from engine.runtime.collector import THRESHOLDS, _DriverGC


@pytest.fixture
def thresholds():
    before = gc.get_threshold()
    yield
    gc.set_threshold(*before)


def test_a_driver_raises_the_defaults_while_engines_run_and_restores_them_after_the_last(thresholds):
    gc.set_threshold(700, 10, 10)
    d = _DriverGC()
    d.engine_started()
    assert gc.get_threshold() == THRESHOLDS
    d.engine_started()  # a second engine in the same process
    d.engine_stopped()
    assert gc.get_threshold() == THRESHOLDS  # one still runs
    d.engine_stopped()
    assert gc.get_threshold() == (700, 10, 10)
    d.engine_stopped()  # a stop too many changes nothing
    assert gc.get_threshold() == (700, 10, 10)


def test_a_user_s_own_thresholds_are_left_alone(thresholds):
    gc.set_threshold(2_000, 5, 5)
    d = _DriverGC()
    d.engine_started()
    assert gc.get_threshold() == (2_000, 5, 5)
    d.engine_stopped()
    assert gc.get_threshold() == (2_000, 5, 5)
    gc.set_threshold(700, 10, 10)
    d.engine_started()
    gc.set_threshold(900, 10, 10)  # changed by the user while the engine ran: theirs stays
    d.engine_stopped()
    assert gc.get_threshold() == (900, 10, 10)
