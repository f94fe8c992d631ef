"""Sharded ingest, cache and result hub, in one process: each shard gets only what its key routes to it, and
reuse and per-driver results work across shards as with one actor of each."""

import asyncio

from actors import Ingest, ResultCache, ResultHub
from actors._shards import Shards, by_result_uid, class_shard, uid_shard
from engine.core.clock import ManualClock
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings

MODELS = ["gpt-5-mini", "gpt-5", "claude-haiku-4-5", "claude-sonnet-4-5", "gemini-2.5-flash", "gemini-2.5-pro"]


class Recorder:
    def __init__(self):
        self.jobs = []

    async def add(self, jobs):
        self.jobs.extend(jobs)


def req(i, model, prompt):
    return Request.model_validate({"id": f"r{i}", "arrival_s": float(i), "model": model, "prompt": prompt,
                                   "input_tokens": 50, "output_tokens": 10, "reuse": "exact"})


def test_parts_route_each_item_once_and_keep_parallel_lists_aligned():
    s = Shards([object(), object(), object()])
    items = list(range(20))
    parts = s._parts(lambda x, n: x % n, items, ([f"p{x}" for x in items],))
    assert sorted(k for _, pos, _ in parts for k in pos) == items
    for shard, pos, (part, par) in parts:
        assert all(x % 3 == shard for x in part) and par == [f"p{x}" for x in part] and part == [items[k] for k in pos]
    assert s._parts([2, 0], ["a", "b"], ()) == [(0, [1], (["b"],)), (2, [0], (["a"],))]  # shards given per item
    one = Shards(object())
    assert one._parts(lambda x, n: 5, items, ()) == [(0, None, (items,))]  # one shard: the whole, unsplit
    assert one._parts(lambda x, n: 0, [], ()) == []
    assert Shards(None) == [] and not Shards(None) and Shards(None)._parts(by_result_uid, items, ()) == []


def test_a_sharded_engine_reuses_across_ingest_shards_and_routes_every_result_to_its_hub_shard(tmp_path):
    async def go():
        hubs = [ResultHub(), ResultHub()]
        settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path)})
        reuse = ReuseSettings(exact=True, in_flight=True)
        caches = [ResultCache(reuse, hubs, ManualClock(0.0), settings=settings, shard=(k, 2)) for k in range(2)]
        groupers = [Recorder(), Recorder()]
        ingests = [Ingest(groupers, caches, hub=hubs, shard=(k, 2)) for k in range(2)]
        # Each prompt twice, under another id: the copy must follow the first. Requests go to ingest by class,
        # as the driver sends them, so a class reaches its cache shard in submission order.
        reqs = [req(i, MODELS[i % len(MODELS)], f"prompt {i}") for i in range(24)]
        copies = [req(100 + i, r.model, r.prompt) for i, r in enumerate(reqs)]
        for batch in (reqs, copies):
            parts = Shards(ingests)._parts(class_shard, batch, ())
            await asyncio.gather(*(ingests[s].submit(part, "drv") for s, _, (part,) in parts))
        await asyncio.sleep(0)
        assert {i.next_seq for i in ingests} != {0}  # both ingest shards admitted some
        sent = [j for g in groupers for j in g.jobs]
        assert sorted(j.req.id for j in sent) == sorted(r.id for r in reqs)  # only the first of each is generated
        for k, c in enumerate(caches):  # a cache shard holds only its classes, and both hold some
            assert c.generating and all(class_shard(it.req, 2) == k for it in c.generating.values())
        # The dispatcher's side: each result to its class's cache shard (which resolves the copies) and its
        # id's hub shard.
        done = [(j.fp, Result(id=j.req.id, status="ok", output=f"out {j.req.prompt}", cost_usd=0.01, mode="sync",
                              provider=j.req.provider, model=j.req.model, done_s=30.0)) for j in sent]
        await Shards(caches).call("complete", [class_shard(j.req, 2) for j in sent], done)
        await Shards(hubs).call("push", by_result_uid, [r for _, r in done], [0.02] * len(done))
        got = {}
        for k, h in enumerate(hubs):
            for r in await h.pull(0, "drv"):
                assert uid_shard(r.uid, 2) == k  # every result reached the hub shard of its id
                got[r.id] = r
        assert sorted(got) == sorted(r.id for r in reqs + copies)
        assert all(got[c.id].status == "reused" and got[c.id].output == f"out {c.prompt}" for c in copies)
        reports = [await h.report() for h in hubs]
        assert all(rep["requests"] > 0 for rep in reports) and sum(rep["requests"] for rep in reports) == 48
    asyncio.run(go())


