"""The admission kernel (``engine.runtime.admission``): the in-flight table, and the rules both runtimes take
from it. Each rule is checked in the simulator and in the cache actor (a plain class, no Ray), which must
agree request by request."""

from __future__ import annotations

import asyncio

import pytest

from actors import ResultCache, ResultHub
from actors._types import Job
from engine.core.catalog import Catalog, default_catalog
from engine.core.clock import ManualClock
from engine.core.draws import Draws
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings
from engine.runtime.admission import InFlight, release_lead
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
SMART = load_policy("smart", CAT)
REUSE = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=SMART.reuse.near_threshold,
                      follow_margin_s=SMART.reuse.follow_margin_s)
NEAR_PAIR = ("Draw a red car parked on a wet street at night", "draw a red car parked on a wet street at night.")
_HIT = {0: None, 1: "exact", 2: "in_flight", 3: "near"}


def req(i: int, prompt: str, deadline_s: float = 600.0, reuse: str = "near", model: str = "imagen-4",
        arrival_s: float = 0.0) -> Request:
    return Request.model_validate({"id": f"r{i}", "arrival_s": arrival_s, "model": model, "prompt": prompt,
                                   "tenant": "acme", "reuse": reuse, "deadline_s": deadline_s})


# -- the in-flight table ----------------------------------------------------------------------------------------

def test_one_leader_per_fingerprint_and_followers_only_under_the_deadline_rule():
    t: InFlight[int] = InFlight(REUSE)
    a, later, sooner = req(0, "x", 600.0), req(1, "x", 900.0), req(2, "x", 300.0)
    assert t.lead("fp", a, 0) and not t.lead("fp", later, 1)  # the first leads; the second is generated too
    assert t.leader("fp") == 0 and len(t) == 1
    assert t.follow("fp", later, 1) and not t.follow("fp", sooner, 2)  # due before the leader: never
    assert not t.follow("other", later, 3)  # no leader, nothing to follow
    assert t.follow("fp", later, 4, "near")
    assert sorted(t.following()) == [1, 4] and t.n_following() == 2
    assert t.done("fp", 0) == [(1, "in_flight"), (4, "near")]
    assert t.leader("fp") is None and t.n_following() == 0


def test_a_failed_leader_keeps_its_followers_until_they_are_orphaned():
    t: InFlight[int] = InFlight(REUSE)
    a = req(0, "x")
    t.lead("fp", a, 0)
    t.follow("fp", req(1, "x", 900.0), 1)
    t.drop("fp", req(5, "x").uid)  # not the leader: nothing changes
    assert t.leader("fp") == 0
    t.drop("fp", a.uid)
    assert t.leader("fp") is None and list(t.following()) == [1]  # set aside, still counted as following
    # Another request leads the fingerprint meanwhile: its followers are its own.
    t.lead("fp", req(2, "x", 600.0), 2)
    t.follow("fp", req(3, "x", 900.0), 3)
    assert t.orphans("fp", a.uid) == [(1, "in_flight")] and t.leader("fp") == 2
    assert t.done("fp", 2) == [(3, "in_flight")] and t.n_following() == 0


def test_a_copy_due_sooner_leads_too_and_a_copy_due_between_follows_it():
    """A is generating (due 3600); B, identical but due in 600 s, could not follow it and is generated too: it
    leads as well. C (due 900) follows B; before, it could follow neither and was generated a third time."""
    t: InFlight[int] = InFlight(REUSE)
    a, b, c, d = req(0, "x", 3600.0), req(1, "x", 600.0), req(2, "x", 900.0), req(3, "x", 4000.0)
    assert t.lead("fp", a, 0) and t.follow("fp", b, 1) is None and t.lead("fp", b, 1)
    assert t.follow("fp", c, 2) == float("inf") and not t.lead("fp", c, 2)  # due after B: B's result will do
    assert t.follow("fp", d, 3) == float("inf")  # due after both: it follows the first that leads, A
    assert t.leader("fp") == 0 and len(t) == 1
    # B fails for good: only its own follower is orphaned, and A, due after it, cannot take it over.
    assert t.orphans("fp", b.uid) == [(2, "in_flight")] and t.follow("fp", c, 2) is None
    assert t.waits("fp", 3) and t.leader("fp") == 0
    # A's result answers the followers of every leader of the fingerprint: the output is the same.
    t.lead("fp", b, 1)
    t.follow("fp", c, 2)
    assert sorted(t.done("fp", 0)) == [(2, "in_flight"), (3, "in_flight")] and t.n_following() == 0
    assert t.leader("fp") == 1  # B is still being generated: a copy due after it follows it
    assert t.done("fp", 1) == [] and t.leader("fp") is None


