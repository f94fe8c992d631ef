"""Withdrawing some requests (``Engine.cancel_requests``; the endpoint's ``/v1/batches/{id}/cancel``), as a
provider cancels a batch's lines: what is not sent yet ends cancelled at no cost, a provider batch whose members
are all withdrawn is cancelled and what it finished is kept, and everything else runs on. Before, the engine
stopped no request it had accepted: a cancelled endpoint batch ran every line and billed it."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest

from actors import Grouper, ResultHub
from actors._types import Job
from engine.core.clock import ScaledClock
from engine.core.result import CANCELLED
from policies import load_policy
from tests.unit.helpers import Recorder
from tests.unit.test_actors import ledger
from tests.unit.test_actors import req as plain_req
from tests.unit.test_http_providers import (
    CAT,
    ROUTE,
    SPEED,
    N,
    Rig,
    assert_split_by_the_bill,
    batch_key,
    billed_by_custom_id,
    emu,  # noqa: F401  (a fixture)
    hedge_figures,
    jobs_of,
    quarter,  # noqa: F401  (a fixture)
    req,
)


def _gathering_grouper():
    disp, hub = Recorder(), ResultHub()
    # A real-time clock: a manual one's wake-ups fire at once (no real delay), and a gather of 1,000 s
    # would flush while the withdrawal awaits its results' delivery.
    g = Grouper(load_policy("fixed", CAT, {"max_batch_size": 3, "batch_wait_timeout_s": 1000}), CAT,
                ScaledClock(time.time(), 1.0), {"openai": disp}, ledger(100.0), hub)
    return g, disp, hub


async def _sent_by(g) -> list[str]:
    """The ids the grouper sent its dispatcher, once its sends (tasks, as to an actor) have run."""
    peer = g.dispatchers["openai"]
    await asyncio.gather(*peer._tasks, *g._runs.get("openai", ()))  # (the grouper follows each dispatch call)
    return _sent(peer.target)


def _sent(disp: Recorder) -> list[str]:
    return [j.req.id for name, args in disp.calls if name == "run_many" for b in args[0] for j in b.jobs]


def test_withdrawn_requests_leave_their_group_at_no_cost_and_the_others_still_go():
    """r0 and r1 gather for a batch of 3; r1 is withdrawn. It ends cancelled, billed nothing; r0 still waits, and
    goes with r2 and r3 once they come. A copy of r1 that comes later (back from a batch) ends as well."""
    async def go():
        g, disp, hub = _gathering_grouper()
        await g.add([Job(0, plain_req(0), "a"), Job(1, plain_req(1), "b")])
        assert await g.withdraw([plain_req(1).uid, "not-here"]) == 1
        got = {r.id: r for r in await hub.pull(0.01)}
        assert list(got) == ["r1"] and got["r1"].status == "failed" and got["r1"].cost_usd == 0.0
        assert got["r1"].error.startswith(f"{CANCELLED}: withdrawn")
        assert (await g.stats())["pending"] == 1 and await _sent_by(g) == []
        await g.add([Job(2, plain_req(2), "c"), Job(3, plain_req(3), "d")])
        assert sorted(await _sent_by(g)) == ["r0", "r2", "r3"]  # the batch of 3, without r1
        await g.add([Job(1, plain_req(1), "b", hedges=1)])  # r1 back from somewhere: not sent, not held
        assert sorted(await _sent_by(g)) == ["r0", "r2", "r3"] and (await g.stats())["pending"] == 0
    asyncio.run(go())


def test_a_group_left_empty_by_a_withdrawal_leaves_no_timer_that_sends_anything():
    async def go():
        g, disp, hub = _gathering_grouper()
        await g.add([Job(0, plain_req(0), "a")])
        assert await g.withdraw([plain_req(0).uid]) == 1
        assert len(g.table.groups) == 0 and (await g.stats())["pending"] == 0
        await g.add([Job(5, plain_req(5), "e"), Job(6, plain_req(6), "f")])  # a new group, with a fresh wait
        assert await _sent_by(g) == [] and (await g.stats())["pending"] == 2
    asyncio.run(go())


def test_a_provider_batch_whose_members_are_all_withdrawn_is_cancelled_and_keeps_what_it_finished(quarter):  # noqa: F811
    """Every member of a running batch is withdrawn: its cancel goes out at once (no hedge would ever send it),
    the members it finished are answered from its output, billed once, and the others go back to be ended by
    their grouper. A batch one of whose members is not withdrawn runs on."""
    emu, jobs = quarter, jobs_of("openai", claims=True)  # noqa: F811  (the fixture at a quarter of the speed)
    others = [Job(20 + k, req(20 + k), f"fp-other-{k}", claim=f"o{k}") for k in range(2)]

    async def go():
        rig = Rig(emu, "openai", speed=SPEED / 4)
        rig.d._learners = True  # the groupers learn turnarounds from its batches
        try:
            await rig.reserve(jobs + others)
            await rig.run("batch_api", jobs)  # no hedge: it would run to its end
            await rig.run("batch_api", others, bid="others")
            await rig.until(lambda: sum(rec[4] is not None for rec in rig.d._open.values()) == 2,
                            "the batches' creates, answered")
            # (once a member has finished: the cancel keeps it, which the hedge metrics must not count)
            await rig.until(lambda: batch_key(jobs[0]) in billed_by_custom_id(emu), "member 0 to finish")
            assert await rig.d.withdraw([j.req.uid for j in jobs] + [others[0].req.uid]) == 1
            await rig.until(lambda: emu.count("batches.cancel", status=200) == 1, "the withdrawn batch's cancel")
            await rig.resolved(jobs + others, timeout_s=30.0)
            finished = assert_split_by_the_bill(rig, emu, jobs + others, "openai")
            assert len(finished) < N + 2 and rig.d.paid_twice == 0
            assert all(j.req.id in finished for j in others)  # both ran: the batch had work not withdrawn
            # A withdrawal is no hedge: the hedge metrics (a Grafana panel) count neither the batch nor what it
            # kept. Before, its kept members were counted beside 0 hedged batches (a user's tour: 181 and 0).
            assert rig.d.members_saved_by_cancel == len(finished) - len(others) >= 1
            assert await hedge_figures(rig) == (0, 0)
            # The withdrawn batch's start, told when it was made, is closed with nothing learned (end = start):
            # left open, it read as a batch still running, slower and slower (a review); the other ran to its end.
            told = [t for name, args in rig.grouper.calls if name == "observe_turnarounds" for t in args[0]]
            starts = {t.start for t in told if t.end is None}
            ended = [t for t in told if t.end is not None]
            assert len(starts) == 2 and {t.start for t in ended} == starts
            assert sorted((t.end == t.start, t.censored) for t in ended) == [(False, False), (True, True)]
            assert emu.count("batches.cancel") == 1  # the batch with others[1] in it ran to its end
        finally:
            await rig.close()
    asyncio.run(go())


def test_withdrawn_work_that_starts_later_is_not_sent(quarter):  # noqa: F811
    """A sync call and a batch withdrawn before the dispatcher starts them (on their way, or at a rate gate):
    neither reaches the provider; the call ends cancelled, billed nothing; the batch is never created."""
    emu = quarter  # noqa: F811  (the fixture at a quarter of the speed)
    sync, batch = [Job(30, req(30), "fp-s", claim="s")], [Job(31, req(31), "fp-b", claim="b")]

    async def go():
        rig = Rig(emu, "openai", speed=SPEED / 4)
        try:
            await rig.reserve(sync + batch)
            assert await rig.d.withdraw([sync[0].req.uid, batch[0].req.uid]) == 0  # nothing open yet
            await rig.run("sync", sync, bid="s")
            await rig.run("batch_api", batch, bid="b")
            await rig.until(lambda: "openai-30" in rig.results and batch[0].req.id in
                            {j.req.id for j in rig.grouper.readmitted()}, "the withdrawn work to end")
            r = rig.results["openai-30"]
            assert r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
            assert emu.count(ROUTE["openai"]) == 0 and emu.count("batches.create") == 0 and not rig.calls
            await rig.until(lambda: "s" not in rig.budget.book.claims, "the call's claim settled")
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_member_withdrawn_while_its_batch_waits_for_its_create_slot_is_never_sent(quarter):  # noqa: F811
    """Anthropic's batches of one size are created one at a time (``create_slot``: a Message Batch carries no
    name). A member withdrawn while its batch, let in by the gate, waits for that slot ends, billed nothing, and
    the batch is created without it; before, it was sent in it and billed."""
    emu, jobs = quarter, jobs_of("anthropic", 8, claims=True)  # noqa: F811  (the fixture at a quarter of the speed)
    first, second = jobs[:4], jobs[4:]

    async def go():
        rig = Rig(emu, "anthropic", speed=SPEED / 4)
        inner, held, release, sent = rig.d.provider.submit_batch, asyncio.Event(), asyncio.Event(), []

        async def submit(cjobs, *args):
            sent.append([cj.req.id for cj in cjobs])
            if len(sent) == 1:  # the first create waits, holding the slot of its size
                held.set()
                await release.wait()
            return await inner(cjobs, *args)

        rig.d.provider.submit_batch = submit
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", first, bid="b1")
            await asyncio.wait_for(held.wait(), 20.0)
            await rig.run("batch_api", second, bid="b2")
            await rig.until(lambda: rig.d.provider._slots[4][1] == 2, "the second batch at its create's slot")
            await rig.d.withdraw([second[0].req.uid])
            release.set()
            await rig.until(lambda: len(rig.results) == 8, "every answer", 30.0)
            r = rig.results[second[0].req.id]
            assert r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
            assert sent == [[j.req.id for j in first], [j.req.id for j in second[1:]]]
            billed = {i.custom_id for i in emu.bill().items}
            assert len(billed) == 7 and rig.grouper.readmitted() == []
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert sum(rig.budget.book.spend.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create"}


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_member_withdrawn_while_its_batch_create_waits_out_a_429_is_left_out_of_the_create(emu, provider):  # noqa: F811
    """A batch's create is rate limited (a 429: nothing made) and waits out its Retry-After to be made again. A
    member withdrawn meanwhile ends at once, billed nothing, its claim settled once at 0, and the create that
    follows is made without it, its journal record saying so first (a restart re-attaches to what was made).
    Before, the create was made again with the body journaled before the first, the member sent and billed."""
    jobs = jobs_of(provider, claims=True)
    gone, kept = jobs[1], [j for j in jobs if j is not jobs[1]]
    wait_s = SPEED  # engine s: 1 s real, the window the withdrawal comes in
    emu.faults.script(provider, CREATE[provider], [{"status": 429, "retry_after_s": wait_s}])

    async def go():
        rig = Rig(emu, provider)
        p, refused, sent, journaled = rig.d.provider, asyncio.Event(), [], []
        inner = p.submit_batch

        async def submit(cjobs, hedge_at, key, *rest):
            record = (await rig.d.journal.items(rig.d._space))[key]  # what a restart would re-attach to
            journaled.append(([j.req.id for j in record[1]],
                              None if record[5] is None else [m["custom_id"] for m in record[5]]))
            sent.append([cj.req.id for cj in cjobs])
            try:
                return await inner(cjobs, hedge_at, key, *rest)
            except Exception:
                refused.set()
                raise

        p.submit_batch = submit
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)  # no hedge: the 429's wait is taken
            await asyncio.wait_for(refused.wait(), 20.0)
            await rig.d.withdraw([gone.req.uid])
            r = await rig.until(lambda: rig.results.get(gone.req.id), "the withdrawn member's end")
            assert len(sent) == 1  # at once, not when the wait is over
            assert r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
            await rig.until(lambda: len(rig.results) == N, "every answer", 30.0)
            assert [sorted(ids) for ids in sent] == [sorted(j.req.id for j in jobs), sorted(j.req.id for j in kept)]
            keys = {j.req.id: batch_key(j) for j in jobs}
            assert [sorted(ids) for ids, _ in journaled] == sent
            if provider == "anthropic":  # the body the create sends again under its key is journaled
                assert [sorted(ids) for _, ids in journaled] == [sorted(keys[i] for i in s) for s in sent]
            assert all(rig.results[j.req.id].status == "ok" for j in kept)
            assert sorted(i.custom_id for i in emu.bill().items) == sorted(keys[j.req.id] for j in kept)
            assert emu.count(CREATE[provider], status=200) == 1 and rig.grouper.readmitted() == []
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def _held_once(obj, name: str):
    """``obj.name`` (an async method) whose first call waits for the event returned second, once the first
    returned has been set: a journal write that is slow (a burst coalesced behind another, a Redis round trip)."""
    inner, held, release, calls = getattr(obj, name), asyncio.Event(), asyncio.Event(), []

    async def slow(*args, **kw):
        calls.append(args)
        if len(calls) == 1:
            held.set()
            await release.wait()
        return await inner(*args, **kw)

    setattr(obj, name, slow)
    return held, release


@pytest.mark.parametrize("how", ["withdrawn", "engine cancelled"])
def test_a_sync_call_withdrawn_while_its_body_is_journaled_is_never_sent(emu, how):  # noqa: F811
    """A sync call's body is journaled before its first try, after the rate gate let it start: a request
    withdrawn (or an engine cancelled) during that write was sent and billed anyway."""
    (j,) = [Job(40, req(40), "fp-40", claim="c40")]

    async def go():
        rig = Rig(emu, "openai")
        held, release = _held_once(rig.d._sync_journal, "put")
        try:
            await rig.reserve([j])
            await rig.run("sync", [j])
            await asyncio.wait_for(held.wait(), 10.0)
            if how == "withdrawn":
                await rig.d.withdraw([j.req.uid])
            else:
                cancel = asyncio.ensure_future(rig.d.cancel())
            release.set()
            r = await rig.until(lambda: rig.results.get(j.req.id), "its end")
            assert r.status == "failed" and r.error.startswith(CANCELLED) and r.cost_usd == 0.0, r
            assert emu.count(ROUTE["openai"]) == 0 and not rig.calls and emu.bill().items == ()
            await rig.until(lambda: not rig.budget.book.claims, "its claim settled")
            assert rig.d.in_flight == 0 and not rig.d._sync_calls  # its body record is gone, from the journal too
            if how != "withdrawn":
                await cancel
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
def test_a_member_withdrawn_while_its_batch_is_journaled_before_its_create_is_left_out(emu, provider):  # noqa: F811
    """A batch is journaled before its create leaves: a member withdrawn during that write was sent in the
    create and billed; all of them withdrawn, the batch was created and cancelled at once."""
    jobs = jobs_of(provider, claims=True)

    async def go():
        rig = Rig(emu, provider)
        held, release = _held_once(rig.d.journal, "put")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            await rig.d.withdraw([jobs[0].req.uid])
            release.set()
            await rig.until(lambda: len(rig.results) == N, "every answer", 30.0)
            r = rig.results[jobs[0].req.id]
            assert r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
            assert sorted(i.custom_id for i in emu.bill().items) == sorted(batch_key(j) for j in jobs[1:])
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            assert sum(rig.budget.book.spend.values()) == pytest.approx(emu.bill().total_usd, abs=1e-12)
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("how", ["all withdrawn", "engine cancelled"])
def test_a_batch_withdrawn_whole_while_it_is_journaled_before_its_create_is_never_created(emu, how):  # noqa: F811
    """Every member withdrawn, or the engine cancelled, while the batch is journaled before its create: it is
    never created, its members going back to be ended by their grouper, nothing billed. Before, it was
    created, and cancelled at once."""
    jobs = jobs_of("openai", claims=True)

    async def go():
        rig = Rig(emu, "openai")
        held, release = _held_once(rig.d.journal, "put")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            if how == "all withdrawn":
                await rig.d.withdraw([j.req.uid for j in jobs])
            else:
                cancel = asyncio.ensure_future(rig.d.cancel())
            release.set()
            await rig.resolved(jobs)
            assert sorted(j.req.id for j in rig.grouper.readmitted()) == sorted(j.req.id for j in jobs)
            assert emu.count("batches.create") == 0 and emu.bill().items == ()
            assert rig.d.in_flight == 0 and not rig.d._open
            if how != "all withdrawn":
                await cancel
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


@pytest.mark.parametrize("whole", [False, True])
def test_a_member_withdrawn_while_its_openai_batch_file_uploads_is_left_out_of_the_create(emu, whole):  # noqa: F811
    """An OpenAI batch's input file is uploaded before its create (200 MB may take minutes): a member withdrawn
    during the upload was sent in the create and billed. The upload goes (deleted), and the batch is created
    from a file without it; withdrawn whole meanwhile, it is never created (it was, and cancelled at once)."""
    jobs = jobs_of("openai", claims=True)
    gone = jobs if whole else jobs[:1]

    async def go():
        rig = Rig(emu, "openai")
        held, release = _held_once(rig.d.provider.client.files, "create")
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await asyncio.wait_for(held.wait(), 10.0)
            await rig.d.withdraw([j.req.uid for j in gone])
            release.set()
            await rig.resolved(jobs, 30.0)
            if whole:  # back to their grouper, which ends them
                assert sorted(j.req.id for j in rig.grouper.readmitted()) == sorted(j.req.id for j in jobs)
                assert emu.count("batches.create") == 0 and emu.bill().items == ()
            else:
                r = rig.results[gone[0].req.id]
                assert r.status == "failed" and r.error.startswith(f"{CANCELLED}: withdrawn") and r.cost_usd == 0.0
                assert sorted(i.custom_id for i in emu.bill().items) == sorted(batch_key(j) for j in jobs[1:])
                assert emu.count("batches.create") == 1 and emu.count("files.create") == 2
                await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
            # The upload no batch reads; and the input of the batch made, once read (``FileCleanup``)
            await rig.until(lambda: emu.count("files.delete", status=200) == 1 + (not whole), "the uploads deleted")
        finally:
            release.set()
            await rig.close()
    asyncio.run(go())


def test_a_sync_call_cut_by_a_restart_is_not_made_again_for_a_request_withdrawn_meanwhile(emu):  # noqa: F811
    """A restarted dispatcher makes again, under its key, the sync calls its journal says were under way; the
    driver's rewire tells it the withdrawals first. A withdrawn request's call was made again all the same, and
    billed again where the provider does not honour the key (OpenAI and Anthropic document none). Now it ends
    withdrawn, unsent; its claim keeps the first call's upper bound, as that call may have been billed."""
    from actors import Dispatcher
    from tests.unit.test_unanswered import kept_bound

    (j,) = [Job(41, req(41), "fp-41", claim="c41")]

    async def go():
        rig = Rig(emu, "openai")
        on_the_wire = asyncio.Event()

        async def dies_on_the_wire(job):  # the process dies with this call out, its answer never heard
            on_the_wire.set()
            await asyncio.Event().wait()

        rig.d.provider.call = dies_on_the_wire
        again = None
        try:
            await rig.reserve([j])
            await rig.run("sync", [j])
            await asyncio.wait_for(on_the_wire.wait(), 10.0)
            for t in list(rig.d._tasks):
                t.cancel()
            again = Dispatcher("openai", rig.catalog, rig.settings, 0, rig.clock, [rig.grouper], rig.hub, None,
                               rig.budget, key=rig.d._key)
            await again.withdraw([j.req.uid])  # the rewire: the withdrawals, then the recovery
            await again.recover()
            r = await rig.until(lambda: rig.results.get(j.req.id), "its end")
            assert r.status == "failed" and r.error.startswith(CANCELLED) and "may have been billed" in r.error
            assert emu.count(ROUTE["openai"]) == 0  # not made again
            await kept_bound(rig, j)
        finally:
            if again is not None:
                await again.provider.close()
            await rig.close()
    asyncio.run(go())


