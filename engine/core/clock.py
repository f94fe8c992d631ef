"""Injected time. The simulator keeps its own virtual time; live actors read a ``Clock`` so tests can drive
them without sleeping, and a trace can be replayed time-compressed (``speedup``)."""

from __future__ import annotations

import time

__all__ = ["Clock", "ManualClock", "ScaledClock"]


class Clock:
    def now(self) -> float:
        """Engine seconds (virtual: trace seconds when replaying)."""
        raise NotImplementedError

    def real_delay(self, virtual_s: float) -> float:
        """Real seconds to wait for ``virtual_s`` engine seconds to pass."""
        raise NotImplementedError


class ScaledClock(Clock):
    """``now = offset + (wall - epoch) * speedup``. Built from plain numbers so every actor, in any process
    of the cluster, reads the same time (wall clocks of one cluster agree to well under a virtual second at
    the speed-ups used here)."""

    def __init__(self, epoch: float, speedup: float = 1.0, offset: float = 0.0):
        if speedup <= 0:
            raise ValueError(f"speedup must be > 0, got {speedup}")
        self.epoch, self.speedup, self.offset = epoch, speedup, offset

    def now(self) -> float:
        return self.offset + (time.time() - self.epoch) * self.speedup

    def real_delay(self, virtual_s: float) -> float:
        return max(virtual_s, 0.0) / self.speedup

    def __reduce__(self):
        return ScaledClock, (self.epoch, self.speedup, self.offset)

    def __repr__(self) -> str:
        return f"ScaledClock(speedup={self.speedup}, now={self.now():.3f})"


class ManualClock(Clock):
    """A clock tests move by hand."""

    def __init__(self, t: float = 0.0):
        self.t = t

    def now(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def real_delay(self, virtual_s: float) -> float:
        return 0.0