def one_id_two_contents():
    """Two hub shards, two ingest shards (by class) and one grouper; one id with two contents of two classes
    (``first`` admitted by ingest ``a``, ``other`` by ``b``)."""
    hubs = [ResultHub(), ResultHub()]
    groupers = [Recorder()]
    ingests = [Ingest(groupers, None, hub=hubs, shard=(k, 2)) for k in range(2)]
    first = req(1, "gpt-5-mini", "a")
    other = next(r for r in (req(1, m, "a") for m in MODELS) if class_shard(r, 2) != class_shard(first, 2))
    return hubs, groupers, ingests, first, other, ingests[class_shard(first, 2)], ingests[class_shard(other, 2)]


def test_an_id_sent_with_other_content_to_another_ingest_shard_is_refused_by_the_hub_shard_of_the_id():
    async def go():
        hubs, groupers, ingests, first, other, a, b = one_id_two_contents()
        assert a is not b
        assert await a.submit([first], "one") == 1
        assert await b.submit([other], "two") == 0  # refused: the id names another content
        assert await a.submit([first], "two") == 0 and a.duplicates == 1  # the same content: the same request
        await asyncio.sleep(0)
        assert [j.req.model for j in groupers[0].jobs] == [first.model]  # only the first is generated
        hub = hubs[uid_shard(first.uid, 2)]
        (refused,) = await hub.pull(0, "two")
        assert refused.status == "failed" and "field 'id'" in refused.error and "other content" in refused.error
        await hub.forget([first.uid])  # the driver's retention passed: the id is free again
        await a.forget([first.uid])
        assert await b.submit([other], "two") == 1
    asyncio.run(go())


def test_reports_of_hub_shards_add_up_and_a_state_is_up_only_when_every_shard_is():
    from actors.hub import merge_reports, sum_figures

    async def go():
        hubs = [ResultHub(), ResultHub()]
        done = [Result(id=f"r{k}", status="ok", cost_usd=0.01 * (k + 1), mode="sync", provider="openai",
                       model="gpt-5-mini", arrival_s=0.0, done_s=1.0, deadline_met=k != 2) for k in range(5)]
        await Shards(hubs).call("push", by_result_uid, done, [0.1] * 5)
        reps = [await h.report() for h in hubs]
        assert all(r["requests"] for r in reps)  # both shards counted some
        rep = merge_reports(reps)
        assert rep["requests"] == 5 and rep["by_status"] == {"ok": 5} and rep["by_mode"] == {"sync": 5}
        assert abs(rep["spend_usd"] - 0.15) < 1e-9 and abs(rep["list_price_usd"] - 0.5) < 1e-9
        assert abs(rep["saving_frac"] - 0.7) < 1e-6 and rep["deadline_met_frac"] == 0.8
        assert rep["by_provider"]["openai"]["requests"] == 5
    asyncio.run(go())
    cache = sum_figures([{"near": 2, "redis_up": 1, "layer": "x", "nested": {"a": 1}},
                         {"near": 3, "redis_up": 0, "layer": "y", "nested": {"a": 2}}])
    assert cache == {"near": 5, "redis_up": 0, "layer": "x", "nested": {"a": 3}}