def test_a_withdrawn_id_forgotten_past_its_retention_names_a_new_request_that_is_sent():
    """The withdrawn ids were kept for good: a new request under one, once the driver had forgotten the old
    (past ``retention_s``), ended "cancelled" at once (a review)."""
    async def go():
        g, disp, hub = _gathering_grouper()
        await g.add([Job(0, plain_req(0), "a")])
        assert await g.withdraw([plain_req(0).uid]) == 1
        await g.forget([plain_req(0).uid])
        await g.add([Job(1, plain_req(0), "a"), Job(2, plain_req(2), "c"), Job(3, plain_req(3), "d")])
        assert sorted(await _sent_by(g)) == ["r0", "r2", "r3"]
    asyncio.run(go())


def test_ingest_names_the_other_drivers_of_a_request_and_the_hub_those_that_left():
    """A request two drivers of a shared engine submitted is theirs both: one driver's cancel_requests must not
    end it for the other (a review). But a driver that stopped pulling (a replica killed and replaced, whose
    successor asked the same ids again) holds nothing any more: counted, it kept a cancelled endpoint batch's
    every line running and billed (a helper's hunt)."""
    from actors import Ingest

    async def go():
        hub = ResultHub()
        ing = Ingest([Recorder()], hub=hub)
        a, b = plain_req(0), plain_req(1)
        await ing.submit([a, b], "driver-1")
        await ing.submit([b], "driver-2")  # the same request, from another driver
        assert await ing.others([a.uid, b.uid], "driver-1") == [[], ["driver-2"]]
        assert await ing.others([b.uid], "driver-2") == [["driver-1"]]
        await ing.forget([b.uid], "driver-1")
        assert await ing.others([b.uid], "driver-2") == [[]]
        await hub.pull(0.0, "driver-1")  # known to the hub (claims register a driver), then pulling
        await hub.pull(0.0, "driver-1")
        # One it does not know (a restarted hub knows nobody until they pull) is not taken for gone (a review).
        assert await hub.quiet(["driver-1", "never-seen"], 10.0) == []
        assert await hub.quiet(["driver-1", "never-seen"], 0.0) == ["driver-1"]
    asyncio.run(go())


