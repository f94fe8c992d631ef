"""Everything random in a simulation, drawn up front from one seed.

Draws are keyed by what they describe, never by the order a policy happens to ask: attempt ``k`` of request
``i`` fails iff ``fail_u[i, k] < failure_rate``; its latency noise is ``lat_z[i, k]``, its backoff jitter ``jit_u[i, k]``; a batch submitted to
provider ``p`` at time ``t`` takes ``turnaround(p, t)``, one draw per slot of ``batch_slot_s`` seconds (the
provider's batch queue load at that time). So every policy faces the same world, and the offline lower bound
can use the same draws with hindsight. Slot draws are kept per chunk of 4,096 slots, made only for the chunks a
run touches, so memory never grows with the absolute value of ``t``.

Time of day. Engine time starts at 0 when a run does, so "hour of day" needs to know what time of day that
was: ``day_origin_s``, seconds after UTC midnight at engine time 0 (``SimSettings.day_origin_s``). ``hour_of_day``
is the one rule, read by the simulated world's by-hour turnaround and by the learned estimate's hours
(``engine.runtime.turnaround``), so the two never disagree on which hour a batch fell in.
"""

from __future__ import annotations

import math
import sys
import zlib
from collections import OrderedDict
from typing import TYPE_CHECKING, NamedTuple

from engine.core.catalog import BatchApi, Catalog
from engine.core.clock import Clock, ScaledClock

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DAY_S", "Draws", "TurnaroundWorld", "engine_day_origin", "hour_of_day"]

DAY_S = 86400.0


def hour_of_day(t, day_origin_s: float = 0.0):
    """The hour of day (0..23) at engine time ``t`` (a number, or an array of them) of a run whose engine time 0
    fell ``day_origin_s`` seconds after UTC midnight: an int, or an int array."""
    h = (day_origin_s + t) // 3600.0 % 24  # // and % of floats are exact: a number and an array agree
    # An array exists only once numpy is loaded, which this module does only where it draws: every engine actor
    # imports it (the simulated provider, through its peers' handles), and numpy cost a worker that draws
    # nothing about 90 ms of CPU at start.
    nd = sys.modules.get("numpy")
    return h.astype(nd.int64) if nd is not None and isinstance(h, nd.ndarray) else int(h)


def engine_day_origin(setting: float | None, clock: Clock | None) -> float:
    """A live engine's ``day_origin_s``: ``setting`` when given (a replayed trace's), else the UTC time of day
    when its ``ScaledClock`` reads 0. A pure function of the clock's numbers, never of when it is asked, so every
    actor, one Ray restarted included, and every driver attached to the engine get the same. Engine time may run
    ``speedup`` times as fast as the wall: the hour is of engine time (the wall's at speedup 1). 0 for a clock
    with no wall time (``ManualClock``, tests) and while there is no clock yet."""
    if setting is not None:
        return setting
    if not isinstance(clock, ScaledClock):
        return 0.0
    return (clock.epoch - clock.offset / clock.speedup) % DAY_S


class TurnaroundWorld(NamedTuple):
    """The simulated providers' true batch turnaround as a multiple of the catalog's lognormal (which stays the
    policy's prior): ``scale``, times ``by_hour[h]`` in hour ``h`` of day (``hour_of_day`` of engine time from
    ``day_origin_s``; empty: none). Applied to a slot's draw before the clip to [turnaround_min_s,
    completion_window_s], at the slot's start."""

    scale: float = 1.0
    by_hour: tuple[float, ...] = ()
    day_origin_s: float = 0.0

    @classmethod
    def of(cls, sim, day_origin_s: float | None = None) -> TurnaroundWorld:
        """From ``SimSettings``; ``day_origin_s`` when given, else the settings' (unset: 0, until a live engine
        knows its clock and gives it here)."""
        origin = day_origin_s if day_origin_s is not None else sim.day_origin_s
        return cls(sim.turnaround_scale, tuple(sim.turnaround_scale_by_hour), origin or 0.0)

    def factor(self, t: float) -> float:
        return self.scale * (self.by_hour[hour_of_day(t, self.day_origin_s)] if self.by_hour else 1.0)

    def factors(self, t: np.ndarray) -> np.ndarray:
        import numpy as np
        if not self.by_hour:
            return np.full(t.shape, self.scale)
        return self.scale * np.asarray(self.by_hour)[hour_of_day(t, self.day_origin_s)]


_CHUNK = 4096
# Slot turnarounds: chunks below this come from one sequential generator per provider (65,536 slots, 45 days
# at 60 s slots); chunks at or above it are drawn from a generator keyed by the chunk number.
_SEQ_CHUNKS = 16
ROW_CHUNKS_KEPT = 64  # per-request row chunks held (262,144 requests, 25 MB at 4 attempts); older ones redrawn


