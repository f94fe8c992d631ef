"""The result cache's near-duplicate index: requests about to lead are indexed by embedding so near
duplicates arriving while they are generated can follow them, and stored results so later ones can be reused.
A mixin of ``ResultCache``: it uses the cache's state."""

from __future__ import annotations

import asyncio
import math
import sys
from collections import deque
from collections.abc import Hashable
from itertools import islice
from typing import TYPE_CHECKING

from actors._shards import key_shard
from actors._types import Job
from actors.cache_layers import CorruptValue, Entry, decode
from engine.core._logkeys import get_logger
from engine.core.features import NEAR_DIM, near_text, near_vectors_texts
from engine.core.result import Result
from engine.core.similarity import guard_between, guard_reason, traits
from engine.runtime.reuse import Top, class_threshold

if TYPE_CHECKING:
    import numpy as np

Item = Job
log = get_logger("smartbatch.cache")
FOLLOWING = Result(id="", status="reused")  # marker: attached to a near duplicate in flight
LEADS = Result(id="", status="failed")  # marker: generated, and a source for the asks after it
# Characters of prompt featurised between two yields of the event loop: about 0.05 s of work (15-22 us per 100
# characters measured), so a ping waits for a slice, not for a whole lookup of long prompts.
YIELD_CHARS = 262_144
ROW_BYTES = 4 * NEAR_DIM + 256  # what a row weighs beside its text: its vector, its tuples and its parameters


