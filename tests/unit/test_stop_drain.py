"""The drain before a driver's stop (``Engine._drain_before_stop``, ``_drain_on_exit``), without Ray: which exits
wait, and that nothing in it (a second Ctrl-C, an actor gone) keeps the stop that follows from running."""

import threading

import pytest

from engine.app._driver_shared import SharedEngine
from engine.app._ray_stop import Terminated
from engine.core.settings import Settings


class Stopping(SharedEngine):
    """The state the drain reads, and a record of what it asked (``cancel``, the waits)."""

    name = "e"

    def __init__(self, under_way: int = 2, fault: BaseException | None = None, at: str = "check") -> None:
        self.settings = Settings(stop_drain_s=42.0)
        self._owner, self._running, self._gone, self._puller = True, True, None, None
        self.under_way, self.fault, self.at, self.asked = under_way, fault, at, []

    def wait_cancelled(self, timeout_s: float, interrupted=None) -> int:
        self.asked.append(("wait", timeout_s))
        if self.fault is not None and self.at == ("check" if timeout_s == 0 else "wait"):
            raise self.fault
        return self.under_way if timeout_s == 0 else 0

    def cancel(self, timeout_s: float = 60.0) -> int:
        self.asked.append(("cancel", timeout_s))
        return 1


@pytest.mark.parametrize(("exc", "waits"), [(None, 0.0), (RuntimeError, 42.0), (KeyboardInterrupt, 42.0),
                                            (Terminated, 0.0), (SystemExit, 0.0)])
def test_a_with_block_left_on_an_error_or_ctrl_c_drains_and_one_left_normally_or_by_sigterm_does_not(exc, waits):
    """Ray's SIGTERM handler raises SystemExit, and aborts the process seconds later: a drain there lost the stop
    and the script's own clean-up (a review)."""
    assert Stopping()._drain_on_exit(exc) == waits


def test_the_drain_cancels_then_waits_within_its_limit():
    e = Stopping()
    assert e._drain_before_stop(30.0) == 0
    assert e.asked == [("wait", 0.0), ("cancel", 30.0), ("wait", 30.0)]  # the cancel too within the limit


@pytest.mark.parametrize("state", ["nothing under way", "not the owner", "engine gone", "puller", "no limit"])
def test_the_drain_does_not_wait_where_nothing_would_be_answered(state):
    e = Stopping(under_way=0 if state == "nothing under way" else 2)
    e._owner = state != "not the owner"
    e._gone = "the engine's actors are gone" if state == "engine gone" else None
    if state == "puller":  # stop() from a result's callback: that thread delivers the answers
        e._puller = threading.current_thread()
    assert e._drain_before_stop(0.0 if state == "no limit" else 30.0) == 0
    assert ("cancel", 30.0) not in e.asked


@pytest.mark.parametrize("at", ["check", "wait"])
@pytest.mark.parametrize("fault", [KeyboardInterrupt(), RuntimeError("actor gone")])
def test_a_second_ctrl_c_or_an_error_anywhere_in_the_drain_ends_it_and_never_escapes(fault, at):
    """A second Ctrl-C in the drain's first check escaped it: stop() left before stopping anything, the script's
    error was replaced, and the batch ran on, every member billed and unread (a review)."""
    assert Stopping(fault=fault, at=at)._drain_before_stop(30.0) == -1


@pytest.mark.parametrize(("left", "never_sent"), [(0, True), (3, False)])
def test_what_is_open_after_a_drain_that_ended_everything_is_told_it_was_never_sent(left, never_sent):
    """Requests the drain's cancel ended on their way were told "engine stopped before the request finished", as
    if they might have run and been billed (a helper's hunt: 6-16 of 300)."""
    e = Stopping()
    e.wait_cancelled = lambda timeout_s, interrupted=None: 2 if timeout_s == 0 else left
    assert e._stop_error().startswith("engine stopped before the request finished")  # no drain yet
    assert e._drain_before_stop(30.0) == left
    said = e._stop_error()
    assert ("never sent" in said and "billed nothing" in said) == never_sent, said
    e._owner = False
    assert "this driver left engine 'e'" in e._stop_error()
