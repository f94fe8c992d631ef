"""The result hub: collects finished results for the drivers (long-poll) and keeps the running report.

Several drivers may share one engine (``Engine.connect``). Each claims the ids it submits (``claim``) and pulls
its own results (``pull(client=...)``); a result is handed to every driver that claimed its id, whichever came
first, the claim or the result (a result that came first is kept among the recent ones and handed over at the
claim). A hub that nobody claims from hands every result to its one puller."""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from actors._hub_owners import OwnerRecord
from actors._hub_stats import billed_behind, merge_reports, new_stats, stats_report, sum_figures, tally
from actors._peer import Warm
from actors.journal import MemoryJournalStore
from actors.logship import LogBook, ship_logs
from actors.metrics import EngineMetrics
from engine.core._logkeys import get_logger
from engine.core.response_owners import ResponseOwners
from engine.core.result import Result

__all__ = ["ResultHub", "merge_reports", "sum_figures"]

log = get_logger("smartbatch.hub")

# Results kept after delivery so that an ObjectRef asked for just as its result was pulled still resolves;
# the window between the driver's check and the hub's answer is milliseconds, far below this many results.
RECENT = 16_384
# A driver that has not pulled for this long (real seconds) is gone (killed without ``leave``): its queue is dropped.
# One that was only paused learns it at its next pull (``None``) and claims its open requests again.
CLIENT_IDLE_S = 900.0
DROPS_KEPT = 1024  # drivers dropped as idle lately, numbered, for ingest to read (``dropped_since``)
# A restarted shard holds its ``admit`` answers until every ingest shard gave the fingerprints back (the drivers'
# rewire), at most this long (real seconds): a driver that never rewires must not stop submits for good.
REGISTER_WAIT_S = 30.0


@dataclass(eq=False)
class _Client:
    ready: list = field(default_factory=list)
    event: asyncio.Event = field(default_factory=asyncio.Event)
    seen_at: float = field(default_factory=time.monotonic)

    def give(self, r: Result) -> None:
        self.ready.append(r)
        self.event.set()