class NearIndex:
    """Near-duplicate index methods of ``ResultCache``."""

    async def _near(self, batch: list[Item], order: list[int], now: float) -> tuple[list[Result], dict]:
        """Decide the items of ``batch`` at positions ``order`` (every one of a near-duplicate class with a near
        ask in this lookup, in arrival order): a near hit, FOLLOWING (an identical or near request in flight)
        or LEADS (generated); and the vectors of those that lead, by request id.

        Each is decided as if it had arrived alone, as the simulator admits them: an identical request in
        flight first, then the top near match, the best of the index and of the items before it that lead;
        only that match is weighed, against the threshold and every guard."""
        # numpy where a vector is built, not at import: every engine actor imports this module (Ray loads the
        # class of each peer's handle it is given), and only a cache that looks up near duplicates needs it.
        import numpy as np

        items = [batch[p] for p in order]
        # An identical request in flight is followed first, and now: the awaits below let the loop go, and a
        # ``complete`` run meanwhile would take its leader (and its followers) away, leaving this request to be
        # generated a second time. Nothing decided below can change whom it follows: a leader of its
        # fingerprint, in flight now, keeps leading it.
        attached = {k for k, it in enumerate(items) if it.req.reuse != "none" and self._attach(it)}
        self._index_leaders({})  # leaders of earlier lookups must be findable now
        by_class: dict[Hashable, list[int]] = {}
        for k, it in enumerate(items):
            by_class.setdefault(self._near_key(it), []).append(k)
        await self._materialise(list(by_class))
        vecs = await self._vectors([near_text(it.req) for it in items], [it.req.params for it in items])
        tops: dict[int, Top] = {}
        # The policy's threshold, raised to the tuned minimum of the class's kind, as the simulator's index does.
        th = {key: class_threshold(key, self.near_threshold) for key in by_class}
        for key, ks in by_class.items():
            q = [k for k in ks if self._wants_near(items[k]) and k not in attached]
            for k, top in zip(q, self.index.top_many(key, vecs[q])):
                if top is not None and top.similarity >= th[key]:
                    tops[k] = top
        ks = list(tops)
        stored = (await self._fetch([(self._scope(items[k]), tops[k].source) for k in ks]))[0] if ks else []
        # Memory again, as an exact ask does: a top match in flight may have completed while this waited on Redis
        # (a slow one: up to its timeout), its followers gone with it; read before, the ask found neither the
        # entry nor the leader and was generated a second time (a helper's hunt).
        entry_of = {k: e if e is not None else self.memory.get(tops[k].source) for k, e in zip(ks, stored)}
        out: list[Result] = [LEADS] * len(items)
        for key, ks in by_class.items():
            sims = vecs[ks] @ vecs[ks].T
            leads: list[int] = []  # positions in ks of the items that lead, in order
            lead_fps: set[str] = set()  # their fingerprints (``_lead_now`` keeps both)
            for a, k in enumerate(ks):
                it = items[k]
                if k in attached or (it.req.reuse != "none" and self._attach(it)):
                    out[k] = FOLLOWING
                    continue
                if not self._wants_near(it) or it.fp in lead_fps:
                    # No near ask, or identical to one that leads and is due later: generated.
                    out[k] = self._lead_now(it, leads, lead_fps, a)
                    continue
                top = tops.get(k)
                b = leads[int(np.argmax(sims[a, leads]))] if leads else None  # the first best, as max() picks
                if b is not None and sims[a, b] >= th[key] and (top is None or sims[a, b] > top.similarity):
                    src = items[ks[b]]
                    if (guard_reason(near_text(it.req), near_text(src.req), self.reuse.guards) is None
                            and self._follow_near(it, src.fp)):
                        out[k] = FOLLOWING
                    else:
                        out[k] = self._lead_now(it, leads, lead_fps, a)
                    continue
                if top is not None and guard_between(traits(near_text(it.req)), top.traits(),
                                                     self.reuse.guards) is None:
                    e = entry_of.get(k)
                    if e is not None:
                        res = self._reused(it, e, "near", max(now, it.req.arrival_s), top.similarity)
                        if res is not None:
                            self.stats["near"] += 1
                            out[k] = res
                            continue
                    elif self._follow_near(it, top.source):
                        out[k] = FOLLOWING
                        continue
                    else:
                        self.stats["stale_near"] += 1  # failed, expired or evicted since it was indexed
                out[k] = self._lead_now(it, leads, lead_fps, a)
        return out, {it.req.uid: vecs[k] for k, it in enumerate(items) if out[k] is LEADS}

    def _lead_now(self, item: Item, leads: list[int], lead_fps: set[str], a: int) -> Result:
        """``item`` leads from here on, so the asks after it in this lookup may follow it."""
        self._lead(item)
        leads.append(a)
        lead_fps.add(item.fp)
        return LEADS

    def _follow_near(self, item: Item, fp: str) -> bool:
        """Follow the leader of ``fp``, a near duplicate in flight, under ``admission.may_follow``."""
        if not self._follow(fp, item, "near"):
            return False
        self.stats["near"] += 1
        return True

    async def _vectors(self, texts: list[str], params: list[dict]) -> np.ndarray:
        """``near_vectors_texts``, ``YIELD_CHARS`` of prompt at a time with the event loop let go between:
        a lookup of a thousand long prompts is seconds of CPU, and the driver's health check must be answered
        meanwhile, or a busy cache is killed as a hung one and its open work re-admitted onto a cache that
        is busier still. Rows are equal to one call's (each row is featurised on its own)."""
        import numpy as np
        out, start = [], 0
        while start < len(texts):
            stop, size = start + 1, len(texts[start])
            while stop < len(texts) and size + len(texts[stop]) <= YIELD_CHARS:
                size += len(texts[stop])
                stop += 1
            if start:
                await asyncio.sleep(0)
            out.append(near_vectors_texts(texts[start:stop], params[start:stop]))
            start = stop
        return np.concatenate(out) if out else np.empty((0, NEAR_DIM), dtype=np.float32)

    def _index_leaders(self, vecs: dict) -> None:
        """Index the requests that started generating, so near duplicates arriving meanwhile can follow them
        (the simulator's index holds a dispatched request too). ``vecs``: vectors already made, by id; the
        others are made when a near ask of their class needs them (``_materialise``)."""
        leading, self._new_leads = self._new_leads, []
        if not self.reuse.near:
            return
        self._queue_rows([(self._near_key(it), it.fp, near_text(it.req), dict(it.req.params), math.inf,
                           vecs.get(it.req.uid)) for it in leading])

    def _queue_rows(self, rows: list[tuple[Hashable, str, str, dict, float, np.ndarray | None]],
                    stored_at: list[float] | None = None) -> None:
        """(near key, fingerprint, text, params, done, vector or None) rows for the near index, in order. Their
        vectors are made only when a near ask of their class comes (``_materialise``): most requests ask for
        exact reuse only (the default), and a vector costs about 6 ms per 16 kB of prompt, so making one for
        every result made the cache the engine's bottleneck on long prompts whether or not anyone asked near.
        Then the oldest rows past the index's bounds are evicted (``_bound_near``). ``stored_at``: when each
        row's result was stored, if before now (rows warmed from Redis), oldest first; their age counts."""
        now = self._now()
        for k, (key, fp, text, params, done, vec) in enumerate(rows):
            if fp in self.indexed:
                continue
            self.indexed.add(fp)
            self._pending.setdefault(key, deque()).append((fp, text, params, done, vec))
            # The text's bytes, not its characters: CPython keeps a CJK character in 2 bytes and an emoji in 4,
            # so counting characters let an 8 MiB bound hold 15 MiB of Chinese or 30 MiB of emoji.
            size = sys.getsizeof(text) + ROW_BYTES
            self._near_rows.append((key, fp, size, now if stored_at is None else stored_at[k]))
            self._near_bytes += size
        self._bound_near(now)

    def _bound_near(self, now: float) -> None:
        """Evict the oldest rows, indexed or still queued, while the index holds more than
        ``cache.near_max_entries`` rows or ``cache.near_max_mb`` of text and vectors, or rows older than the
        cache's TTL (their results have expired from every layer). Without a bound a long-running engine kept
        every generated prompt's text: 20,000 results of 16 kB held 307 MB. Oldest first, as the results
        themselves leave Redis; a class's indexed rows are all older than its queued ones, so its oldest row
        is the index's if it has any, else the queue's head."""
        order, cfg = self._near_rows, self.cfg
        max_rows, max_bytes, oldest = cfg.near_max_entries, cfg.near_max_mb * 2**20, now - cfg.ttl_s
        drop: dict[Hashable, int] = {}
        while order and (len(order) > max_rows or self._near_bytes > max_bytes or order[0][3] < oldest):
            key, fp, size, _ = order.popleft()
            self._near_bytes -= size
            self.indexed.discard(fp)
            drop[key] = drop.get(key, 0) + 1
        for key, k in drop.items():
            k -= len(self.index.drop_oldest(key, k))
            queued = self._pending.get(key)
            if k and queued:
                for _ in range(min(k, len(queued))):
                    queued.popleft()
                if not queued:
                    del self._pending[key]
        self.stats["near_evicted"] += sum(drop.values())

    async def _materialise(self, keys: list[Hashable]) -> None:
        """Index the queued rows of these classes, in the order they were queued, their vectors made now."""
        import numpy as np
        snap = {key: list(self._pending.get(key, ())) for key in keys}
        need = [row for rows in snap.values() for row in rows if row[4] is None]
        made = await self._vectors([r[1] for r in need], [r[2] for r in need]) if need else ()
        vec_of = {id(r): v for r, v in zip(need, made)}
        for key, rows in snap.items():
            mine = {id(r) for r in rows}
            queued = self._pending.get(key, deque())
            # Another lookup may have indexed some meanwhile, or ``_bound_near`` evicted the oldest: those are
            # gone from the queue. Ours that are left are its head (rows queued since come after them), so the
            # order is kept.
            take = [r for r in queued if id(r) in mine]
            if not take:
                continue
            rest = deque(islice(queued, len(take), None))
            if rest:
                self._pending[key] = rest
            else:
                self._pending.pop(key, None)
            self.index.add_near(key, np.stack([r[4] if r[4] is not None else vec_of[id(r)] for r in take]),
                                [r[0] for r in take], [r[1] for r in take], [r[3] for r in take])

    def _index_near(self, stored: list[tuple[Item, Entry]]) -> None:
        self._queue_rows([(e.near_key, e.fp, e.text, e.params or {}, e.result.done_s or 0.0, None)
                          for _, e in stored if e.near_key is not None])

    async def warm_from_redis(self) -> int:
        """Rebuild the near-duplicate index (and the memory layer, newest last) from Redis after a restart;
        returns how many entries were read. Entries of another tenant scope stay in Redis but can only be
        found under their own scope."""
        if self.redis is None or self.cfg.warm_max_entries == 0 or self.__dict__.get("_warmed"):
            return 0  # once per incarnation: each driver of a shared engine rewires a restarted cache
        self._warmed = True  # set before the await: a second rewiring meanwhile must not warm twice
        try:
            pairs = await self.redis.scan_values(self.cfg.warm_max_entries)
        except BaseException:  # not read: the next rewiring tries again
            self._warmed = False
            raise
        if pairs is None:
            # Redis down or failing: read again once it answers (``_warm_when_up``). Counted as done, the warm
            # of a cache restarted while Redis was away never came, and for that incarnation's life no near
            # duplicate of a result stored before it was found: each was generated again (a helper's hunt).
            self._warmed, self._warm_later = False, True
            self._probe_while_down()  # an idle cache warms once Redis answers a PING, not at its first lookup
            return 0
        # Each keeps the life its Redis key has left, not a new TTL: its time and ``done_s`` are another
        # incarnation's clock, and a restart must not extend what it stored (a row served a day past its TTL).
        # Redis counts it in real seconds, the memory layer and the index in engine ones (as ``_fetch`` converts
        # it): read as engine seconds, a warmed row of a 100x engine lived a hundredth of its life (a hunt).
        ttl_s, speedup = self.cfg.ttl_s, self._speedup()
        entries: list[tuple[float, Entry]] = []  # (engine seconds left, entry)
        for _, raw, left_ms in pairs:
            try:
                entries.append((ttl_s if left_ms < 0 else min(left_ms / 1000 * speedup, ttl_s), decode(raw)))
            except CorruptValue:
                self.stats["corrupt"] += 1
        entries.sort(key=lambda le: le[0])  # oldest first: the least life left
        k, n = getattr(self, "shard", (0, 1))  # another shard's classes are found there, not here
        near = [(left, e) for left, e in entries if e.near_key is not None and key_shard(e.near_key[1], n) == k]
        # The same vectors as live requests get (the text and its parameters), made when a near ask needs them.
        now = self._now()
        self._queue_rows([(e.near_key, e.fp, e.text, e.params or {}, e.result.done_s or 0.0, None) for _, e in near],
                         [now - (ttl_s - left) for left, _ in near])
        for left, e in entries[-self.cfg.memory_max_entries:]:
            if self.memory.get(e.fp) is None:  # a late warm (below) keeps what this incarnation stored since
                self.memory.put(e, left)
        return len(entries)

    def _warm_when_up(self) -> None:
        """Warm again, in the background, once Redis answers after a warm that could not read it."""
        if self._warm_later and self.redis is not None and self.redis.up:
            self._warm_later = False
            self._warming = asyncio.get_running_loop().create_task(self._warm_again())

    async def _warm_again(self) -> None:
        try:
            await self.warm_from_redis()
        except Exception as exc:  # a task's error is nobody's to see: said here, and the next answer retries
            self._warm_later = True
            log.warning("cache: warming from Redis failed again: %s: %s", type(exc).__name__, exc)