def test_a_grouper_or_dispatcher_ray_restarts_is_told_again_what_was_withdrawn(monkeypatch):
    """A restarted dispatcher knew nothing of the withdrawal: it followed the withdrawn members' batch, which it
    re-attached to from its journal, to its end, billed (a helper's hunt). The driver's rewire tells it again,
    as it tells it of an engine-wide cancel."""
    from types import SimpleNamespace

    import actors.remote as remote

    calls: list[tuple[str, str, tuple]] = []

    class Handle:
        def __init__(self, kind):
            self.kind = kind

        def __getattr__(self, method):
            return SimpleNamespace(remote=lambda *a: calls.append((self.kind, method, a)) or 0)

    monkeypatch.setattr(remote, "ray", SimpleNamespace(get=lambda x, **kw: x))
    kinds = ["grouper-0", "dispatcher-openai"]
    h = {"named": {k: Handle(k) for k in kinds}, "clock": None, "log_level": "INFO", "engine": "e",
         "withdrawn": {"7:default/r1": None, "7:default/r2": None}}
    for kind in kinds:
        remote.rewire(h, kind)
    told = {(k, a[0] and tuple(a[0])) for k, m, a in calls if m == "withdraw"}
    assert told == {(k, ("7:default/r1", "7:default/r2")) for k in kinds}


