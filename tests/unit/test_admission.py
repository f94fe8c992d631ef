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
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings
from engine.runtime.admission import InFlight
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
SMART = load_policy("smart", CAT)
REUSE = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=SMART.reuse.near_threshold)
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


def test_a_request_that_does_not_lead_takes_no_followers_when_it_fails():
    """A is generating (due 600) and F follows it; B, identical but due sooner, could not follow A and is
    generated too. B fails: F still waits for A (generating it again would bill it twice)."""
    t: InFlight[int] = InFlight(REUSE)
    a, b, f = req(0, "x", 600.0), req(1, "x", 300.0), req(2, "x", 900.0)
    t.lead("fp", a, 0)
    assert not t.follow("fp", b, 1) and not t.lead("fp", b, 1)
    assert t.follow("fp", f, 2)
    assert t.orphans("fp", b.uid) == [] and t.leader("fp") == 0
    assert t.done("fp", 0) == [(2, "in_flight")]


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
    "no-reuse leader in between": ([req(0, NEAR_PAIR[1], 3600.0), req(1, NEAR_PAIR[1], 1800.0, reuse="none"),
                                    req(2, NEAR_PAIR[1], 3000.0)], [None, None, None]),
    "exact-only leader in between": ([req(0, NEAR_PAIR[0], reuse="exact"), req(1, NEAR_PAIR[1]),
                                      req(2, NEAR_PAIR[1], reuse="exact"), req(3, NEAR_PAIR[1])],
                                     [None, "near", None, "in_flight"]),
    # A source due later is never followed, whichever runtime.
    "source due later": ([req(0, NEAR_PAIR[0], 900.0, reuse="exact"), req(1, NEAR_PAIR[1], 600.0)], [None, None]),
}


@pytest.mark.parametrize("case", sorted(ORDER_CASES))
def test_requests_arriving_together_are_admitted_in_arrival_order_in_both_runtimes(case, tmp_path):
    reqs, want = ORDER_CASES[case]
    assert in_the_simulator(reqs) == want
    assert in_the_cache(reqs, tmp_path) == want


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
