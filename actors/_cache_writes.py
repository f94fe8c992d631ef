"""The cache actor's writes: a finished request's result stored (memory, Redis, the blob store for a large
output) for as long as its output is served, and the requests that followed it answered. Split from
``actors.cache`` (a mixin placed first in ``ResultCache``'s bases)."""

from __future__ import annotations

from actors._near_index import Item
from actors.cache_layers import Entry, encode
from engine.core._logkeys import get_logger
from engine.core.features import near_text
from engine.core.result import Result
from engine.runtime.outcomes import reused_result

__all__ = ["CacheWrites"]

log = get_logger("smartbatch.cache")


class CacheWrites:
    """``ResultCache``'s writes (its layers and state are ``ResultCache``'s)."""

    def _entry(self, item: Item, res: Result) -> Entry | None:
        """The entry to store of ``res``; None when its output cannot be kept (the blob store failed)."""
        blob = None
        output = res.output
        # A reuse is answered from the output alone (``reused_result``): the provider's raw body (a base64 image
        # in it) was kept beside it in memory and in Redis, outside the size the memory limit counts (a helper's
        # hunt: 50 MB held under a 1 MB limit).
        if res.raw is not None:
            res = res.model_copy(update={"raw": None})
        if output is not None and len(output) > self.cfg.blob_min_kb * 1024:
            try:
                blob = self.blobs.put(output.encode())
            except Exception as exc:
                # A store that cannot write (a full disk) loses this entry, nothing more: raised from here, it
                # failed the whole ``complete``, and the followers of this result and of those after it were
                # never answered; the sweep had them generated and paid again (a helper's hunt).
                self.stats["blob_errors"] += 1
                log.warning("cache: blob store could not keep a %d-character output (%s: %s): not cached",
                            len(output), type(exc).__name__, exc)
                return None
            res = res.model_copy(update={"output": None})
            self.stats["blobs"] += 1
        return Entry(item.fp, res, self._near_key(item) if self.reuse.near else None, near_text(item.req), blob,
                     dict(item.req.params))

    def _life(self, item: Item) -> float:
        """Engine seconds an entry is served: ``cache.ttl_s``, but a media output whose provider keeps it at its
        address for a while (``output_ttl_s``: a Sora video an hour) for nine tenths of that, so a copy served has
        time to be fetched. Kept 7 days, an exact copy answered a dead address at $0 (a helper's tour)."""
        life = self.catalog.model(item.req.provider, item.req.model).output_ttl_s
        return self.cfg.ttl_s if life is None else min(self.cfg.ttl_s, 0.9 * life)

    async def complete(self, done: list[tuple[str, Result]]) -> None:
        """Requests finished: store the results that may feed the cache and resolve the requests attached."""
        out: list[Result] = []
        out_items: list[Item] = []
        stored: list[tuple[Item, Entry]] = []
        for fp, res in done:
            item = self.generating.pop(res.uid, None)
            if item is None:
                continue
            if res.status != "ok":
                self.inflight.drop(fp, res.uid)  # its followers wait for ``orphans``, which generates them
                continue
            # A leader rerouted to its fallback model (it keeps its fingerprint) made another model's output: its
            # followers take it as the leader did, but it is no stored answer to the original model (as in the
            # simulator), so no entry (nor blob) is made of it.
            if res.model is None or (res.provider, res.model) == (item.req.provider, item.req.model):
                e = self._entry(item, res)
                if e is not None:
                    self.memory.put(e, self._life(item))
                    stored.append((item, e))
            at = res.done_s or self._now()
            for f, how in self.inflight.done(fp, item):
                # One that arrived once the result existed (it reached this cache later) found it stored, as
                # the simulator says: an exact hit, resolved on arrival.
                hit = "near" if how == "near" else "exact" if f.req.arrival_s >= at else "in_flight"
                # The output in hand, not read back from the blob store: a blob that cannot be read back (a
                # damaged file under its name, a store that lost it) must not drop the followers.
                out.append(reused_result(f.req, at=max(at, f.req.arrival_s), hit=hit, source_id=res.id,
                                         output=res.output, made_by=(res.provider, res.model) if res.model else None,
                                         tool_calls=res.tool_calls, finish=res.finish, usage=res.usage))
                out_items.append(f)
        # The followers left the in-flight table above: they are held for ``recall`` from now, not from their
        # delivery after the awaits below, or a re-admission meanwhile generates them a second time.
        prices = self._held(out, out_items) if out else []
        self._answered()
        if stored:
            self._index_leaders({})
            self._index_near(stored)
            if self.redis is not None:
                await self.redis.put_many([(self.redis.key(self._scope(it), e.fp), encode(e),
                                            int(self._life(it) * 1000 / self._speedup())) for it, e in stored])
        self._warm_when_up()
        if out:
            await self._deliver(out, out_items, prices)
        await self._report()
