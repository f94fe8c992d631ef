"""What a grouper learns of batch turnarounds from the dispatchers, and learns again after a restart."""

from __future__ import annotations

import asyncio

from engine.core._logkeys import get_logger
from engine.runtime.turnaround import Turnaround

__all__ = ["Learning"]

log = get_logger("smartbatch.grouper")
RELEARN_WAIT_S = 30.0  # real seconds a restarted grouper waits for each dispatcher's turnaround messages


class Learning:
    """Turnaround methods of ``Grouper`` (``table``, ``dispatchers``, ``_heard`` and ``_first_heard`` are its)."""

    _relearning: asyncio.Task | None = None

    async def observe_turnarounds(self, obs: list[Turnaround], source: str | None = None, seq: int = 0) -> None:
        """Batch-API batches the dispatchers started and ended: the table learns the turnaround from them, at
        its epochs only, so when this message arrives changes no decision (engine.runtime.turnaround).
        ``seq``: the number of dispatcher ``source``'s message (they come in order); one already taken is
        skipped."""
        if source is not None:
            if seq <= self._heard.get(source, 0):
                return
            self._heard[source] = seq
            if self._first_heard is not None:
                self._first_heard.setdefault(source, seq)
        self.table.observe(obs)

    async def relearn(self) -> int:
        """After Ray restarted this grouper: learn again, in a fresh estimate, what the dispatchers told it before
        (they keep their messages). A message that comes while they answer is taken once: the fresh estimate
        takes it as it comes, and the answers only the messages before the first such. Returns how many
        messages it took from the answers. One at a time: every attached driver rewires a restarted grouper,
        and two at once failed (a hunt: one's end cleared the other's ``_first_heard``) or learned twice."""
        if self._relearning is None or self._relearning.done():
            self._relearning = asyncio.ensure_future(self._relearn())
        return await asyncio.shield(self._relearning)

    async def _relearn(self) -> int:
        if self.table.turnarounds is None:
            return 0
        self.table.relearn()
        self._first_heard = {}
        taken = 0
        try:
            for name, d in self.dispatchers.items():
                try:  # one that Ray cannot restart (its node lost) held the grouper's whole rewiring (a hunt)
                    msgs = await asyncio.wait_for(d.call("turnarounds_told"), RELEARN_WAIT_S)
                except Exception as exc:  # noqa: BLE001 (what it told is not learned again: a cheaper estimate)
                    log.warning("grouper: the turnarounds %s told could not be read again (%s: %s)", name,
                                type(exc).__name__, exc)
                    continue
                first = self._first_heard.get(name)  # its messages that came while it answered are taken
                for seq, obs in msgs:
                    if first is None or seq < first:
                        self.table.observe(obs)
                        self._heard[name] = max(self._heard.get(name, 0), seq)
                        taken += 1
        finally:
            self._first_heard = None
        return taken
