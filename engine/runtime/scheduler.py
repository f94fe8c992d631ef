"""The open groups and the policy loop over them, shared by both runtimes (simulator and grouper actor).

``GroupTable.add`` puts a request in the group its policy names and asks the policy to decide;
``GroupTable.wake`` asks again when a waiting group's time comes. Both return what to do: dispatches to carry
out now, and at most one wake-up to schedule. The table checks every decision (mode available, size within
the provider's limit) so a runtime only carries out valid dispatches.

A policy that declares ``turnaround_learning`` (``engine.core.settings.TurnaroundLearning``, enabled) reads the
batch turnaround the runtime learned (``engine.runtime.turnaround``) instead of the catalog's: the runtime
``observe``s the batches it followed, and the table hands the policy the learned provider spec, in
``Group.provider`` and as ``group_key``'s ``provider`` argument. Its hours of day count from ``day_origin_s``
(``engine.core.settings.SimSettings.day_origin_s``), which every runtime of one run passes alike.
"""

from __future__ import annotations

from collections.abc import Container, Hashable, Iterable
from typing import NamedTuple

from engine.core._logkeys import get_logger
from engine.core.catalog import Catalog, ProviderSpec
from engine.core.cost import mode_allowed
from engine.core.errors import PolicyError
from engine.core.fallbacks import FallbackCalendar
from engine.core.grouping import (
    BudgetPressure,
    Decision,
    Group,
    LaneRates,
    PrefixSightings,
    PrefixWarmth,
    WarmNote,
)
from engine.core.request import Request
from engine.runtime.turnaround import Turnaround, TurnaroundEstimator

__all__ = ["Dispatch", "GroupFailed", "GroupTable", "Pulled", "Wake"]

log = get_logger("smartbatch.scheduler")


class Dispatch(NamedTuple):
    decision: Decision
    members: list[Request]


class GroupFailed(Exception):
    """The policy failed deciding a group: the group is gone from the table. ``dispatches``: what it decided
    before failing (valid, to carry out); ``members``: the group's other members, none of them decided (the
    runtime fails them, as it does the request whose arrival failed)."""

    def __init__(self, cause: BaseException, dispatches: list[Dispatch], members: list[Request]):
        super().__init__(str(cause))
        self.cause, self.dispatches, self.members = cause, dispatches, members


class Wake(NamedTuple):
    at: float
    group: Group
    version: int


class Pulled(NamedTuple):
    """What warmth the runtime learned set off (``GroupTable.warm``): dispatches to carry out now, wake-ups to
    schedule for the groups they left, and those groups whose decision then failed (the runtime fails their
    other members and carries out the dispatches decided before the failure)."""

    dispatches: list[Dispatch]
    wakes: list[Wake]
    failed: list[GroupFailed]


