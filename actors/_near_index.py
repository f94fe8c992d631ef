"""The result cache's near-duplicate index: requests about to lead are indexed by embedding so near
duplicates arriving while they are generated can follow them, and stored results so later ones can be reused.
A mixin of ``ResultCache``: it uses the cache's state."""

from __future__ import annotations

import math
from collections.abc import Hashable

import numpy as np

from actors._types import Job
from actors.cache_layers import CorruptValue, Entry, decode
from engine.core.features import NEAR_DIM, featurize, featurize_texts
from engine.core.result import Result

Item = Job
FOLLOWING = Result(id="", status="reused")  # marker: attached to a near duplicate in flight
LEADS = Result(id="", status="failed")  # marker: generated, and a source for the asks after it


class NearIndex:
    """Near-duplicate index methods of ``ResultCache``."""

    def _index_leaders(self, vecs: dict, lazy: bool = False, skip: set[str] = frozenset()) -> None:
        """Index the requests that started generating, so near duplicates arriving meanwhile can follow them
        (the simulator's index holds a dispatched request too). ``vecs``: vectors already made, by id.
        ``lazy``: only those with a vector already; the rest wait for the next near ask or completion, so a
        lookup without near asks (an urgent exact request) does not pay for featurising. ``skip``: ids left
        for later (leaders of the lookup under way, which its near asks weigh in arrival order)."""
        if not self.reuse.near:
            self._new_leads = []
            return
        if lazy:
            ready = [it for it in self._new_leads if it.req.uid in vecs]
            self._new_leads = [it for it in self._new_leads if it.req.uid not in vecs]
            leading = ready
        else:
            leading = [it for it in self._new_leads if it.req.uid not in skip]
            self._new_leads = [it for it in self._new_leads if it.req.uid in skip]
        leading = [it for it in leading if it.fp not in self.indexed]
        if not leading:
            return
        todo = [it for it in leading if it.req.uid not in vecs]
        if todo:
            made = featurize([it.req for it in todo], dim=NEAR_DIM)
            vecs = {**vecs, **{it.req.uid: made[k] for k, it in enumerate(todo)}}
        self._index_rows([(self._near_key(it), vecs[it.req.uid], it.fp, it.req.prompt, math.inf)
                          for it in {it.fp: it for it in leading}.values()])

    def _index_rows(self, rows: list[tuple[Hashable, np.ndarray, str, str, float]]) -> None:
        """(near key, vector, fingerprint, text, done) rows into the near index, one call per class."""
        by_class: dict[Hashable, list[tuple]] = {}
        for row in rows:
            by_class.setdefault(row[0], []).append(row)
        for key, rs in by_class.items():
            self.index.add_near(key, np.stack([r[1] for r in rs]), [r[2] for r in rs], [r[3] for r in rs],
                                [r[4] for r in rs])
        self.indexed.update(r[2] for r in rows)

    def _index_near(self, stored: list[tuple[Item, Entry]]) -> None:
        todo = [(it, e) for it, e in stored if e.near_key is not None and e.fp not in self.indexed]
        if not todo:
            return
        vecs = featurize([it.req for it, _ in todo], dim=NEAR_DIM)
        self._index_rows([(e.near_key, v, e.fp, e.text, e.result.done_s or 0.0) for (_, e), v in zip(todo, vecs)])

    async def warm_from_redis(self) -> int:
        """Rebuild the near-duplicate index (and the memory layer, newest last) from Redis after a restart;
        returns how many entries were read. Entries of another tenant scope stay in Redis but can only be
        found under their own scope."""
        if self.redis is None or self.cfg.warm_max_entries == 0:
            return 0
        pairs = await self.redis.scan_values(self.cfg.warm_max_entries)
        entries: list[Entry] = []
        for _, raw in pairs:
            try:
                entries.append(decode(raw))
            except CorruptValue:
                self.stats["corrupt"] += 1
        entries.sort(key=lambda e: e.result.done_s or 0.0)
        near = [e for e in entries if e.near_key is not None]
        if near:
            # The same vectors as live requests get: the text and its parameters.
            vecs = featurize_texts([e.text for e in near], [e.params for e in near], dim=NEAR_DIM)
            self._index_rows([(e.near_key, v, e.fp, e.text, e.result.done_s or 0.0) for e, v in zip(near, vecs)])
        for e in entries[-self.cfg.memory_max_entries:]:
            self.memory.put(e, self.cfg.ttl_s)
        return len(entries)
