"""The grouper's budget side (a mixin of ``actors.grouper.Grouper``, which owns the state): the reservation of a
dispatch's members, and the waits of those a budget holds back, under the kernel's rule
(``engine.runtime.waiting.BudgetWaits``, which the simulator applies too) with a timer."""

from __future__ import annotations

import asyncio

from actors._peer import RESTART_POLL_S, restarting
from actors._types import BatchJob, Job
from engine.core._logkeys import get_logger, words
from engine.core.budgets import LEDGER, Claim, Verdict
from engine.core.result import Result
from engine.runtime.reservation import claim_amount, dispatch_mode, triage
from engine.runtime.waiting import STEP_S, Held, held_too_long, tiers

log = get_logger("smartbatch.grouper")
LOST_CHECK_S = 60.0  # how long a re-admitted job waits for its dispatcher to say whether it holds it
DISPATCHED_KEPT = 65_536  # claims of dispatched requests a grouper remembers (``Grouper._dispatched``)

__all__ = ["Parking"]



class Parking:
    """Needs the grouper's ``clock``, ``catalog``, ``budget``, ``budget_specs``, ``table``, ``waits``,
    ``reserve_model_max``, ``_park_timer``, ``_trying``, ``_reserving``, ``_tasks``, ``_ledger_down``,
    ``_unsure_claims``, ``_claims``, ``_claim_prefix``, ``_dispatch``, ``_resolve`` and ``_failed``."""

    # Engine seconds between tries of held work, as in the simulator, at any speed-up. A floor of 50 ms of real
    # time made it 10 engine seconds at 200x: held urgent work with a 60 s deadline was tried a few times and
    # given up while room had freed (a helper's tour). What bounds the load instead is one try at a time: the
    # next is armed once the last one's reservation has answered (``_retry_parked``).
    _park_step = STEP_S

    def _lost_claim(self, job: Job) -> str | None:
        """``job`` was re-admitted by ingest, which found that nobody it asked holds it: the claim of its last
        dispatch here, to release if its dispatcher does not hold it either (``_check_lost``). Not a rerouted
        job's: its old claim, of another model, is settled by its dispatcher."""
        held = self._dispatched.pop(job.req.uid, None)
        if held is not None and held[1:] == (job.req.provider, job.req.model):
            return held[0]
        return None

    def _check_lost(self, lost: list[tuple[Job, str]]) -> None:
        """Judge the old claims of re-admitted jobs, then add the jobs: in a task of its own, so a dispatcher slow
        to answer (restarting: it reads its journal first) holds back no other work (a review), and held out of
        their groups meanwhile (as reserving: a copy re-admitted again is one), so no wake dispatches them under
        a new claim before the old one is judged, which then stayed held (a review)."""
        if not lost:
            return
        uids = {j.req.uid for j, _ in lost}
        self._reserving.update(uids)

        async def check() -> None:
            try:
                await asyncio.wait_for(self._release_unheld(lost), LOST_CHECK_S)
            except asyncio.TimeoutError:
                log.warning("grouper: %d lost dispatch claim(s) not judged in %.0f s; they stay held", len(lost),
                            LOST_CHECK_S)
            finally:
                self._reserving.difference_update(uids)
            await self.add([j for j, _ in lost])

        task = asyncio.get_running_loop().create_task(check())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_unheld(self, lost: list[tuple[Job, str]]) -> None:
        """Let the next reservation release the old claims whose dispatcher says it does not hold the request: it
        died with it queued, and the claim held a hard budget for two days (a hunt: $1.79 of $2, every later
        request refused). Asked once this grouper's own dispatches to it have arrived, so a dispatch still on its
        way is not taken for lost (released, its spend would count nothing: a review). A dispatcher that does not
        answer keeps its claims held: counted too high, never too low."""
        by_provider: dict[str, list[tuple[str, str]]] = {}
        for j, claim in lost:
            by_provider.setdefault(j.req.provider, []).append((j.req.uid, claim))
        for provider, items in by_provider.items():
            await asyncio.gather(*self._runs.get(provider, ()), return_exceptions=True)
            wait_s = RESTART_POLL_S
            while True:
                try:
                    held = set(await self.dispatchers[provider].call("holds", [u for u, _ in items]))
                    break
                except Exception as exc:
                    # Restarted under the question (a fault test's second kill): asked again once it is back, as
                    # a question asks nothing of it, until ``LOST_CHECK_S``. Given up at once, its claims stayed
                    # held until the engine stopped, and later requests were refused for their room.
                    if not restarting(exc):
                        log.warning("grouper: dispatcher %s did not say what it holds (%s); %d claim(s) stay held",
                                    provider, type(exc).__name__, len(items))
                        held = None
                        break
                    await asyncio.sleep(wait_s)
                    wait_s = min(2 * wait_s, 2.0)
            if held is not None:
                self._unsure_claims.extend(c for u, c in items if u not in held)

    def _send_runs(self, per_provider: dict[str, list[BatchJob]], learns: tuple) -> None:
        for provider, part in per_provider.items():
            task = asyncio.get_running_loop().create_task(self._run_many(provider, part, learns))
            self._runs.setdefault(provider, set()).add(task)
            task.add_done_callback(self._runs[provider].discard)

    async def _run_many(self, provider: str, part: list[BatchJob], learns: tuple) -> None:
        """Sent as before (nobody waits for it), and followed until it arrived (``_release_unheld``)."""
        try:
            await self.dispatchers[provider].call("run_many", part, *learns)
        except Exception as exc:  # the dispatcher died: the driver re-admits its requests
            log.warning("grouper: dispatch to %s failed (%s)", provider, type(exc).__name__)

    def _park(self, j: Job, due: float, budget: str, b: BatchJob, verdict: Verdict | None = None,
              claim_usd: float | None = None) -> None:
        self.waits.hold(j.req.uid, j.req, due, budget, (j, b._replace(jobs=[])), verdict, claim_usd)

    def _arm_parked(self) -> None:
        if self._trying:  # armed again once the try under way has its answer
            return
        now = self.clock.now()
        due = self.waits.next_try(now)
        if due is None:
            return
        if self._park_timer is not None:
            if self._park_timer[0] <= due:
                return
            self._park_timer[1].cancel()
        handle = asyncio.get_running_loop().call_later(self.clock.real_delay(due - now), self._retry_parked)
        self._park_timer = (due, handle)

    def _retry_parked(self) -> None:
        self._park_timer = None
        late, again = self.waits.take(self.clock.now())
        if not again:  # else the reservation of those tried again says (``_reserve``): until then they count as held
            self.table.budget.holding = self.waits.holding(self.budget_specs)
        # Until the tasks below take them, these are neither held nor pending: a copy re-admitted meanwhile
        # must still be recognised (``add``), or both would go on.
        self._reserving.update(h.key for h in late)
        self._reserving.update(h.key for h in again)
        self.waits.ask(again)  # until their reservation answers, less urgent work that comes waits behind them
        batches: dict[str, BatchJob] = {}
        for h in again:
            j, meta = h.payload
            b = batches.get(meta.bid) or meta
            batches[meta.bid] = b._replace(jobs=[*b.jobs, j])
        loop = asyncio.get_running_loop()
        if late:
            task = loop.create_task(self._resolve([(h.payload[0], self._held_back(h)) for h in late],
                                                  release=[h.key for h in late]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        if batches:
            # Reserved a priority at a time, most urgent first (``_reserve``), so the room that settled goes to
            # urgent work before normal and background (as in the simulator).
            self._trying = True
            task = loop.create_task(self._try(list(batches.values()), [h.key for h in again]))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._arm_parked()

    async def _try(self, batches: list[BatchJob], keys: list) -> None:
        marks = list(keys)  # ``_retry_parked``'s, handed over to the reservation call (``_dispatch``)
        try:
            await self._dispatch(batches, marks)
        finally:  # members that went back to the policy, or were cancelled, ask no more
            self._let_go(marks)  # not handed over (the call failed first)
            self.waits.answered(keys)
            self._trying = False
            self._arm_parked()

    def _held_back(self, h: Held) -> Result:
        """The rejection of work a budget (or an unanswering ledger) held back until it could no longer finish by
        its deadline."""
        j = h.payload[0]
        if h.budget == LEDGER:
            return self._failed(j, "budget_unavailable", status="rejected",
                                reason=f"{self._ledger_down}; still so when the request could no longer finish by "
                                       "its deadline")
        return self._failed(j, "budget_exhausted", status="rejected",
                            reason=held_too_long(h))

    async def _reserve(self, batches: list[BatchJob], now: float,
                       refused: list[tuple[Job, Result]]) -> list[BatchJob]:
        """Reserve every member's upper bound, a priority at a time, most urgent first (``tiers``: a member held
        back holds the less urgent members after it behind it, as in the simulator); keep the members that may
        go, each batch's in its order."""
        kept: dict[str, list[Job]] = {}  # bid -> members that may go
        verdicts: list[Verdict] = []
        for tier in tiers(((b, j) for b in batches for j in b.jobs), lambda bj: bj[1].req):
            go = self._behind(tier, now)
            if not go:
                continue
            # A member's claim held since a hedge is let go in the call that reserves its fallback.
            release = [j.claim for _, j in go if j.claim is not None]
            unsure, self._unsure_claims = self._unsure_claims, []
            got = await self._ask(go, now, release + unsure)
            verdicts += [v for _, v in got]
            self.waits.answered(j.req.uid for _, j in go)
            for (b, j), (c, v) in zip(go, got):
                j = j._replace(claim=None)  # released by the call
                t = triage(v, j.req.deadline_at)
                if t == "go":
                    kept.setdefault(b.bid, []).append(j._replace(claim=c.rid))
                    self._dispatched[j.req.uid] = (c.rid, j.req.provider, j.req.model)
                    self._dispatched.move_to_end(j.req.uid)
                    if len(self._dispatched) > DISPATCHED_KEPT:
                        self._dispatched.popitem(last=False)
                elif t in ("wait", "retry", "defer"):
                    if t == "retry":  # the ledger did not answer: try again, until the deadline
                        self._ledger_down = v.why()
                    self._park(j, self.waits.due_after(t, v, now), LEDGER if t == "retry" else v.budget, b, v,
                               c.amount)
                else:
                    refused.append((j, self._failed(j, "budget_exhausted", status="rejected",
                                                    reason=v.why(c.amount, self.reserve_model_max))))
        if verdicts:  # as the simulator: a call that reserved nothing (members all back) leaves the share
            self.waits.adapt(verdicts)
        self.table.budget.holding = self.waits.holding(self.budget_specs)
        self._arm_parked()
        out = []
        for b in batches:
            ids = {j.req.uid: j for j in kept.get(b.bid, ())}
            keep = [ids[j.req.uid] for j in b.jobs if j.req.uid in ids]
            if keep:
                out.append(b._replace(jobs=keep))
        return out

    def _behind(self, tier: list[tuple[BatchJob, Job]], now: float) -> list[tuple[BatchJob, Job]]:
        """No overtaking: the members of ``tier`` that a budget holding more urgent work back covers are parked
        behind it (a claim held since a hedge let go); the others may ask."""
        overtaken = self.waits.overtaken(self.budget_specs)
        if not overtaken:
            return tier
        go = []
        for b, j in tier:
            name = self.waits.blocker(j.req, overtaken)
            if name is None:
                go.append((b, j))
            else:
                if j.claim is not None:
                    self.budget.deliver("settle_many", [(j.claim, 0.0)])
                    j = j._replace(claim=None)
                self._park(j, now + self.waits.step_s, name, b)
        return go

    async def _ask(self, go: list[tuple[BatchJob, Job]], now: float, release: list[str]) -> list[tuple[Claim, Verdict]]:
        """One reservation call for ``go`` (releasing ``release`` first): each member's claim and verdict."""
        claims: list[Claim] = []
        for b, j in go:
            # A batch hedged before it starts goes sync (the dispatcher does so), at the sync price.
            r = j.req
            amount = claim_amount(r, self.catalog, dispatch_mode(b.mode, b.hedge_at, now), self.reserve_model_max)
            claims.append(Claim(f"{r.id}#{self._claim_prefix}-{next(self._claims)}", r.tenant, r.provider, r.model,
                                r.priority, amount))
        try:
            verdicts = await self.budget.call("reserve_many", claims, release)
            if len(verdicts) != len(claims):
                raise RuntimeError(f"{len(verdicts)} verdicts for {len(claims)} claims")
        except Exception as exc:  # the budget actor failed: nothing reserved, the work waits (or ends at its deadline)
            # Whether it released or reserved anything is unknown: the next call releases all of it.
            self._unsure_claims.extend([*release, *(c.rid for c in claims)])
            said = f"the budget actor failed ({type(exc).__name__}: {words(exc)})"[:500]  # (Ray's: a traceback)
            verdicts = [Verdict(False, "budget_unavailable", budget=LEDGER, detail=said)] * len(claims)
        return list(zip(claims, verdicts))
