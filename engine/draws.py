"""Everything random in a simulation, drawn up front from one seed.

Draws are keyed by what they describe, never by the order a policy happens to ask: attempt ``k`` of request
``i`` fails iff ``fail_u[i, k] < failure_rate``; its latency noise is ``lat_z[i, k]``, its backoff jitter ``jit_u[i, k]``; a batch submitted to
provider ``p`` at time ``t`` takes ``turnaround(p, t)``, one draw per slot of ``batch_slot_s`` seconds (the
provider's batch queue load at that time). So every policy faces the same world, and the offline lower bound
can use the same draws with hindsight.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from engine.catalog import BatchApi, Catalog

__all__ = ["Draws"]

_CHUNK = 4096


class Draws:
    def __init__(self, n_requests: int, max_attempts: int, seed: int, slot_s: float):
        # Separate generators, grown row-chunk by row-chunk: row i has the same values whether the arrays
        # were drawn for the whole trace at once (simulator) or grown as requests arrive (live engine).
        self._fail_gen = np.random.default_rng([seed, 1])
        self._lat_gen = np.random.default_rng([seed, 3])
        self._jit_gen = np.random.default_rng([seed, 4])
        self.max_attempts = max_attempts
        self.fail_u = np.empty((0, max_attempts))
        self.lat_z = np.empty((0, max_attempts))
        self.jit_u = np.empty((0, max_attempts))  # backoff jitter of a retry after attempt k
        self.ensure(n_requests)
        self.seed = seed
        self.slot_s = slot_s
        self._slots: dict[str, np.ndarray] = {}
        self._gens: dict[str, np.random.Generator] = {}

    def ensure(self, n_requests: int) -> None:
        """Make rows ``0..n_requests-1`` exist (in chunks of _CHUNK rows, so row values never depend on how
        far the arrays were grown before)."""
        have = self.fail_u.shape[0]
        if have >= n_requests:
            return
        rows = -(-(n_requests - have) // _CHUNK) * _CHUNK
        self.fail_u = np.concatenate([self.fail_u, self._fail_gen.random((rows, self.max_attempts))])
        self.lat_z = np.concatenate([self.lat_z, self._lat_gen.standard_normal((rows, self.max_attempts))])
        self.jit_u = np.concatenate([self.jit_u, self._jit_gen.random((rows, self.max_attempts))])

    def _ensure(self, provider: str, ba: BatchApi, n_slots: int) -> np.ndarray:
        arr = self._slots.get(provider)
        if arr is not None and arr.size >= n_slots:
            return arr
        gen = self._gens.setdefault(provider, np.random.default_rng([self.seed, 2, zlib.crc32(provider.encode())]))
        parts = [arr] if arr is not None else []
        have = 0 if arr is None else arr.size
        while have < n_slots:
            # Drawn in fixed-size chunks from one generator, so slot k has the same value however far the
            # array has been grown before.
            z = gen.standard_normal(_CHUNK)
            t = ba.turnaround_median_s * np.exp(ba.turnaround_sigma * z)
            parts.append(np.clip(t, ba.turnaround_min_s, ba.completion_window_s))
            have += _CHUNK
        arr = np.concatenate(parts)
        self._slots[provider] = arr
        return arr

    def turnaround(self, provider: str, ba: BatchApi, t: float) -> float:
        slot = int(t // self.slot_s)
        return float(self._ensure(provider, ba, slot + 1)[slot])

    def slot_turnarounds(self, provider: str, ba: BatchApi, horizon_s: float) -> np.ndarray:
        """Turnaround of every slot from 0 up to ``horizon_s``."""
        return self._ensure(provider, ba, int(math.ceil(horizon_s / self.slot_s)) + 1)

    def attempts_all_fail(self, catalog: Catalog, providers: list[str]) -> np.ndarray:
        """Requests whose every allowed attempt fails: no policy can complete (or pay for) them."""
        rates = np.array([catalog.provider(p).failure_rate for p in providers])
        self.ensure(len(providers))
        return np.all(self.fail_u[: len(providers)] < rates[:, None], axis=1)