def test_a_failed_leaders_followers_come_back_the_first_due_copy_first():
    t: InFlight[int] = InFlight(REUSE)
    lead = req(0, "x", 300.0)
    t.lead("fp", lead, 0)
    for k, (due, how) in enumerate([(1200.0, "near"), (900.0, "in_flight"), (600.0, "in_flight"),
                                    (900.0, "in_flight")], start=1):
        assert t.follow("fp", req(k, "x", due), k, how)
    assert t.orphans("fp", lead.uid) == [(3, "in_flight"), (2, "in_flight"), (4, "in_flight"), (1, "near")]


def test_without_in_flight_reuse_nothing_follows():
    t: InFlight[int] = InFlight(REUSE._replace(in_flight=False))
    t.lead("fp", req(0, "x"), 0)
    assert not t.follow("fp", req(1, "x", 900.0), 1)


# -- the same rule in both runtimes -----------------------------------------------------------------------------

def no_failures(provider: str) -> Catalog:
    raw = CAT.model_dump()
    raw["providers"][provider]["failure_rate"] = 0.0
    return Catalog.model_validate(raw)


def in_the_simulator(reqs: list[Request]) -> list[str | None]:
    cat = no_failures("google")
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    return [_HIT[int(h)] for h in res.hit]


def in_the_cache(reqs: list[Request], tmp_path) -> list[str | None]:
    """One lookup of all of ``reqs`` (they arrive together), then every miss completes."""
    async def go():
        hub = ResultHub()
        settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
        cache = ResultCache(REUSE, hub, ManualClock(0.0), settings=settings)
        jobs = [Job(i, r, fingerprint(r)) for i, r in enumerate(reqs)]
        misses = await cache.lookup(jobs)
        await cache.complete([(jobs[k].fp, Result(id=jobs[k].req.id, tenant="acme", status="ok", output="img://o",
                                                  cost_usd=0.04, mode="sync", provider=jobs[k].req.provider,
                                                  model=jobs[k].req.model, done_s=8.0)) for k in misses])
        hits = {r.id: r.hit for r in await hub.pull(0.01)}
        return [hits.get(r.id) for r in reqs]
    return asyncio.run(go())