class Draws:
    def __init__(self, n_requests: int, max_attempts: int, seed: int, slot_s: float):
        # (``n_requests`` is a hint only: rows are drawn on first use.)
        # Per-request rows come in chunks of _CHUNK rows: the first _SEQ_CHUNKS from one sequential generator
        # per quantity (so row i has the same values whether drawn for a whole trace or grown as requests
        # arrive), later ones from a generator keyed by the chunk number. At most ROW_CHUNKS_KEPT chunks are
        # held; one asked for again is drawn again, identically. So a live engine's memory stays flat however
        # many requests it serves.
        self.max_attempts = max_attempts
        self.seed = seed
        self._rows: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._seq: tuple[int, list[np.random.Generator]] | None = None  # next sequential chunk, generators
        self.slot_s = slot_s
        self._slots: dict[str, dict[int, np.ndarray]] = {}  # provider -> chunk number -> turnarounds
        self._gens: dict[str, np.random.Generator] = {}

    def _row_chunk(self, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        import numpy as np
        got = self._rows.get(c)
        if got is not None:
            self._rows.move_to_end(c)
            return got
        shape = (_CHUNK, self.max_attempts)
        if c < _SEQ_CHUNKS:
            if self._seq is None or self._seq[0] > c:  # (again) from the start of the sequential streams
                self._seq = (0, [np.random.default_rng([self.seed, k]) for k in (1, 3, 4)])
            k, (fail, lat, jit) = self._seq
            while True:
                got = (fail.random(shape), lat.standard_normal(shape), jit.random(shape))
                self._seq = (k + 1, [fail, lat, jit])
                if k == c:
                    break
                k += 1
        else:
            got = tuple(draw(np.random.default_rng([self.seed, q, c]), shape) for q, draw in
                        ((1, np.random.Generator.random), (3, np.random.Generator.standard_normal),
                         (4, np.random.Generator.random)))
        self._rows[c] = got
        if len(self._rows) > ROW_CHUNKS_KEPT:
            self._rows.popitem(last=False)
        return got

    def fail_u(self, i: int, k: int) -> float:
        """Attempt ``k`` of request ``i`` fails iff this is below the provider's failure rate."""
        return float(self._row_chunk(i // _CHUNK)[0][i % _CHUNK, k])

    def lat_z(self, i: int, k: int) -> float:
        """The standard-normal noise of attempt ``k``'s latency."""
        return float(self._row_chunk(i // _CHUNK)[1][i % _CHUNK, k])

    def jit_u(self, i: int, k: int) -> float:
        """The backoff jitter of a retry after attempt ``k``."""
        return float(self._row_chunk(i // _CHUNK)[2][i % _CHUNK, k])

    def _chunk(self, provider: str, ba: BatchApi, c: int) -> np.ndarray:
        """Turnarounds of slots ``c * _CHUNK .. (c + 1) * _CHUNK - 1`` of one provider."""
        import numpy as np
        chunks = self._slots.setdefault(provider, {})
        arr = chunks.get(c)
        if arr is not None:
            return arr
        if c < _SEQ_CHUNKS:
            # The first chunks come in order from one generator per provider, as they always have, so the
            # figures of every ordinary trace stay as they were.
            key = [self.seed, 2, zlib.crc32(provider.encode())]
            gen = self._gens.setdefault(provider, np.random.default_rng(key))
            for k in range(c + 1):  # chunks below c were drawn before it, in this order
                if k not in chunks:
                    chunks[k] = self._transform(ba, gen.standard_normal(_CHUNK))
            return chunks[c]
        # Later chunks are keyed by their number, so memory follows the chunks a run touches, never the
        # absolute time (a Unix-epoch arrival touches one chunk, not 28 million slots before it).
        z = np.random.default_rng([self.seed, 2, zlib.crc32(provider.encode()), c]).standard_normal(_CHUNK)
        arr = chunks[c] = self._transform(ba, z)
        return arr

    @staticmethod
    def _transform(ba: BatchApi, z: np.ndarray) -> np.ndarray:
        # Kept unclipped: a world scaled away from the catalog (``TurnaroundWorld``) scales, then clips.
        import numpy as np
        return ba.turnaround_median_s * np.exp(ba.turnaround_sigma * z)

    def turnaround(self, provider: str, ba: BatchApi, t: float, world: TurnaroundWorld | None = None) -> float:
        slot = max(int(t // self.slot_s), 0)
        raw = float(self._chunk(provider, ba, slot // _CHUNK)[slot % _CHUNK])
        if world is not None:
            raw *= world.factor(slot * self.slot_s)
        return min(max(raw, ba.turnaround_min_s), ba.completion_window_s)

    def slot_turnarounds(self, provider: str, ba: BatchApi, horizon_s: float,
                         world: TurnaroundWorld | None = None) -> np.ndarray:
        """Turnaround of every slot from 0 up to ``horizon_s`` (at least; whole chunks). Its size follows the
        horizon, so a caller bounds the horizon (traces are rebased and their span bounded at load)."""
        import numpy as np
        n_chunks = -(-(int(math.ceil(horizon_s / self.slot_s)) + 1) // _CHUNK)
        raw = np.concatenate([self._chunk(provider, ba, c) for c in range(n_chunks)])
        if world is not None:
            raw = raw * world.factors(np.arange(raw.size) * self.slot_s)
        return np.clip(raw, ba.turnaround_min_s, ba.completion_window_s)

    def attempts_all_fail(self, catalog: Catalog, providers: list[str]) -> np.ndarray:
        """Requests whose every allowed attempt fails: no policy can complete (or pay for) them."""
        import numpy as np
        rates = np.array([catalog.provider(p).failure_rate for p in providers])
        n = len(providers)
        out = np.empty(n, bool)
        for c in range(-(-n // _CHUNK)):
            lo, hi = c * _CHUNK, min((c + 1) * _CHUNK, n)
            out[lo:hi] = np.all(self._row_chunk(c)[0][: hi - lo] < rates[lo:hi, None], axis=1)
        return out
