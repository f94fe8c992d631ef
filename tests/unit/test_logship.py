"""Actor log lines on their way to the drivers (actors.logship): numbered once, capped in a burst, never
shipped from inside their own shipping."""

import logging

import pytest

from actors import logship
from actors.logship import BURST, LogBook, ship_logs


@pytest.fixture
def shipped():
    got: list = []
    ship_logs("WARNING", "cache", got.extend)
    yield got
    logger = logging.getLogger("smartbatch")
    logger.removeHandler(logship._installed)
    logger.setLevel(logging.NOTSET)
    logship._installed = None


def test_records_at_the_level_and_up_are_shipped_with_their_logger_and_actor(shipped):
    logging.getLogger("smartbatch.cache").info("quiet")
    logging.getLogger("smartbatch.cache").warning("Redis at %s unreachable", "redis://x")
    assert [(n, lvl, a, m) for _, n, lvl, a, m in shipped] == [
        ("smartbatch.cache", logging.WARNING, "cache", "Redis at redis://x unreachable")]


def test_setting_up_again_replaces_the_handler(shipped):
    again: list = []
    ship_logs("ERROR", "cache", again.extend)
    logging.getLogger("smartbatch.x").warning("below ERROR now")
    logging.getLogger("smartbatch.x").error("shipped once")
    assert shipped == [] and [m for *_, m in again] == ["shipped once"]


def test_a_burst_is_capped_and_the_drop_is_reported(shipped, monkeypatch):
    now = [100.0]
    monkeypatch.setattr(logship.time, "monotonic", lambda: now[0])
    ship_logs("WARNING", "ingest", shipped.extend)  # its window starts at the patched clock
    for k in range(BURST + 7):
        logging.getLogger("smartbatch.ingest").warning("line %d", k)
    assert len(shipped) == BURST
    now[0] += logship.WINDOW_S
    logging.getLogger("smartbatch.ingest").warning("after the window")
    assert [m for *_, m in shipped[BURST:]] == [
        f"7 log line(s) of this actor were dropped (over {BURST} in {logship.WINDOW_S:.0f} s)", "after the window"]


def test_what_the_sink_logs_is_not_shipped_again():
    got: list = []

    def sink(records):
        got.extend(records)
        logging.getLogger("smartbatch.hub").warning("logged while shipping")

    ship_logs("WARNING", "hub", sink)
    try:
        logging.getLogger("smartbatch.hub").warning("one")
    finally:
        logging.getLogger("smartbatch").removeHandler(logship._installed)
        logship._installed = None
    assert [m for *_, m in got] == ["one"]


def test_the_book_gives_each_driver_each_line_once():
    book = LogBook(kept=3)
    lines, nxt = book.since(None)  # a driver that attaches now: nothing before it
    assert (lines, nxt) == ([], 0)
    book.add([(0.0, "smartbatch.a", 30, "a", f"m{k}") for k in range(2)])
    lines, nxt = book.since(nxt)
    assert [m for *_, m in lines] == ["m0", "m1"] and nxt == 2
    assert book.since(nxt) == ([], 2)
    book.add([(0.0, "smartbatch.a", 30, "a", f"m{k}") for k in range(2, 6)])
    lines, nxt = book.since(2)  # fell behind: only the kept ones
    assert [m for *_, m in lines] == ["m3", "m4", "m5"] and nxt == 6
    assert book.since(None) == ([], 6)