class _Handle:
    """An actor handle over an in-process actor: ``h.method.remote(*a)`` runs the call on ``loop`` and is the
    answer (``_FakeRay.get`` returns it), or raises what ``fail`` holds for that method, once each."""

    def __init__(self, actor, loop, fail=None):
        self._actor, self._loop, self._fail = actor, loop, fail if fail is not None else {}

    def __getattr__(self, method):
        def remote(*args):
            if self._fail.get(method):
                return self._fail[method].pop(0)
            return self._loop.run_until_complete(getattr(self._actor, method)(*args))
        return SimpleNamespace(remote=remote)


class _Unavailable(Exception):
    pass


class _FakeRay:
    exceptions = SimpleNamespace(ActorUnavailableError=_Unavailable)

    @staticmethod
    def get(ref, timeout=None):
        refs = ref if isinstance(ref, list) else [ref]
        for r in refs:
            if isinstance(r, Exception):
                raise r
        return ref


def _driver(client, ingest, hub, groupers, dispatchers, futs):
    import threading

    from engine.app.driver import Engine

    eng = Engine.__new__(Engine)
    eng._running, eng._lock, eng._client, eng._ray = True, threading.RLock(), client, _FakeRay()
    eng._futs = {f._req.uid: f for f in futs}
    eng._flush = lambda: None
    eng._h = {"ingests": [ingest], "hubs": [hub], "groupers": groupers, "dispatchers": dispatchers}
    return eng


