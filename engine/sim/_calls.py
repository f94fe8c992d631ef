"""The simulator's provider side: starting what a provider's gates let go (sync calls, GPU batches, batch-API
batches, reroutes), ending batch-API batches, and the warmth notes their results give the policy. A mixin of
the simulator: it uses its state (``providers``, ``table``, ``batches``, ``settle_claim``, ``settle``, ...)."""

from __future__ import annotations

import dataclasses
import math

from engine.core.features import compat_key
from engine.core.grouping import Decision, WarmNote
from engine.core.request import Request
from engine.runtime.providers import Event
from engine.runtime.turnaround import Turnaround, submitted
from engine.sim.results import _BATCH, _FLEX, _GPU, _SYNC


class SimCalls:
    """Provider-side methods of the simulator."""

    def pump(self, name: str) -> None:
        prov = self.providers[name]
        events, nxt = prov.pump(self.now)
        for e in events:
            getattr(self, "start_" + e.kind)(e)
        if nxt is not None and nxt < self.pump_at.get(name, math.inf):
            self.pump_at[name] = nxt
            self.push(nxt, "pump", name)

    def start_flex(self, e: Event) -> None:
        if e.outcome.refused:  # billed nothing and no attempt spent: at the standard tier, at once
            self.flex_refused += 1
            self.push(e.outcome.at, *self.standard_again(e.work))
        else:
            self.start_sync(e, _FLEX)

    def start_to_standard(self, e: Event) -> None:
        """The gate would start a flex call standard (``SimProvider.pump``) whose claim holds the flex price."""
        self.push(self.now, "restandard", e.work)

    def standard_again(self, w) -> tuple[str, object]:
        """The event that sends flex work ``w`` at the standard tier: queued again at once, or, where its claim
        holds the flex price, reserved again at the standard price first (``on_restandard``)."""
        return ("restandard", w) if w.idxs[0] in self.claim_of else ("requeue", w._replace(kind="sync"))

    def on_restandard(self, w) -> None:
        """Flex work ``w`` goes standard: its flex claim (unbilled) is released and the standard price reserved
        before the call is queued, as a decision to send it sync would (held by its budget, it waits as held work
        does; past its deadline, rejected). Sent on its flex claim, a standard call could bill twice what it held
        and pass a hard budget."""
        i = w.idxs[0]
        self.settle_claim_now(i)
        rec = self.batches[w.item]
        self.send(Decision("dispatch", mode="sync", cache_write=w.cache_write, recommendation=rec.recommendation,
                           reason=rec.reason), [i], w.item)

    def start_sync(self, e: Event, mode: int = _SYNC) -> None:
        w, a = e.work, e.outcome
        i = w.idxs[0]
        k = w.attempts[0]
        self.attempts[i] = k + 1
        if a.ok:
            self.settle_claim(i, a.cost, a.at)
            self.complete(i, a.at, a.cost, mode, w.item)
            self.push(a.at, "sync_ok", i)
            if a.cached and self.table.reads_warmth:  # learnt with the result; warm from the call's start
                self.push(a.at, "warm", [self.warm_note(w.reqs[0], a.cached, e.start)])
        else:
            self.push(a.at, "sync_fail", (i, k, a, w))

    def start_gpu_batch(self, e: Event) -> None:
        for i, a in zip(e.work.idxs, e.outcome):
            self.settle_claim(i, a.cost if a.ok else 0.0, a.at)
            self.settle(i, a, _GPU, e.work.item)

    def start_batch_api(self, e: Event) -> None:
        w, out = e.work, e.outcome
        if submitted(e.start, w.hedge_at):  # told its end when drawn; read from an epoch past it, as a grouper
            self.table.observe([Turnaround(w.reqs[0].provider, w.reqs[0].model, e.start, out.at, out.hedged)])
        if out.hedged:
            self.batches[w.item] = dataclasses.replace(self.batches[w.item], outcome="hedged")
            self.batch_of[w.idxs] = w.item
        self.push(out.at, "hedge" if out.hedged else "batch_end", w.idxs if out.hedged else (w, out, e.start))

    def on_batch_end(self, payload) -> None:  # its members use the cache now (``SimProvider.end_batch``)
        w, out, start = payload
        notes = []
        for i, r, a in zip(w.idxs, w.reqs, self.providers[w.reqs[0].provider].end_batch(out)):
            self.settle_claim(i, a.cost if a.ok else 0.0, a.at)
            self.settle(i, a, _BATCH, w.item)
            if a.cached and self.table.reads_warmth:
                notes.append(self.warm_note(r, a.cached, start))
        self.on_warm(notes)

    def warm_note(self, r: Request, cached: int, start: float) -> WarmNote:
        """What the runtime learns with a result (the simulator's batches run at their end, and stay warm longer
        than the note says)."""
        ttl = self.catalog.providers[r.provider].cache_of(r.model).ttl_s  # type: ignore[union-attr]
        return WarmNote.of(r, cached, start, ttl, self.settings.prefix_block_tokens)

    def on_warm(self, notes: list[WarmNote]) -> None:
        if notes:
            pulled = self.table.warm(notes, self.now)  # the simulator stops at a policy's error (no ``failed``)
            self.apply(pulled.dispatches, None)
            for w in pulled.wakes:
                self.push(w.at, "wake", w)

    def start_reroute(self, e: Event) -> None:
        """The model's circuit is open: its work goes back to the policy as requests for the fallback."""
        provider, model = e.outcome.split("/", 1)
        self.rerouted += len(e.work.idxs)
        for i in e.work.idxs:
            self.settle_claim(i, 0.0, self.now)
            self.moved.add(i)
            self.reqs[i] = self.reqs[i].model_copy(update={"provider": provider, "model": model})
            self.compat[i] = compat_key(self.reqs[i])
            self.admit(i, fresh=False)
