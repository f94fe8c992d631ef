"""Actor log lines to the drivers: a handler on the ``smartbatch`` logger of each actor process ships its records
(at ``Settings.log_level`` and above) to the result hub, which keeps the latest; every driver relays them into its
own Python logging (``engine.app._supervise``), so "Redis down" in the cache actor is a record of logger
``smartbatch.cache`` in the driver, not a line in a Ray worker's file.

A burst is capped (``BURST`` records per ``WINDOW_S``, then one line saying how many were dropped): a fault that
logs on every call must not flood the hub it shares with the results.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from engine.core._logkeys import get_logger

__all__ = ["LogBook", "LogRecordT", "ship_logs"]

LogRecordT = tuple[float, str, int, str, str]  # (created, logger name, level, actor, message)
BURST = 50
WINDOW_S = 10.0
KEPT = 1000  # records the hub keeps for drivers that have not pulled them yet

_shipping = threading.local()  # set while a record is shipped: what the sink logs is not shipped again


class _Ship(logging.Handler):
    def __init__(self, actor: str, sink: Callable[[list[LogRecordT]], None], level: int):
        super().__init__(level)
        self.actor, self.sink = actor, sink
        self._window_start, self._count, self._dropped = time.monotonic(), 0, 0

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(_shipping, "on", False):
            return
        now = time.monotonic()
        out: list[LogRecordT] = []
        if now - self._window_start >= WINDOW_S:
            if self._dropped:
                out.append((time.time(), "smartbatch.logs", logging.WARNING, self.actor,
                            f"{self._dropped} log line(s) of this actor were dropped (over {BURST} in {WINDOW_S:.0f} s)"))
            self._window_start, self._count, self._dropped = now, 0, 0
        if self._count >= BURST:
            self._dropped += 1
            return
        self._count += 1
        try:
            out.append((record.created, record.name, record.levelno, self.actor, record.getMessage()))
        except Exception:  # a bad format string in a log call: logging's own rule is to report, not raise
            self.handleError(record)
            return
        _shipping.on = True
        try:
            self.sink(out)
        except Exception:  # the hub is gone or restarting: the line is lost, the actor goes on
            pass
        finally:
            _shipping.on = False


_installed: _Ship | None = None


def ship_logs(level: str, actor: str, sink: Callable[[list[LogRecordT]], None]) -> None:
    """In this (actor) process: records of ``smartbatch.*`` at ``level`` and above go to ``sink``. Calling it
    again replaces the previous handler (a restarted actor is set up again)."""
    global _installed
    logger = get_logger("smartbatch")
    lvl = logging.getLevelName(level.upper())
    logger.setLevel(lvl)
    if _installed is not None:
        logger.removeHandler(_installed)
    _installed = _Ship(actor, sink, lvl)
    logger.addHandler(_installed)


class LogBook:
    """The hub's record of the actors' latest log lines, numbered so each driver reads each once."""

    def __init__(self, kept: int = KEPT):
        self._lines: deque[LogRecordT] = deque(maxlen=kept)
        self._next = 0  # the number the next line gets

    def add(self, records: list[LogRecordT]) -> None:
        self._lines.extend(records)
        self._next += len(records)

    def since(self, seq: int | None) -> tuple[list[LogRecordT], int]:
        """(lines numbered ``seq`` and up, still kept; the number to ask from next). ``None``: none, only the
        number (a driver that attaches reads what comes after it)."""
        if seq is None:
            return [], self._next
        first = self._next - len(self._lines)
        start = max(seq, first) - first
        return list(self._lines)[start:], self._next
