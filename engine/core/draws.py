"""Everything random in a simulation, drawn up front from one seed.

Draws are keyed by what they describe, never by the order a policy happens to ask: attempt ``k`` of request
``i`` fails iff ``fail_u[i, k] < failure_rate``; its latency noise is ``lat_z[i, k]``, its backoff jitter ``jit_u[i, k]``; a batch submitted to
provider ``p`` at time ``t`` takes ``turnaround(p, t)``, one draw per slot of ``batch_slot_s`` seconds (the
provider's batch queue load at that time). So every policy faces the same world, and the offline lower bound
can use the same draws with hindsight. Slot draws are kept per chunk of 4,096 slots, made only for the chunks a
run touches, so memory never grows with the absolute value of ``t``.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

from engine.core.catalog import BatchApi, Catalog

__all__ = ["Draws"]

_CHUNK = 4096
# Slot turnarounds: chunks below this come from one sequential generator per provider (65,536 slots, 45 days
# at 60 s slots); chunks at or above it are drawn from a generator keyed by the chunk number.
_SEQ_CHUNKS = 16


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
        self._slots: dict[str, dict[int, np.ndarray]] = {}  # provider -> chunk number -> turnarounds
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

    def _chunk(self, provider: str, ba: BatchApi, c: int) -> np.ndarray:
        """Turnarounds of slots ``c * _CHUNK .. (c + 1) * _CHUNK - 1`` of one provider."""
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
        t = ba.turnaround_median_s * np.exp(ba.turnaround_sigma * z)
        return np.clip(t, ba.turnaround_min_s, ba.completion_window_s)

    def turnaround(self, provider: str, ba: BatchApi, t: float) -> float:
        slot = max(int(t // self.slot_s), 0)
        return float(self._chunk(provider, ba, slot // _CHUNK)[slot % _CHUNK])

    def slot_turnarounds(self, provider: str, ba: BatchApi, horizon_s: float) -> np.ndarray:
        """Turnaround of every slot from 0 up to ``horizon_s`` (at least; whole chunks). Its size follows the
        horizon, so a caller bounds the horizon (traces are rebased and their span bounded at load)."""
        n_chunks = -(-(int(math.ceil(horizon_s / self.slot_s)) + 1) // _CHUNK)
        return np.concatenate([self._chunk(provider, ba, c) for c in range(n_chunks)])

    def attempts_all_fail(self, catalog: Catalog, providers: list[str]) -> np.ndarray:
        """Requests whose every allowed attempt fails: no policy can complete (or pay for) them."""
        rates = np.array([catalog.provider(p).failure_rate for p in providers])
        self.ensure(len(providers))
        return np.all(self.fail_u[: len(providers)] < rates[:, None], axis=1)