ORDER_CASES = {
    # A near ask that arrives before its source (an exact-only request) cannot follow it: the source did not
    # exist yet. The cache decides near asks after the rest of its lookup, and used to let it follow.
    "near ask first": ([req(0, NEAR_PAIR[1]), req(1, NEAR_PAIR[0], reuse="exact")], [None, None]),
    "source first": ([req(0, NEAR_PAIR[0], reuse="exact"), req(1, NEAR_PAIR[1])], [None, "near"]),
    # A follower leads nothing: a copy of it follows the same source, as a near duplicate of that source.
    "two near asks": ([req(0, NEAR_PAIR[0]), req(1, NEAR_PAIR[1]), req(2, NEAR_PAIR[1])],
                      [None, "near", "near"]),
    # Review cases: a request that asks no reuse, and an exact-only one, lead at their place in the batch.
    # The third follows the first although due before it: an image has no batch-API lever, so it waits for the
    # first's result until its release time (``admission.release_lead``), which comes long after that result.
    "no-reuse leader in between": ([req(0, NEAR_PAIR[1], 3600.0), req(1, NEAR_PAIR[1], 1800.0, reuse="none"),
                                    req(2, NEAR_PAIR[1], 3000.0)], [None, None, "in_flight"]),
    "exact-only leader in between": ([req(0, NEAR_PAIR[0], reuse="exact"), req(1, NEAR_PAIR[1]),
                                      req(2, NEAR_PAIR[1], reuse="exact"), req(3, NEAR_PAIR[1])],
                                     [None, "near", None, "in_flight"]),
    # A source due later is followed under a release time by a request with no batch-API lever (an image)...
    "source due later": ([req(0, NEAR_PAIR[0], 900.0, reuse="exact"), req(1, NEAR_PAIR[1], 600.0)],
                         [None, "near"]),
    # ... and never by one that has one (text at OpenAI): sent on its own late, it would lose its discount.
    "source due later, batch lever": ([req(0, "Summarise the report in two lines", 7200.0, model="gpt-5-mini"),
                                       req(1, "Summarise the report in two lines", 3600.0, model="gpt-5-mini")],
                                      [None, None]),
    # ... nor by one whose release time would already have passed (due too soon for its own call's p99).
    "source due later, no time": ([req(0, NEAR_PAIR[1], 900.0), req(1, NEAR_PAIR[1], 40.0)], [None, None]),
    # A copy that could not follow (due sooner, a batch-API lever) is generated and leads too: a third copy due
    # between the two follows it, where it could follow neither before and was paid a third time.
    "a copy due sooner leads too": ([req(0, "Summarise the report in two lines", 7200.0, model="gpt-5-mini"),
                                     req(1, "Summarise the report in two lines", 3600.0, model="gpt-5-mini"),
                                     req(2, "Summarise the report in two lines", 5000.0, model="gpt-5-mini")],
                                    [None, None, "in_flight"]),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_requests_arriving_together_are_admitted_in_arrival_order_in_both_runtimes(case, tmp_path):
    reqs, want = ORDER_CASES[case]
    assert in_the_simulator(reqs) == want
    assert in_the_cache(reqs, tmp_path) == want


class _LeaderAlwaysFails(Draws):
    """Every attempt of request 0 fails, every other request's succeeds."""

    def fail_u(self, i: int, k: int) -> float:
        return 0.0 if i == 0 else 1.0


def test_the_followers_of_a_leader_that_failed_for_good_are_generated_once_not_each(tmp_path):
    """Three identical copies follow a leader whose every attempt fails: one of them is generated, the copy due
    first, and the other two take its result. Before, each was generated on its own: three paid calls where one
    would do (a helper's fault hunt). The same in the simulator and in the cache actor."""
    raw = CAT.model_dump()
    raw["providers"]["google"]["failure_rate"] = 0.5
    cat = Catalog.model_validate(raw)
    prompt = "A red car parked on a wet street at night"
    reqs = [req(0, prompt, 300.0, reuse="exact"), req(1, prompt, 1200.0, reuse="exact", arrival_s=1.0),
            req(2, prompt, 900.0, reuse="exact", arrival_s=2.0), req(3, prompt, 1500.0, reuse="exact",
                                                                     arrival_s=3.0)]
    settings = Settings()
    draws = _LeaderAlwaysFails(len(reqs), settings.sim.max_attempts, 0, settings.sim.batch_slot_s)
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, draws=draws)
    assert res.status[0] != 0 and res.cost[0] == 0.0  # failed for good, billed nothing
    # One paid call, the copy due first (900 s); the others take its result when it comes.
    assert [_HIT[int(h)] for h in res.hit[1:]] == ["in_flight", None, "in_flight"]
    assert (res.cost[1:] > 0).tolist() == [False, True, False] and res.met[1:].all()
    assert res.done_at[1] == res.done_at[2] == res.done_at[3]

    async def in_the_cache():
        hub = ResultHub()
        cache = ResultCache(REUSE, hub, ManualClock(0.0), settings=Settings().model_copy(
            update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")}))
        jobs = [Job(i, r, fingerprint(r)) for i, r in enumerate(reqs)]
        assert await cache.lookup(jobs) == [0]  # the first leads, the three copies follow it
        fp = jobs[0].fp
        await cache.complete([(fp, Result(id=reqs[0].id, tenant="acme", status="failed", error="boom"))])
        again = await cache.orphans([(fp, reqs[0].uid)])
        assert again == [jobs[2]]  # generated: the copy due first; the others follow it
        await cache.complete([(fp, Result(id=reqs[2].id, tenant="acme", status="ok", output="img://o",
                                          cost_usd=0.04, mode="sync", provider=reqs[2].provider,
                                          model=reqs[2].model, done_s=20.0))])
        return {r.id: r.hit for r in await hub.pull(0.01)}
    assert asyncio.run(in_the_cache()) == {"r1": "in_flight", "r3": "in_flight"}


def test_a_request_is_a_near_source_from_when_it_leads_not_from_when_its_call_starts():
    """The source waits in a GPU batch that the policy gathers: it is not sent when its near duplicate
    arrives, and the duplicate follows it all the same (no runtime can know in advance which of a request's
    attempts will be the one that succeeds)."""
    # Earlier jobs in the lane promise company, so the policy gathers (value of time holds no job without it).
    lane = [req(10 + k, f"A lighthouse in fog, take {k}", 3600.0, model="flux-1-dev", arrival_s=float(k))
            for k in range(3)]
    pair = [req(0, NEAR_PAIR[0], 3600.0, model="flux-1-dev", arrival_s=100.0),
            req(1, NEAR_PAIR[1], 3600.0, model="flux-1-dev", arrival_s=101.0)]
    cat = no_failures(CAT.find_model("flux-1-dev")[0])
    res = simulate(lane + pair, load_policy("smart", cat), catalog=cat)
    src, dup = len(lane), len(lane) + 1
    (batch,) = [b for b in res.batches if b.id == res.batch_of[src]]
    assert batch.t > 101.0  # the source's batch went after the duplicate arrived
    assert _HIT[int(res.hit[dup])] == "near" and res.done_at[dup] == res.done_at[src] and res.cost[dup] == 0.0


# -- following a leader due later, under a release time -----------------------------------------------------------

def test_a_follower_due_before_its_leader_is_released_once_and_only_while_it_still_waits():
    t: InFlight[int] = InFlight(REUSE, lambda r: 100.0)
    leader, f = req(0, "x", 3600.0), req(1, "x", 600.0)
    t.lead("fp", leader, 0)
    assert t.follow("fp", f, 1, now=0.0) == 500.0  # its deadline minus its lead
    assert t.follow("fp", req(2, "x", 90.0), 2, now=0.0) is None  # its release time has passed already
    assert t.release("fp", 1) and not t.release("fp", 1)  # released once, then generated on its own
    assert t.done("fp", 0) == []  # the leader's result no longer resolves it: one answer per request
    # Resolved before its release time: nothing to release.
    t.lead("fp", leader, 0)
    t.follow("fp", f, 1, now=0.0)
    assert t.done("fp", 0) == [(1, "in_flight")] and not t.release("fp", 1)
    # Its leader failed for good first: the orphans' path generates it, so a release must not (billed twice).
    t.lead("fp", leader, 0)
    t.follow("fp", f, 1, now=0.0)
    t.drop("fp", leader.uid)
    assert not t.release("fp", 1) and t.orphans("fp", leader.uid) == [(1, "in_flight")]


def test_only_requests_without_a_batch_api_lever_have_a_release_lead():
    lead_of = release_lead(CAT, REUSE)
    assert lead_of(req(0, "Summarise the report", model="gpt-5-mini")) is None  # a batch lever: its own batch
    video = req(1, "A red car at night", model="veo-3-fast")
    assert lead_of(video) > REUSE.follow_margin_s  # twice its call's p99 plus the margin
    assert lead_of(req(2, "A red car at night", model="flux-1-dev")) is None  # GPU-priced: its lane's backlog
    off = REUSE._replace(follow_margin_s=None)
    assert release_lead(CAT, off) is None  # the policy turned it off: a leader due later is not followed
    t: InFlight[int] = InFlight(off, release_lead(CAT, off))
    t.lead("fp", video.model_copy(update={"id": "r0", "deadline_s": 86400.0}), 0)
    assert t.follow("fp", video, 1) is None


def test_a_video_resent_while_the_first_is_generated_is_not_paid_twice():
    """The campaign case: the first copy was sent with a day to spare and is being generated when a copy due
    within the hour arrives. It takes the first copy's result (before: it was generated a second time)."""
    cat = no_failures(CAT.find_model("veo-3-fast")[0])
    reqs = [req(0, "A red car parked on a wet street at night", 86400.0, reuse="exact", model="veo-3-fast"),
            req(1, "A red car parked on a wet street at night", 3600.0, reuse="exact", model="veo-3-fast",
                arrival_s=10.0)]
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    assert _HIT[int(res.hit[1])] == "in_flight" and res.cost[1] == 0.0 and res.done_at[1] == res.done_at[0]
    off = load_policy("smart", cat, {"in_flight_margin_s": None})
    res = simulate(reqs, off, catalog=cat)
    assert _HIT[int(res.hit[1])] is None and res.cost[1] > 0.0  # the old rule: due sooner, never followed


def test_a_follower_whose_leader_is_late_is_sent_on_its_own_in_time():
    """The leader waits behind 30 images at a provider that runs one call at a time; the copy due in 200 s
    follows it, is released at its release time, and, promoted by its deadline at the rate gate, is generated
    before its deadline (it would have been paid twice under the old rule as well: it went at arrival)."""
    raw = CAT.model_dump()
    raw["providers"]["google"]["failure_rate"] = 0.0
    raw["providers"]["google"]["rate_limits"]["max_concurrency"] = 1
    cat = Catalog.model_validate(raw)
    queue = [req(10 + k, f"A lighthouse in fog, take {k}", 3600.0, model="imagen-4") for k in range(30)]
    pair = [req(0, NEAR_PAIR[0], 3600.0, reuse="exact", model="imagen-4", arrival_s=1.0),
            req(1, NEAR_PAIR[0], 200.0, reuse="exact", model="imagen-4", arrival_s=2.0)]
    res = simulate(queue + pair, load_policy("smart", cat), catalog=cat)
    src, dup = len(queue), len(queue) + 1
    until = pair[1].deadline_at - release_lead(cat, REUSE)(pair[1])
    assert res.done_at[src] > pair[1].deadline_at  # the leader's result came too late for the copy
    assert res.hit[dup] == 0 and res.cost[dup] > 0.0  # so it was generated on its own...
    assert until <= res.done_at[dup] <= pair[1].deadline_at and res.met.all()  # ...after its release, in time


def test_the_cache_sends_a_released_follower_to_the_groupers_and_not_again_with_its_leader(tmp_path):
    async def go():
        hub, clock = ResultHub(), ManualClock(0.0)
        sent: list[Job] = []
        got = asyncio.Event()

        class Grouper:
            async def add(self, jobs: list[Job]) -> None:
                sent.extend(jobs)
                got.set()

        settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
        cache = ResultCache(REUSE, hub, clock, settings=settings, groupers=[Grouper()])
        a = req(0, "A red car parked on a wet street at night", 86400.0, reuse="exact", model="veo-3-fast")
        b = a.model_copy(update={"id": "r1", "deadline_s": 600.0})
        leader, follower = Job(0, a, fingerprint(a)), Job(1, b, fingerprint(b))
        await cache.lookup([leader])
        await got.wait()
        got.clear()
        await cache.lookup([follower])
        assert sent == [leader] and cache.inflight.n_following() == 1  # it follows; nothing is sent for it
        clock.advance(b.deadline_s - release_lead(CAT, REUSE)(b))
        await asyncio.wait_for(got.wait(), 10)  # the cache's release timer, not a sleep of the test's
        assert sent == [leader, follower] and cache.stats["released"] == 1 and cache.inflight.n_following() == 0
        await cache.complete([(leader.fp, Result(id=a.id, tenant="acme", status="ok", output="vid://o",
                                                 cost_usd=1.2, mode="sync", provider=a.provider, model=a.model,
                                                 done_s=clock.now()))])
        return await hub.pull(0.01)
    assert asyncio.run(go()) == []  # the leader's result answers nobody else: the follower is being generated


def test_the_cache_keeps_no_release_timer_for_followers_already_answered_nor_without_a_clock(tmp_path):
    """A manual clock cannot wake the cache, so its timer polls; it polled on for a follower answered long
    before its release time (until a time the test's clock may never reach), and, with no clock at all (an
    actor before ``set_clock``: no time passes), for ever."""
    async def go():
        settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
        a = req(0, "A red car parked on a wet street at night", 86400.0, reuse="exact", model="veo-3-fast")
        b = a.model_copy(update={"id": "r1", "deadline_s": 600.0})
        leader, follower = Job(0, a, fingerprint(a)), Job(1, b, fingerprint(b))
        done = Result(id=a.id, tenant="acme", status="ok", output="vid://o", cost_usd=1.2, mode="sync",
                      provider=a.provider, model=a.model, done_s=1.0)

        cache = ResultCache(REUSE, ResultHub(), ManualClock(0.0), settings=settings)
        await cache.lookup([leader])
        await cache.lookup([follower])
        assert cache.inflight.n_following() == 1 and cache._release_timer is not None
        await cache.complete([(leader.fp, done)])
        assert cache._release_timer is None and cache._releases == []  # answered: nothing left to release

        cache = ResultCache(REUSE, ResultHub(), None, settings=settings)
        await cache.lookup([leader])
        await cache.lookup([follower])
        assert cache.inflight.n_following() == 1 and cache._release_timer is None  # nothing can come due
        await cache.set_clock(ManualClock(0.0))
        assert cache._release_timer is not None  # the clock is here: its release time can come
        # Its leader failed for good: the orphans' path generates it, and no timer is kept for it.
        await cache.complete([(leader.fp, done.model_copy(update={"status": "failed", "output": None}))])
        assert cache._release_timer is None and await cache.orphans([(leader.fp, a.uid)]) == [follower]

    asyncio.run(go())


# -- a review of the several-leaders change (stop 45): each case failed on the first version ----------------------

_CAR = "A red car parked on a wet street at night"


def _video(i: int, due: float, at: float = 0.0, prompt: str = _CAR, reuse: str = "exact") -> Request:
    return req(i, prompt, due, reuse=reuse, model="veo-3-fast", arrival_s=at)


def _cache(tmp_path, clock):
    sent: list[Job] = []

    class Grouper:
        async def add(self, jobs: list[Job]) -> None:
            sent.extend(jobs)

    hub = ResultHub()
    settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
    return ResultCache(REUSE, hub, clock, settings=settings, groupers=[Grouper()]), hub, sent


def _job(i: int, r: Request) -> Job:
    return Job(i, r, fingerprint(r))


def _done(j: Job, at: float, status: str = "ok") -> tuple[str, Result]:
    r = j.req
    if status != "ok":
        return j.fp, Result(id=r.id, tenant="acme", status=status, error="boom")
    return j.fp, Result(id=r.id, tenant="acme", status="ok", output="vid://o", cost_usd=1.2, mode="sync",
                        provider=r.provider, model=r.model, done_s=at)


def _failing_first(n: int) -> Draws:
    s = Settings()
    return _LeaderAlwaysFails(n, s.sim.max_attempts, 0, s.sim.batch_slot_s)


def _google_fails_half() -> Catalog:
    raw = CAT.model_dump()
    raw["providers"]["google"]["failure_rate"] = 0.5
    return Catalog.model_validate(raw)


def test_an_orphan_that_follows_another_leader_is_not_released_by_its_old_timer(tmp_path):
    """F follows L1 (due a day later) under a release time; L2, due before F, leads too; L1 fails and F follows
    L2 until its result. F's old timer released it anyway in the simulator (paid $1.20 for a result L2 gave),
    and in the cache only when the heap's order let it."""
    lead = release_lead(CAT, REUSE)(_video(9, 600.0))
    f_due = 210.0 + lead - 169.5  # F's release time: 210
    reqs = [_video(0, 86400.0), _video(1, f_due, at=169.5), _video(2, 400.0, at=170.0)]
    cat = _google_fails_half()
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, draws=_failing_first(3))
    assert _HIT[int(res.hit[1])] == "in_flight" and res.cost[1] == 0.0 and res.done_at[1] == res.done_at[2]

    async def in_the_cache(other: bool):
        clock = ManualClock(0.0)
        cache, hub, sent = _cache(tmp_path, clock)
        l1 = _job(0, reqs[0])
        await cache.lookup([l1])
        if other:  # an unrelated follower whose release time comes first: F's entry is not the heap's top
            await cache.lookup([_job(10, _video(10, 86400.0, prompt="a blue boat"))])
            await cache.lookup([_job(11, _video(11, 190.0 + lead, prompt="a blue boat"))])
        clock.t = 169.5
        f = _job(1, reqs[1])
        await cache.lookup([f])
        clock.t = 170.0
        l2 = _job(2, reqs[2])
        await cache.lookup([l2])
        clock.t = 177.0
        await cache.complete([_done(l1, 177.0, "failed")])
        assert await cache.orphans([(l1.fp, l1.req.uid)]) == []  # F follows L2
        clock.t = 211.0
        cache._release_due()  # the timer's call, at F's old release time
        clock.t = 250.0
        await cache.complete([_done(l2, 250.0)])
        return [j.req.id for j in sent], {r.id: r.hit for r in await hub.pull(0.01)}

    for other in (False, True):
        sent, hits = asyncio.run(in_the_cache(other))
        assert "r1" not in sent and hits["r1"] == "in_flight", (other, sent, hits)


def test_an_orphan_whose_fingerprint_was_answered_in_the_same_moment_takes_that_answer(tmp_path):
    """L1 fails and L2 (the same prompt, due sooner) succeeds in one cache round, whose fills come before its
    orphans: F, L1's follower, was generated again though L2's result was stored (the simulator answered it)."""
    async def go():
        clock = ManualClock(0.0)
        cache, hub, sent = _cache(tmp_path, clock)
        l1, f, l2 = _job(0, _video(0, 86400.0)), _job(1, _video(1, 90000.0, at=1.0)), _job(2, _video(2, 400.0, at=170.0))
        for j in (l1, f, l2):
            clock.t = j.req.arrival_s
            await cache.lookup([j])
        clock.t = 177.5
        await cache.complete([_done(l1, 177.5, "failed"), _done(l2, 177.5)])
        again = await cache.orphans([(l1.fp, l1.req.uid)])
        return again, {r.id: r.hit for r in await hub.pull(0.01)}
    again, hits = asyncio.run(go())
    assert again == [] and hits == {"r1": "in_flight"}


def test_identical_near_orphans_of_a_failed_leader_are_generated_once(tmp_path):
    """N1 and N2 (the same text) follow L as near copies; L fails: N1 leads its own fingerprint and N2 follows it,
    where each was generated (both runtimes)."""
    a, b = NEAR_PAIR
    reqs = [req(0, a, 600.0, reuse="exact"), req(1, b, 900.0, arrival_s=1.0), req(2, b, 1200.0, arrival_s=2.0)]
    cat = _google_fails_half()
    res = simulate(reqs, load_policy("smart", cat), catalog=cat, draws=_failing_first(3))
    assert [_HIT[int(h)] for h in res.hit] == [None, None, "in_flight"] and res.cost[2] == 0.0

    async def in_the_cache():
        cache, hub, sent = _cache(tmp_path, ManualClock(0.0))
        jobs = [_job(k, r) for k, r in enumerate(reqs)]
        for j in jobs:
            await cache.lookup([j])
        assert [f.req.id for f in cache.inflight.following()] == ["r1", "r2"]
        await cache.complete([_done(jobs[0], 5.0, "failed")])
        return [j.req.id for j in await cache.orphans([(jobs[0].fp, reqs[0].uid)])]
    assert asyncio.run(in_the_cache()) == ["r1"]


def test_a_released_follower_follows_a_copy_due_before_it_instead_of_being_generated():
    """F followed L1 (due a day later) under a release time; L2, due before F, led meanwhile. At F's release
    time it took L2's result, where it was generated (a third paid call)."""
    t: InFlight[int] = InFlight(REUSE, lambda r: 100.0)
    l1, f, l2 = req(0, "x", 86400.0), req(1, "x", 600.0), req(2, "x", 550.0)
    t.lead("fp", l1, 0)
    assert t.follow("fp", f, 1, now=0.0) == 500.0
    assert t.lead("fp", l2, 2)
    assert t.release("fp", 1, 499.0) is None and t.waits("fp", 1)  # not its time: an old timer's
    assert t.release("fp", 1, 500.0) == "in_flight"
    assert t.follow("fp", f, 1, now=500.0) == float("inf")  # the runtime's next step: L2 takes it
    assert t.done("fp", 2) == [(1, "in_flight")]
