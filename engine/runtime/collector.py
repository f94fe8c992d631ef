"""CPython's cyclic collector, set for a process that moves many requests: one rule for the engine's actors and
its driver.

The engine allocates a few containers per request and keeps a large live heap (modules, indexes, futures), so
under the interpreter's defaults (a young collection every 700 allocations, each older one walking what
survived) collection cost 12-35 us per request in every actor and about 24 us in the driver: a fifth of the
engine's CPU (docs/benchmarks.md, "The collector"). Requests rarely form reference cycles, so young
collections are made rare; nothing else changes.
"""

from __future__ import annotations

import gc
import threading

__all__ = ["THRESHOLDS", "driver_gc", "tune_actor"]

THRESHOLDS = (50_000, 20, 20)
_DEFAULTS = (700, 10, 10)  # CPython's own: a driver whose user set others keeps them


def tune_actor(freeze: bool = False) -> None:
    """In an engine actor's process (it is the engine's alone). ``freeze``: once the actor is warm, what exists
    (modules, catalog, embedding tables) lives as long as the process, so no collection walks it again."""
    gc.set_threshold(*THRESHOLDS)
    if freeze:
        gc.freeze()


class _DriverGC:
    """In a driver, whose interpreter is the user's: the thresholds are raised while at least one engine runs
    in the process, only from CPython's defaults, and put back when the last engine stops (unless someone
    changed them meanwhile)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engines = 0
        self._before: tuple[int, int, int] | None = None

    def engine_started(self) -> None:
        with self._lock:
            self._engines += 1
            if self._engines == 1 and gc.get_threshold() == _DEFAULTS:
                self._before = gc.get_threshold()
                gc.set_threshold(*THRESHOLDS)

    def engine_stopped(self) -> None:
        with self._lock:
            self._engines = max(self._engines - 1, 0)
            if self._engines == 0 and self._before is not None:
                if gc.get_threshold() == THRESHOLDS:
                    gc.set_threshold(*self._before)
                self._before = None


driver_gc = _DriverGC()