@pytest.mark.parametrize("other_pulls", [False, True])
def test_a_withdrawal_while_ingest_rebuilds_its_holders_spares_a_copy_another_live_driver_may_hold(other_pulls):
    """Ray restarted ingest: it knows each request's holders again only as each driver re-admits. A withdrawal
    asked meanwhile (waiting out the restart, since stop 58) took a request only this driver had re-admitted as
    this driver's alone, and withdrew another driver's copy with it (a review). Now, while the holders rebuild,
    a request runs on if another driver still pulls; with none, it is withdrawn as before."""
    import asyncio as aio

    from actors import Ingest
    from engine.app._future import ResultFuture

    loop = aio.new_event_loop()
    try:
        hub, grouper, disp = ResultHub(), Recorder(), Recorder()
        ing = Ingest([Recorder()], hub=hub)
        a = plain_req(0)
        loop.run_until_complete(ing.submit([a], "driver-1"))
        ing.reconstructed()  # Ray restarted it: "driver-2" has not re-admitted its copy of r0 yet
        ing.holders = {a.uid: "driver-1"}
        loop.run_until_complete(hub.pull(0.0, "driver-1"))
        if other_pulls:
            loop.run_until_complete(hub.pull(0.0, "driver-2"))
        fut = ResultFuture(a, None)
        # The first ask reaches ingest while it restarts: asked again.
        ingest = _Handle(ing, loop, {"others": [_Unavailable("restarting")]})
        eng = _driver("driver-1", ingest, _Handle(hub, loop), [_Handle(grouper, loop)],
                      {"openai": _Handle(disp, loop)}, [fut])
        n = eng.cancel_requests([fut], timeout_s=5.0)
    finally:
        loop.close()
    told = [args[0] for name, args in grouper.calls + disp.calls if name == "withdraw"]
    assert (n, told) == ((0, []) if other_pulls else (1, [[a.uid], [a.uid]]))