class Handle:
    """A stand-in Ray actor handle: ``h.method.remote(*args)`` is recorded."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        rec = self.calls

        class _M:
            @staticmethod
            def remote(*args):
                rec.append((name, args))
                return rec[-1]  # stands in for the call's ObjectRef: one object per call
        return _M


def test_the_driver_sends_a_class_to_one_ingest_shard_and_forgets_ids_there():
    from engine.app._driver_pull import Pulling

    class Driver(Pulling):
        _client = "drv"

    d = Driver()
    d._forgetting = []
    d._h = {"ingests": [Handle(), Handle()], "hubs": [Handle(), Handle()]}
    reqs = [req(i, MODELS[i % len(MODELS)], f"p{i}") for i in range(30)]
    parts = d._by_ingest(reqs)
    assert sorted(r.id for _, part in parts for r in part) == sorted(r.id for r in reqs) and len(parts) == 2
    for ingest, part in parts:
        k = d._h["ingests"].index(ingest)
        assert all(class_shard(r, 2) == k for r in part)
    d._forget(reqs)
    for k, h in enumerate(d._h["ingests"]):
        (name, (uids, client)), = h.calls
        assert name == "forget" and client == "drv" and all(class_shard(r, 2) == k for r in reqs if r.uid in uids)
    # Not to the hubs directly: ingest tells them once no other driver holds an id.
    assert all(h.calls == [] for h in d._h["hubs"])
    assert sum(len(h.calls[0][1][0]) for h in d._h["ingests"]) == 30
    # Until a forget is done, a new request under one of its ids waits for it; another id does not.
    assert len(d._forgetting) == 2 and d._forgets_of([req(99, MODELS[0], "p99")]) == []
    (ref,) = d._forgets_of([reqs[0]])
    assert ref is next(r for r, uids in d._forgetting if reqs[0].uid in uids)


def test_a_hub_shard_that_restarted_still_refuses_an_id_with_other_content_and_so_does_readmission():
    async def go():
        hubs, groupers, ingests, first, other, a, b = one_id_two_contents()
        assert await a.submit([first], "one") == 1
        k = uid_shard(first.uid, 2)
        hubs[k] = ResultHub()  # restarted: it forgot which content the id names ...
        for i in ingests:
            i.hubs[k] = Shards(hubs[k])[0]
        assert sum([await i.reregister(k) for i in ingests]) == 1  # ... and the ingest shards tell it again
        assert await b.submit([other], "two") == 0
        assert await b.readmit([other], "two") == 0  # a re-admission is checked too
        await asyncio.sleep(0)
        assert [j.req.model for j in groupers[0].jobs] == [first.model]
        refusals = await hubs[k].pull(0, "two")
        assert len(refusals) == 2 and all("other content" in r.error for r in refusals)
    asyncio.run(go())


def test_a_restarted_hub_shard_admits_nothing_until_the_ingest_shards_gave_their_fingerprints_back():
    """Until the drivers' rewire (about a second), a restarted hub shard took the first content to come for an id:
    another driver's other content under a used id was generated or got the first one's answer, and the first
    driver's own request was refused (a hunt). ``admit`` now waits for every ingest shard's ``register``."""
    async def go():
        hubs, groupers, ingests, first, other, a, b = one_id_two_contents()
        assert await a.submit([first], "one") == 1
        k = uid_shard(first.uid, 2)
        hubs[k] = ResultHub(ingests=2)
        hubs[k].reconstructed()  # as actors.remote does for an actor Ray restarted
        for i in ingests:
            i.hubs[k] = Shards(hubs[k])[0]
        early = asyncio.ensure_future(b.submit([other], "two"))  # before the rewire
        for _ in range(10):
            await asyncio.sleep(0)
        assert not early.done()  # held: the id's content is not known yet
        assert await a.reregister(k) == 1
        await asyncio.sleep(0)
        assert not early.done()  # one ingest shard is not enough
        assert await b.reregister(k) == 0
        assert await early == 0  # refused: the id names the first content
        assert await a.readmit([first], "one") == 1  # the first one's own re-admission goes on, not refused
        await asyncio.sleep(0)
        assert [j.req.model for j in groupers[0].jobs] == [first.model] * 2  # the other content never
        (refusal,) = await hubs[k].pull(0, "two")
        assert "other content" in refusal.error and await hubs[k].pull(0, "one") == []
    asyncio.run(go())


def test_a_restarted_hub_shard_whose_registrations_never_come_admits_in_arrival_order_at_its_deadline(monkeypatch):
    """No driver rewires it: at ``REGISTER_WAIT_S`` every waiting admit goes on, in the order they came. One that
    timed out alone let later ones pass while earlier ones waited on, and the first content lost its id (a review)."""
    from actors import hub as hub_module

    monkeypatch.setattr(hub_module, "REGISTER_WAIT_S", 0.2)

    async def go():
        hub = ResultHub(ingests=2)
        hub.reconstructed()
        a = asyncio.ensure_future(hub.admit("A", ["x"], ["fpA"]))
        await asyncio.sleep(0.1)
        b = asyncio.ensure_future(hub.admit("B", ["y"], ["fpB"]))  # the first to ask for y
        await asyncio.sleep(0)
        assert not a.done() and not b.done()  # both held
        assert (await a)[0] == []  # the deadline: A goes on ...
        c = await hub.admit("C", ["y"], ["fpC"])  # ... and so does B, before C, which waits no more
        assert b.done() and (await b)[0] == [] and c[0] == ["y"]  # the first comer keeps the id
    asyncio.run(go())


def test_followers_of_a_request_rerouted_to_another_class_are_released_at_the_cache_shard_that_holds_them():
    from actors import Grouper
    from actors._types import Job
    from engine.core.catalog import default_catalog
    from policies import load_policy

    class Caches:
        def __init__(self):
            self.calls = []

        async def orphans(self, failed):
            self.calls.append(failed)
            return []

    async def go():
        cat = default_catalog()
        caches = [Caches(), Caches()]
        g = Grouper(load_policy("naive", cat), cat, ManualClock(0.0), {}, None, [ResultHub()], budget_limited=False,
                    cache=caches)
        r = req(1, "gpt-5-mini", "a")
        looked_up_at = 1 - class_shard(r, 2)  # as if it was rerouted from a model of the other class
        j = Job(0, r, "fp", cache_shard=looked_up_at)
        await g._resolve([(j, Result(id=r.id, status="failed", error="x"))])
        assert caches[looked_up_at].calls == [[("fp", r.uid)]] and caches[1 - looked_up_at].calls == []
    asyncio.run(go())