class ResultHub(OwnerRecord, Warm, MemoryJournalStore):
    def __init__(self, ingests: int = 1, max_tenants: int = 100) -> None:
        self.metrics = EngineMetrics(max_tenants)  # settings.metrics.max_tenants: each shard keeps its own first ones
        self._ingests = ingests  # ingest shards, which give a restarted hub shard its fingerprints (``register``)
        self._unregistered: set[int] = set()
        self._registered: asyncio.Future | None = None
        self._registered_by = 0.0  # monotonic: when a restarted shard stops waiting for registrations
        self._clients: dict[str | None, _Client] = {None: _Client()}  # None: the one puller of an unclaimed hub
        self._owners: dict[str, list[str]] = {}  # claimed id -> the drivers waiting for its result
        self._routed = False  # set by the first claim
        self._next_idle_check = 0.0
        self._logs = LogBook()
        self._lost: set[str] = set()  # drivers dropped as idle: told so at their next pull, whatever came since
        self._drops: deque[tuple[int, str]] = deque(maxlen=DROPS_KEPT)  # (number, driver) of those drops
        self._next_drop = 0
        self._recent: OrderedDict[str, Result] = OrderedDict()
        self._fps: dict[str, str] = {}  # id -> its content's fingerprint, while ingest shards admit it (``admit``)
        self._waiters: dict[str, asyncio.Future] = {}
        self._cache: dict[int, dict] = {}  # cache shard -> its latest figures
        self._stats: dict = new_stats()
        self.responses = ResponseOwners()  # whose each provider response id is, for every driver (``owners_of``)

    def __repr__(self) -> str:
        waiting = sum(len(c.ready) for c in self._clients.values())
        return f"ResultHub(drivers={len(self._clients) - 1}, waiting={waiting}, seen={self._stats['requests']})"

    async def push(self, results: list[Result], list_prices: list[float] | None = None) -> None:
        recent = self._recent
        uids = [r.uid for r in results]  # once: a uid is made anew at every read, and each result needs it 4 times
        if any(u in recent for u in uids) or len(set(uids)) < len(uids):
            # A result sent again (a dispatcher answering a re-admitted request it had already finished): the
            # driver has it or will, and the report must not count it twice.
            billed_behind(self._stats, results, recent)
            seen: set[str] = set()
            keep = [k for k, u in enumerate(uids) if u not in recent and not (u in seen or seen.add(u))]
            results, uids = [results[k] for k in keep], [uids[k] for k in keep]
            list_prices = [list_prices[k] for k in keep] if list_prices else None
            if not results:
                return
        tally(self._stats, results, list_prices)
        self._learn_owners(results)  # before any driver has them: an id a driver holds is known here
        self.metrics.observe_results(results, list_prices)
        self._route(results, uids)
        waiters = self._waiters
        for u, r in zip(uids, results):
            recent[u] = r
            w = waiters.pop(u, None) if waiters else None
            if w is not None and not w.done():
                w.set_result(r)
        while len(recent) > RECENT:
            recent.popitem(last=False)

    def _route(self, results: list[Result], uids: list[str]) -> None:
        if not self._routed:
            one = self._clients[None]
            one.ready.extend(results)
            one.event.set()
            return
        owners, clients = self._owners, self._clients
        for u, r in zip(uids, results):
            for c in owners.pop(u, ()):
                q = clients.get(c)
                if q is not None:
                    q.give(r)
        now = time.monotonic()
        if now >= self._next_idle_check:
            self._next_idle_check = now + 10.0
            for c, q in list(clients.items()):
                if c is not None and now - q.seen_at > CLIENT_IDLE_S:
                    del clients[c]
                    self._lost.add(c)
                    self._drops.append((self._next_drop, c))
                    self._next_drop += 1

    def _client_queue(self, client: str) -> _Client:
        if not self._routed:  # the first claim: what the unclaimed queue held is claimed from the recent ones
            self._routed = True
            self._clients[None] = _Client()
        q = self._clients.get(client)
        if q is None:
            q = self._clients[client] = _Client()
        q.seen_at = time.monotonic()
        return q

    async def claim(self, client: str, uids: list[str], fps: list[str] | None = None) -> list[str]:
        """Driver ``client`` waits for the results of ``uids``: each is handed to it, at once if it is here.
        Returns the ids whose result is not here (still to come, or delivered too long ago). ``fps``: the
        fingerprints of their contents, kept for ``admit`` (a restarted ingest checks ids it no longer knows)."""
        if fps is not None:
            for u, fp in zip(uids, fps):
                self._fps.setdefault(u, fp)
        q = self._client_queue(client)
        recent, missing = self._recent, []
        for u in uids:
            r = recent.get(u)
            if r is not None:
                q.give(r)
            else:
                missing.append(u)
                owners = self._owners.setdefault(u, [])
                if client not in owners:
                    owners.append(client)
        return missing

    async def admit(self, client: str, uids: list[str], fps: list[str]) -> tuple[list[str], list[str], list[str]]:
        """``claim`` for ingest shards that split requests by class: an id must name one content across them,
        so this shard (the id's) keeps each claimed id's fingerprint until the id is forgotten. Returns the ids
        refused (claimed before with another fingerprint), those claimed before with this one (repeats, to an
        ingest restarted since), and the claimed ones whose result is not here (``claim``)."""
        if self._unregistered:
            await self._until_registered()
        known, refused, ok, repeats = self._fps, [], [], []
        for u, fp in zip(uids, fps):
            old = known.get(u)
            if old is None:
                known[u] = fp
                ok.append(u)
            elif old == fp:
                ok.append(u)
                if u not in self._owners:  # answered (or never claimed): one awaited may be lost in transit, and
                    repeats.append(u)  # its own driver's re-admission, not this repeat, generates it (a review)
            else:
                refused.append(u)
        return refused, repeats, await self.claim(client, ok)

    def reconstructed(self) -> None:
        """Restarted by Ray: the fingerprints are gone until the ingest shards give them back (``register``).
        Meanwhile ``admit`` waits: it took the first content to come for an id, and another driver's content
        under a used id got the first one's answer, the first one refused (a hunt, about a second after a kill)."""
        self._unregistered = set(range(self._ingests))
        self._registered_by = time.monotonic() + REGISTER_WAIT_S
        self._partial = True  # its response ids' owners too, until the drivers give them back (``_hub_owners``)

    async def _until_registered(self) -> None:
        """Every admit waits for the same end, so they go on together, in the order they came (a review: one that
        timed out let later ones pass while earlier ones waited on, and the first content lost the id)."""
        if self._registered is None:
            self._registered = asyncio.get_running_loop().create_future()
        try:
            left = self._registered_by - time.monotonic()
            await asyncio.wait_for(asyncio.shield(self._registered), max(left, 0.0))
        except asyncio.TimeoutError:
            if self._unregistered:
                log.warning("hub: ingest shard(s) %s gave no fingerprints in %.0f s after this hub restarted; "
                            "ids are admitted without them", sorted(self._unregistered), REGISTER_WAIT_S)
                self._unregistered.clear()
            if not self._registered.done():
                self._registered.set_result(None)

    async def register(self, uids: list[str], fps: list[str], shard: int | None = None) -> None:
        """The fingerprints of ids admitted before this shard restarted (``Ingest.reregister``), from ingest
        shard ``shard``: its record is the one that stands."""
        known, other = self._fps, 0
        for u, fp in zip(uids, fps):
            other += known.get(u, fp) != fp
            known[u] = fp
        if other:
            log.warning("hub: %d id(s) were admitted with other content before ingest gave theirs back", other)
        if shard is not None and shard in self._unregistered:
            self._unregistered.discard(shard)
            if not self._unregistered and self._registered is not None and not self._registered.done():
                self._registered.set_result(None)

    async def refuse(self, client: str | None, results: list[Result]) -> None:
        """Results for driver ``client`` alone (ingest refusing a request it sent): not the engine's results,
        so neither counted nor kept among the recent ones."""
        q = self._client_queue(client) if client is not None else self._clients[None]
        for r in results:
            q.give(r)

    async def set_logging(self, level: str, actor: str, hub=None) -> None:
        if actor == "hub" or hub is None:
            ship_logs(level, actor, self._logs.add)  # shard 0's own lines go straight to its book
        else:  # another shard's go to shard 0's, which the drivers read
            await super().set_logging(level, actor, hub)

    async def log(self, records: list) -> None:
        """Log lines shipped by the other actors (``actors.logship``)."""
        self._logs.add(records)

    async def logs_since(self, seq: int | None) -> tuple[list, int]:
        """The actors' log lines numbered ``seq`` and up, and the number to ask from next."""
        return self._logs.since(seq)

    async def leave(self, client: str) -> None:
        """Driver ``client`` left the engine (which runs on): its queue goes; results it claimed are not kept for it."""
        self._clients.pop(client, None)

    async def dropped_since(self, seq: int) -> tuple[list[str], int]:
        """The drivers dropped as idle numbered ``seq`` and up (still kept), and the number to ask from next:
        ingest forgets the ids only they held, which no ``leave`` will ever name (``Ingest.submit``)."""
        return [c for k, c in self._drops if k >= seq], self._next_drop

    async def quiet(self, clients: list[str], after_s: float) -> list[str]:
        """Of ``clients``, those that have not pulled here for ``after_s`` real seconds: gone, as a replica killed and
        replaced, if not yet dropped as idle. One it does not know is not: a restarted hub knows nobody (a review)."""
        now = time.monotonic()
        return [c for c in clients
                if c in self._lost or (q := self._clients.get(c)) is not None and now - q.seen_at > after_s]

    async def pulling(self, within_s: float) -> list[str]:
        """The drivers not ``quiet`` for ``within_s``: any may hold a request a restarted ingest does not know."""
        return [c for c in self._clients if c is not None and not await self.quiet([c], within_s)]

    async def undelivered(self, quiet_s: float) -> int:
        """Results waiting here for a driver that has pulled within ``quiet_s`` real seconds: what a stop now
        would take from drivers still reading (a stop's drain waits until there are none)."""
        now = time.monotonic()
        return sum(len(q.ready) for q in self._clients.values() if now - q.seen_at <= quiet_s)

    async def knows(self, client: str) -> bool:
        """Whether driver ``client`` pulls from here (a driver dropped as idle pulls again once it is back)."""
        return client in self._clients and client not in self._lost

    async def forget(self, uids: list[str]) -> None:
        for u in uids:
            self._recent.pop(u, None)
            self._fps.pop(u, None)

    async def recall(self, uids: list[str]) -> list[str]:
        """Of ``uids`` (re-admitted after a restart), those whose result is here (the driver has it or will)."""
        return [u for u in uids if u in self._recent]

    async def result_of(self, request_id: str) -> Result:
        """The result of one request (its ``Request.uid``), as soon as it exists: what
        ``ResultFuture.object_ref()`` resolves to."""
        r = self._recent.get(request_id)
        if r is not None:
            return r
        w = self._waiters.get(request_id)
        if w is None:
            w = self._waiters[request_id] = asyncio.get_running_loop().create_future()
        return await asyncio.shield(w)

    async def observe_dispatches(self, provider: str, observed: list[tuple[str, list[float], int]],
                                 counts: dict | None = None, in_flight: int | None = None) -> None:
        """A dispatcher's batched observations: dispatch waits, and (``DispatchCounts.as_dict()``) its retries, 429s,
        circuit states, flex refusals and timeouts, hedges, turnarounds and rate-limit waits since its last flush; its requests in flight."""
        self.metrics.observe_dispatches(provider, observed)
        if in_flight is not None:
            self.metrics.queue.labels(provider).set(in_flight)
        if counts:
            self.metrics.observe_counts(provider, counts)

    async def observe_budget(self, rows: list[dict], refusals: dict[str, int]) -> None:
        self.metrics.observe_budget(rows, refusals)

    async def observe_cache(self, delta: dict, now: dict, shard: int = 0) -> None:
        self._cache[shard] = now
        self.metrics.observe_cache(delta, sum_figures(self._cache.values()))

    async def serve_metrics(self, port: int = 0, host: str = "127.0.0.1") -> str:
        """Serve /metrics on ``host:port`` (port 0: a free one); returns the URL to scrape. A wildcard bind is
        reported with this node's address, so a driver on another machine can reach it."""
        port = self.metrics.serve(port, host)
        shown = host
        if host in ("0.0.0.0", "::", ""):
            import ray

            shown = ray.util.get_node_ip_address()
        return f"http://{shown}:{port}/metrics"

    async def pull(self, max_wait_s: float = 0.25, client: str | None = None) -> list[Result] | None:
        """The results for driver ``client`` finished since its last pull (every result, on a hub nobody claims
        from); waits up to ``max_wait_s`` when nothing is ready. ``None``: this hub does not know ``client``
        (it restarted, or dropped the driver as idle), so results may have been lost for it: it must claim
        its open requests again."""
        q = self._clients.get(client)
        if q is None or client in self._lost:  # only a named driver: the unclaimed queue always exists
            self._lost.discard(client)
            self._client_queue(client)
            return None
        q.seen_at = time.monotonic()
        if not q.ready:
            try:
                await asyncio.wait_for(q.event.wait(), timeout=max_wait_s)
            except asyncio.TimeoutError:
                return []
        out, q.ready = q.ready, []
        q.event.clear()
        q.seen_at = time.monotonic()
        return out

    async def report(self) -> dict:
        return stats_report(self._stats, sum_figures(self._cache.values()))