class GroupTable:
    def __init__(self, policy, catalog: Catalog, day_origin_s: float = 0.0, keep_going: bool = False):
        self.policy = policy
        # A runtime that goes on after a policy error (the grouper actor) is told what the failed decision leaves
        # (``GroupFailed``); the simulator stops at the policy's own error.
        self.keep_going = keep_going
        self.catalog = catalog
        self.groups: dict[Hashable, Group] = {}
        # The open groups of each lane (``Policy.arrival_key``), for ``Policy.riders``: kept in step with
        # ``groups`` by ``drop``.
        self._lanes: dict[Hashable, dict[Hashable, Group]] = {}
        self.sightings = PrefixSightings()
        self.rates = LaneRates()
        self.budget = BudgetPressure()  # the runtime keeps it current (``BudgetWaits.holding``)
        self.calendar = FallbackCalendar()  # every batch dispatch decided here, until its deadline
        # Every key under itself, unless the policy says which and under what (policies.base.Policy.arrival_key).
        self._arrival_key = getattr(policy, "arrival_key", lambda key: key)
        # A policy that declares it gets the budget pressure in ``group_key`` too (``budget=``), so it can route
        # a request at arrival; every policy sees it on the group.
        self._reads_budget = bool(getattr(policy, "reads_budget_pressure", False))
        # Likewise the prompt-cache warmth the runtime believes (``warm``), for a policy that declares it reads it.
        self.warmth = PrefixWarmth()
        self.reads_warmth = bool(getattr(policy, "reads_warmth", False))
        # ... and whether a request comes back from a dispatch (``returned``).
        self._reads_returned = bool(getattr(policy, "reads_returned", False))
        # A policy whose lane holds several groups may send some along in another's batch (``Policy.riders``).
        self._riders = getattr(policy, "riders", None)
        # The open groups that gather one prompt prefix (``Policy.prefix_run``), under (provider, model, run):
        # those a call that leaves the prefix warm may pull members from (``warm``). Kept in step by ``drop``.
        self._prefix_run = getattr(policy, "prefix_run", None) if self.reads_warmth else None
        self._runs: dict[tuple, dict[Hashable, Group]] = {}
        self._run_lengths: dict[int, int] = {}  # run length -> open groups indexed with it
        learning = getattr(policy, "turnaround_learning", None)  # declared by policies that read it
        self.turnarounds = (TurnaroundEstimator(catalog, learning, day_origin_s)
                            if learning is not None and learning.enabled else None)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())

    def __repr__(self) -> str:
        return f"GroupTable(policy={self.policy.name!r}, groups={len(self.groups)}, pending={len(self)})"

    def observe(self, obs: Iterable[Turnaround]) -> None:
        """Batches the runtime followed to their end (or cancelled late); they count from a later epoch."""
        if self.turnarounds is not None:
            self.turnarounds.observe(obs)

    def warm(self, notes: Iterable[WarmNote], now: float) -> Pulled:
        """Results the runtime received: prefix blocks warm at their provider until each note's ``until``. The
        groups that gather a prefix now warm are offered to the policy (``Policy.warm_pull``): the members it
        pulls are dispatched now, and each group that lost some is decided again (its wake-up is stale)."""
        notes = list(notes)
        self.warmth.see(notes, now)
        out = Pulled([], [], [])
        if not self._runs or not notes:
            return out
        touched: dict[int, Group] = {}
        for n in notes:
            for length in self._run_lengths:
                for g in self._runs.get((n.provider, n.model, n.blocks[:length]), {}).values():
                    touched.setdefault(id(g), g)
        for g in touched.values():
            if self.groups.get(g.key) is not g or not g.members:
                continue
            try:
                d, uids = self._pull(g, now)
            except Exception as exc:
                if not self.keep_going:
                    raise
                # Nothing changed: the group waits on for its wake-up, as if the warmth had not been heard of.
                log.warning("%s: warm_pull failed, the group waits on: %s", self.policy.name, exc)
                continue
            if not uids:
                continue
            out.dispatches.append(Dispatch(d, g.remove(uids)))
            if d.prefix is not None:
                self.sightings.see(d.prefix, now)
            if not g.members:
                self.drop(g)
                continue
            try:
                ds, wake = self._decide(g, now, now)  # its wake-up is stale: the group lost members
            except GroupFailed as gf:
                out.failed.append(gf)
                continue
            out.dispatches.extend(ds)
            if wake is not None:
                out.wakes.append(wake)
        return out

    def _pull(self, g: Group, now: float) -> tuple[Decision | None, set[str]]:
        """The policy's pull from ``g`` (``Policy.warm_pull``), checked before anything changes."""
        if self.turnarounds is not None:
            g.provider = self._view(g.members[0], now)
        pulled = self.policy.warm_pull(g, now, self.warmth)
        if pulled is None:
            return None, set()
        d, uids = pulled
        if d.action != "dispatch" or d.mode not in ("sync", "flex") or not mode_allowed(g.provider, g.spec, d.mode):
            raise PolicyError(f"{self.policy.name}: warm_pull must return a sync (or flex) dispatch, got {d.action!r} "
                              f"{d.mode!r}")
        uids = set(uids)
        if not uids <= {r.uid for r in g.members}:
            raise PolicyError(f"{self.policy.name}: warm_pull named requests that are not members of the group")
        return d, uids

    def relearn(self, day_origin_s: float | None = None) -> None:
        """Forget what was learned (a restarted grouper takes the dispatchers' history again), and count hours
        from ``day_origin_s`` when given."""
        if self.turnarounds is not None:
            old = self.turnarounds
            origin = old.day_origin_s if day_origin_s is None else day_origin_s
            self.turnarounds = TurnaroundEstimator(self.catalog, old.cfg, origin)

    def _view(self, req: Request, at: float) -> ProviderSpec:
        """The provider as the policy should see it at ``at``: with the learned turnaround of ``req``'s model."""
        prov = self.catalog.providers[req.provider]
        est = self.turnarounds
        if est is None:
            return prov
        est.advance(at)
        return est.provider(prov, req.model, at)

    def add(self, req: Request, compat: tuple, now: float,
            returned: bool = False) -> tuple[list[Dispatch], Wake | None]:
        """Group ``req`` and decide its group; ``returned``: it comes back from a dispatch (a batch cancelled
        late, a failed attempt)."""
        return self.decide(self.join(req, compat, now, returned), now)

    def join(self, req: Request, compat: tuple, now: float, returned: bool = False) -> Group:
        """Group ``req`` without deciding its group. Requests that arrive at one instant all join first, and
        each group they joined is then decided once (``decide``): decided one by one, the first of a burst was
        judged alone (a saving too small to wait for, so sync at the full price) while the rest of the burst
        filled a batch a moment later (a batch file's first lines, a ``submit_many``)."""
        kw = {"budget": self.budget} if self._reads_budget else {}
        if self.reads_warmth:
            kw["warmth"] = self.warmth
        if self.turnarounds is not None:
            kw["provider"] = self._view(req, now)
        if self._reads_returned:
            kw["returned"] = returned
        key = self.policy.group_key(req, compat, now, **kw)
        g = self.groups.get(key)
        rate_key = self._arrival_key(key)
        if g is None:
            prov = self.catalog.providers[req.provider]
            g = self.groups[key] = Group(key, prov, prov.models[req.model], sightings=self.sightings,
                                         rates=self.rates, rate_key=rate_key, budget=self.budget,
                                         calendar=self.calendar)
            if rate_key is not None and self._riders is not None:
                self._lanes.setdefault(rate_key, {})[key] = g
            run = self._prefix_run(key) if self._prefix_run is not None else None
            if run is not None:
                g.run = (req.provider, req.model, tuple(run))
                self._runs.setdefault(g.run, {})[key] = g
                self._run_lengths[len(run)] = self._run_lengths.get(len(run), 0) + 1
        if rate_key is not None:
            self.rates.see(rate_key, now)
        if returned:
            self.calendar.free(req.uid)
        g.add(req, returned)
        return g

    def decide(self, g: Group, now: float) -> tuple[list[Dispatch], Wake | None]:
        """Decide ``g`` now; nothing when it is no longer in the table (riders of a group decided before it)."""
        if self.groups.get(g.key) is not g:
            return [], None
        return self._decide(g, now, now)

    def wake(self, w: Wake, now: float) -> tuple[list[Dispatch], Wake | None]:
        """Re-decide a waiting group; a stale wake-up (the group changed or is gone) does nothing."""
        if self.groups.get(w.group.key) is not w.group or w.group.version != w.version:
            return [], None
        # The estimate of the time the wake-up was set for: a live grouper's timer fires a little later than
        # the simulator's event, and must not land in the next epoch for that.
        return self._decide(w.group, now, w.at)

    def _decide(self, g: Group, now: float, at: float) -> tuple[list[Dispatch], Wake | None]:
        out: list[Dispatch] = []
        try:
            return self._decide_loop(g, now, at, out)
        except Exception as exc:
            # Left in the table, the group would keep members its runtime failed (and dispatch them later, to a
            # runtime that no longer holds them), and the dispatches decided so far would be lost.
            self.drop(g)
            if not self.keep_going:
                raise
            raise GroupFailed(exc, out, list(g.members)) from exc

    def _decide_loop(self, g: Group, now: float, at: float, out: list[Dispatch]) -> tuple[list[Dispatch], Wake | None]:
        if self.turnarounds is not None and g.members:
            g.provider = self._view(g.members[0], at)
        joined = False
        while g.members:
            d: Decision = self.policy.decide(g, now)
            if (not joined and d.action == "dispatch" and d.mode == "batch_api"
                    and (d.take <= 0 or d.take >= len(g.members)) and self._join_riders(g, now)):
                joined = True
                continue  # decided again with its riders: the batch's hedge is theirs too
            if d.action == "wait":
                if d.wake_at is None:
                    return out, None
                if not d.wake_at > now:
                    raise PolicyError(f"{self.policy.name}: wait until {d.wake_at} is not after now={now}; "
                                      "return a later wake_at or dispatch")
                return out, Wake(d.wake_at, g, g.version)
            out.append(Dispatch(d, g.take(self._checked_take(g, d))))
            if d.fallback is not None and out[-1].members:
                self.calendar.reserve(out[-1].members[0].provider, d.fallback, (r.uid for r in out[-1].members),
                                      now)
            if d.prefix is not None and d.mode == "batch_api" and d.hedge_at is not None:
                if not isinstance(d.prefix, tuple) or len(d.prefix) != len(out[-1].members):
                    raise PolicyError(f"{self.policy.name}: a batch_api dispatch's prefix must be a tuple of one key "
                                      f"(or None) per member taken ({len(out[-1].members)}), got {d.prefix!r}")
                readers: dict[Hashable, list] = {}  # per key: one rebuild of its expectations, not one per member
                for r, key in zip(out[-1].members, d.prefix, strict=True):
                    if key is not None:
                        readers.setdefault(key, []).append((r.uid, r.prefix_blocks))
                for key, rs in readers.items():
                    self.sightings.expect(key, d.hedge_at, rs, now)
            elif d.prefix is not None:
                self.sightings.see(d.prefix, now)
        self.drop(g)
        return out, None

    def drop(self, g: Group) -> None:
        """Remove ``g`` from the table (and its lane's index), if it is still there."""
        if self.groups.get(g.key) is g:
            del self.groups[g.key]
            lane = self._lanes.get(g.rate_key)
            if lane is not None and lane.get(g.key) is g:
                del lane[g.key]
                if not lane:
                    del self._lanes[g.rate_key]
            runs = self._runs.get(g.run) if g.run is not None else None
            if runs is not None and runs.get(g.key) is g:
                del runs[g.key]
                if not runs:
                    del self._runs[g.run]
                length = len(g.run[2])
                self._run_lengths[length] -= 1
                if not self._run_lengths[length]:
                    del self._run_lengths[length]

    def withdraw(self, uids: Container[str]) -> tuple[list[Request], list[Group]]:
        """Take the members whose uid is in ``uids`` out of their groups (their driver withdrew them): those
        taken, and the groups that lost some and still hold others, to be decided again (their wake-ups are
        stale now). A group left empty leaves the table."""
        out: list[Request] = []
        changed: list[Group] = []
        self.sightings.forget(uids)  # those in a batch are not called for when it is late: marked for, read by no one
        for g in list(self.groups.values()):
            gone = g.remove(uids)
            if gone:
                out += gone
                if g.members:
                    changed.append(g)
                else:
                    self.drop(g)
        return out, changed

    def _join_riders(self, g: Group, now: float) -> bool:
        """Move into ``g`` the other groups of its lane that the policy sends along in ``g``'s batch (one
        provider batch, not one per group); whether any came."""
        lane = self._lanes.get(g.rate_key) if self._riders is not None else None
        if not lane:
            return False
        open_ = [other for other in lane.values() if other is not g and other.members]
        if not open_:
            return False
        riders = self._riders(g, open_, now)
        model = (g.provider.name, g.members[0].model)
        for r in riders:
            if (self.groups.get(r.key) is not r or r is g or r.rate_key != g.rate_key
                    or (r.provider.name, r.members[0].model) != model):
                raise PolicyError(f"{self.policy.name}: riders() named a group that is not another open group "
                                  f"of {g.key!r}'s lane, at its provider and model")
        if len({id(r) for r in riders}) != len(riders):
            raise PolicyError(f"{self.policy.name}: riders() named a group twice (its members would be sent twice)")
        for r in riders:
            self.drop(r)
            for m in r.members:
                g.add(m, m.uid in r.returned)
        return bool(riders)

    def _checked_take(self, g: Group, d: Decision) -> int:
        mode = d.mode
        if mode not in ("sync", "batch_api", "gpu_batch", "flex") or not mode_allowed(g.provider, g.spec, mode):
            raise PolicyError(f"{self.policy.name}: mode {mode!r} is not available for "
                              f"{g.provider.name}/{g.members[0].model}")
        take = d.take if d.take > 0 else len(g.members)
        limit = (g.provider.batch_api.max_requests if mode == "batch_api"
                 else g.provider.gpu_batching.max_batch if mode == "gpu_batch" else None)
        if limit is not None and take > limit:
            raise PolicyError(f"{self.policy.name}: a {mode} dispatch of {take} exceeds the provider limit {limit}")
        return take