def test_a_withdrawal_is_not_failed_by_a_grouper_that_restarts_and_reaches_the_dispatchers_when_one_fails():
    """A grouper restarting answers "unavailable": its rewire tells it (the ids are kept), so the withdrawal
    holds; the caller got a Ray error for it (a helper's hunt). Another error still reaches the caller, once the
    dispatchers were told (a batch of withdrawn members alone ran on, billed, when they were not)."""
    import asyncio as aio

    from actors import Ingest
    from engine.app._future import ResultFuture

    loop = aio.new_event_loop()
    try:
        hub, disp = ResultHub(), Recorder()
        ing = Ingest([Recorder()], hub=hub)
        a, b = plain_req(0), plain_req(1)
        loop.run_until_complete(ing.submit([a, b], "driver-1"))
        futs = [ResultFuture(a, None), ResultFuture(b, None)]
        restarting = _Handle(Recorder(), loop, {"withdraw": [_Unavailable("restarting")]})
        eng = _driver("driver-1", _Handle(ing, loop), _Handle(hub, loop), [restarting],
                      {"openai": _Handle(disp, loop)}, futs)
        assert eng.cancel_requests(futs[:1], timeout_s=5.0) == 1
        assert eng._h["withdrawn"] == {a.uid: None}  # kept for the grouper's rewire
        broken = _Handle(Recorder(), loop, {"withdraw": [RuntimeError("grouper crashed")]})
        eng._h["groupers"] = [broken]
        with pytest.raises(RuntimeError, match="crashed"):
            eng.cancel_requests(futs[1:], timeout_s=5.0)
    finally:
        loop.close()
    assert [args[0] for name, args in disp.calls if name == "withdraw"] == [[a.uid], [b.uid]]
