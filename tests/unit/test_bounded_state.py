"""State that a long-running engine (``smartbatch serve``, a driver that submits for days) must not keep for good:
each test runs past the window in which the state matters and checks it was let go, not only that it works."""

from __future__ import annotations

import asyncio

from actors.providers.anthropic_http import AnthropicProvider
from engine.core.catalog import default_catalog
from engine.core.clock import ManualClock
from engine.core.draws import Draws
from engine.core.provider_api import CallJob, Secret, Usage
from engine.core.request import Request
from engine.core.settings import Settings
from engine.runtime.providers import SimProvider

CAT = default_catalog()


def fresh_prefix(k: int, t: float, model: str = "claude-haiku-4-5") -> Request:
    """A request whose 8 prefix blocks no request before it had (as a Mooncake trace's hash ids)."""
    return Request.model_validate({"id": f"r{k}", "arrival_s": t, "model": model, "input_tokens": 6000,
                                   "output_tokens": 10, "prefix_blocks": list(range(8 * k, 8 * k + 8))})


def test_the_simulated_provider_forgets_prefix_blocks_long_cold():
    s = Settings()
    prov = SimProvider(CAT.provider("anthropic"), CAT, s, Draws(0, s.sim.max_attempts, 0, s.sim.batch_slot_s))
    ttl = prov.spec.prompt_cache.ttl_s
    step = ttl / 10
    for k in range(200):  # 20 TTLs of engine time, each request writing its own prefix
        prov.sync(k, fresh_prefix(k, k * step), k * step, 0, True)
        prov.pump(k * step)
    held = sum(len(w) for w in prov.warm.values())
    # An explicit cache keeps one entry a write, named by its last block (docs/simulator.md, "Explicit caches").
    assert 0 < held <= 30, f"{held} entries held, of 200 written; at most ~3 TTLs' worth may stay"
    # An entry still warm is read as warm: the next call reading the last prefix finds it written.
    last = fresh_prefix(199, 199 * step).model_copy(update={"id": "again"})
    spec = prov.spec.models[last.model]
    assert prov._sync_price(last, spec, 199 * step + 1, False)[1] == len(last.prefix_blocks)


def test_the_anthropic_provider_forgets_prefix_blocks_gone_cold():
    s = Settings()
    clock = ManualClock(0.0)
    p = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-test"), clock)
    try:
        ttl = p.spec.prompt_cache.ttl_s
        for k in range(200):
            job = CallJob(f"k{k}", fresh_prefix(k, clock.now()), clock.now(), 0, k)
            p._keep_warm(job, Usage(6000, 10, 0, 4096))
            assert p._warm_blocks(job) == 8  # what it just wrote is warm
            clock.advance(ttl / 10)
        held = len(p._warm)  # a PrefixWarmth: the blocks it holds
        assert 0 < held <= 8 * 30, f"{held} prefix blocks held, of 1,600 written; at most ~2 TTLs' worth may stay"
    finally:
        asyncio.run(p.close())


def test_the_anthropic_provider_lets_go_of_its_batch_members_breakpoints(monkeypatch):
    """A batch member's shallower breakpoints (stop 86's review, ``_parts``) wait for its answer, which notes them
    warm and drops them; those of members never answered go past ``PARTS_KEEP``, the oldest first."""
    import actors.providers.anthropic_http as mod

    monkeypatch.setattr(mod, "PARTS_KEEP", 6)
    s = Settings()
    p = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-test"), ManualClock(0.0))
    try:
        for k in range(20):  # each batch: a ten-block member, then members parting from it at four and ten blocks
            first = list(range(100 * k, 100 * k + 10))
            reqs = [Request.model_validate({"id": f"r{k}.{i}", "arrival_s": 0.0, "model": "claude-sonnet-4-5",
                                            "input_tokens": 512 * len(b) + 100, "output_tokens": 1,
                                            "prefix_blocks": b})
                    for i, b in enumerate([first, first[:4] + [99], first + [98]])]
            jobs = [CallJob(f"k{k}.{i}", r, 0.0, 0, 0) for i, r in enumerate(reqs)]
            p.batch_body(jobs)
            assert p._parts[jobs[0].key] == (4,)
            if k % 2:  # answered: noted warm and let go
                p._keep_warm(jobs[0], Usage(5220, 1, 0, 5120))
                assert jobs[0].key not in p._parts and p._warm_blocks(jobs[1]) == 4
        assert list(p._parts) == [f"k{k}.0" for k in (10, 12, 14, 16, 18)]  # the newest never answered
    finally:
        asyncio.run(p.close())


def test_ingest_forgets_the_ids_of_a_driver_killed_without_stop(monkeypatch):
    """A driver killed without ``stop()`` never forgets nor leaves; once the hub has dropped it as gone, ingest
    forgets the ids only it held, and keeps those another driver holds too. A driver dropped but only paused
    keeps its ids when it comes back before the forget."""
    import actors._ingest_holders as ingest_mod
    from actors import Ingest, ResultHub
    from actors import hub as hub_mod
    from engine.core.result import Result
    from tests.unit.helpers import Recorder

    monkeypatch.setattr(ingest_mod, "DROPS_CHECK_S", 0.0)
    monkeypatch.setattr(ingest_mod, "DROPPED_FORGET_S", 0.0)

    def reqs(prefix: str, n: int) -> list[Request]:
        return [Request.model_validate({"id": f"{prefix}{k}", "arrival_s": 0.0, "model": "gpt-5-mini",
                                        "prompt": f"q{k}"}) for k in range(n)]

    def drop_idle(hub: ResultHub, client: str) -> None:
        hub._clients[client].seen_at -= hub_mod.CLIENT_IDLE_S + 1  # 15 minutes without a pull
        hub._next_idle_check = 0.0

    async def go():
        hub = ResultHub()
        ing = Ingest([Recorder()], cache=None, hub=hub)
        for client in ("dead", "paused", "live"):
            await hub.claim(client, [])
        dead, shared, paused = reqs("d", 50), reqs("s", 5), reqs("p", 5)
        await ing.submit(dead + shared, "dead")
        await ing.submit(shared, "live")
        await ing.submit(paused, "paused")
        await asyncio.sleep(0)
        await hub.push([Result(id=r.id, status="ok", output="o") for r in dead + shared + paused])
        drop_idle(hub, "dead")
        drop_idle(hub, "paused")
        await hub.push([Result(id="other", status="ok")])  # a push runs the hub's idle check
        assert {"dead", "paused"} <= hub._lost
        # "paused" comes back (its pull says it was dropped; it re-admits its open requests) before the forget.
        assert await hub.pull(0.0, "paused") is None
        monkeypatch.setattr(ingest_mod, "DROPPED_FORGET_S", 0.05)
        await ing.submit(reqs("n", 1), "live")  # the next submit asks the hub which drivers it dropped
        await asyncio.sleep(0.01)
        await ing.readmit(paused, "paused")
        await asyncio.sleep(0.1)
        for _ in range(3):
            await asyncio.sleep(0)
        held = set(ing.seen)
        assert not held & {r.uid for r in dead}, "the dead driver's ids are still held"
        assert {r.uid for r in shared} <= held and set(ing.holders) >= {r.uid for r in shared}
        assert {r.uid for r in paused} <= held, "the paused driver came back: its ids stay"
        assert all(h in ("live", {"live"}) for u, h in ing.holders.items() if u in {r.uid for r in shared})
    asyncio.run(go())


def test_a_dropped_driver_back_before_ingest_reads_the_drop_keeps_its_ids(monkeypatch):
    """A driver paused past the hub's idle limit comes back (its pull says it was dropped; it re-admits its
    open requests) before ingest asks the hub for drops, then submits nothing more there (its batch-API
    requests take hours). Its ids stay: forgotten, another driver could reuse one with other content, be
    accepted, and the paused driver be handed the result of a request it never sent."""
    import actors._ingest_holders as ingest_mod
    from actors import Ingest, ResultHub
    from actors import hub as hub_mod
    from engine.core.result import Result
    from tests.unit.helpers import Recorder

    monkeypatch.setattr(ingest_mod, "DROPS_CHECK_S", 0.0)
    monkeypatch.setattr(ingest_mod, "DROPPED_FORGET_S", 0.05)

    def req(k: int, prompt: str = "q") -> Request:
        return Request.model_validate({"id": f"p{k}", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt})

    async def go():
        hub, grouper = ResultHub(), Recorder()
        ing = Ingest([grouper], cache=None, hub=hub)
        for client in ("paused", "live"):
            await hub.claim(client, [])
        await ing.submit([req(k) for k in range(5)], "paused")  # open for hours
        hub._clients["paused"].seen_at -= hub_mod.CLIENT_IDLE_S + 1
        hub._next_idle_check = 0.0
        await hub.push([Result(id="other", status="ok")])  # a push runs the hub's idle check
        assert await hub.pull(0.0, "paused") is None  # back: told it was dropped
        await ing.readmit([req(k) for k in range(5)], "paused")
        await ing.submit([Request.model_validate({"id": "n0", "arrival_s": 0.0, "model": "gpt-5-mini",
                                                  "prompt": "n"})], "live")  # ingest reads the drop now
        await asyncio.sleep(0.2)
        assert {req(k).uid for k in range(5)} <= set(ing.seen), "the paused driver is back: its ids stay"
        sent = len(grouper.readmitted())
        await ing.submit([req(0, "other content")], "live")
        await asyncio.sleep(0)
        assert len(grouper.readmitted()) == sent, "an id of an open request was taken for another content"
    asyncio.run(go())


def test_a_provider_queue_keeps_only_the_tenants_with_work_waiting():
    """Fair share keeps per-tenant state; a tenant whose last unit left is dropped from the scan (a peek cost
    O(tenants ever seen) before), and the units promoted ahead of their turn go with its heap."""
    from engine.core.scheduling import FairQueue, Scheduling, Unit

    q = FairQueue(Scheduling())
    for k in range(2000):  # one tenant per unit (one per end user), some due within promote_s
        t = float(k)
        q.push(Unit(k, f"tenant-{k}", "normal", t + (10.0 if k % 3 else 3600.0), t, 100, 0.001, 0, 1.0))
        q.pop(t)
    assert len(q) == 0
    assert len(q._tenants) == 0 and len(q._count) == 0, f"{len(q._tenants)} idle tenants kept"
    assert len(q._gone) <= 2, f"{len(q._gone)} stale entries marked"
    q.push(Unit("x", "tenant-7", "urgent", 5000.0, 2000.0, 1, 0.0, 0, 1.0))
    assert q.pop(2000.0).item == "x"


def test_an_ended_batch_of_the_endpoint_keeps_what_it_shows_and_lets_its_lines_and_results_go():
    """The OpenAI-compatible endpoint held every line, future and result of every batch it ever ran."""
    import json

    from engine.app._endpoint_batches import BatchJob
    from engine.core.batchfile import parse_batch_file
    from engine.core.result import Result

    lines = [{"custom_id": f"q{k}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {k}?"}]}}
             for k in range(3)] + [{"custom_id": "bad", "body": {"model": "no-such-model", "messages": []}}]
    bf = parse_batch_file("\n".join(json.dumps(x) for x in lines).encode(), source="in.jsonl", window_s=86400)
    job = BatchJob("batch_1", "/v1/chat/completions", "file-1", "24h", 86400.0, None, "default", 0, bf=bf,
                   status="completed")
    for k, req in enumerate(bf.requests):
        job.custom_ids[req.id] = req.id
        job.take(Result(id=req.id, status="ok" if k else "failed", usage={"input_tokens": 10 * k,
                                                                           "output_tokens": 5}))
    before = job.view()
    assert before["request_counts"] == {"total": 4, "completed": 2, "failed": 2}
    assert before["usage"]["input_tokens"] == 30
    job.release()
    assert job.view() == before
    assert job.bf is None and not job.results and not job.futures and not job.custom_ids


def _unit(item: object, tenant: str, t: float, tokens: int = 100, priority: str = "normal"):
    from engine.core.scheduling import Unit

    return Unit(item, tenant, priority, 1e9, t, tokens, 0.001, 0, 1.0)  # never due: fair share alone orders


def test_a_provider_queue_forgets_the_virtual_time_of_tenants_gone_idle(monkeypatch):
    """It kept one virtual time per tenant ever seen, idle or not. One is kept now only while it still decides
    where its tenant restarts: above the floor the backlogged tenants move, and never more than ``IDLE_KEPT``."""
    from engine.core import scheduling
    from engine.core.scheduling import FairQueue, Scheduling

    q = FairQueue(Scheduling())
    for k in range(3000):  # two tenants always backlogged, one passing tenant per round (one per end user)
        t = float(k)
        q.push(_unit(("a", k), "a", t))
        q.push(_unit(("b", k), "b", t))
        q.push(_unit(("u", k), f"user-{k}", t))
        for _ in range(3):
            q.pop(t)
    assert len(q) == 0 and len(q._vt) == 0, f"{len(q._vt)} virtual times kept by an empty queue"
    for k in range(3000):  # the same, never emptying the queue
        t = 3000.0 + k
        q.push(_unit(("a", k), "a", t))
        q.push(_unit(("b", k), "b", t))
        q.push(_unit(("u", k), f"user-{k}", t))
        for _ in range(2 if k % 2 else 3):
            q.pop(t)
    assert len(q) > 0 and len(q._vt) <= 10, f"{len(q._vt)} virtual times kept for 2 backlogged tenants"
    # Saturated by one-shot tenants alone, the floor need not move: the cap bounds what is kept.
    monkeypatch.setattr(scheduling, "IDLE_KEPT", 100)
    q = FairQueue(Scheduling())
    q.push(_unit("first", "user-first", 0.0))
    for k in range(3000):
        q.push(_unit(k, f"user-{k}", float(k)))
        q.pop(float(k))
    assert len(q) == 1 and len(q._vt) <= 101 + 1


def test_a_tenant_back_after_being_forgotten_gains_no_more_than_one_unit_on_backlogged_tenants():
    """Forgotten, a tenant restarts at the floor: it may not jump ahead of tenants that stayed backlogged by more
    than one unit of work, neither when it comes back after others came and went nor when it comes back with
    one unit at a time, each as soon as the one before left (kept, its virtual time puts it behind them)."""
    from engine.core.scheduling import FairQueue, Scheduling

    q = FairQueue(Scheduling())
    served: dict[str, int] = {}

    def pop(t: float):
        u = q.pop(t)
        served[u.tenant] = served.get(u.tenant, 0) + u.tokens
        return u

    for k in range(200):
        q.push(_unit(("a", k), "a", 0.0))
        q.push(_unit(("b", k), "b", 0.0))
    q.push(_unit("c0", "c", 0.0))
    for k in range(40):  # c is served and leaves; others come and go
        q.push(_unit(k, f"user-{k}", float(k)))
        pop(float(k))
    assert "c" not in q._count
    served.clear()
    for k in range(50):  # c comes back with a flood, urgent (it would win every tie)
        q.push(_unit(("c", k), "c", 50.0, priority="urgent"))
    for _ in range(60):
        pop(50.0)
        assert served.get("c", 0) <= min(served.get("a", 0), served.get("b", 0)) + 100, served
    # Now c drips: one unit at a time, pushed again as soon as the last one is taken.
    while "c" in q._count:
        pop(60.0)
    served.clear()
    for k in range(60):
        if "c" not in q._count:
            q.push(_unit(("drip", k), "c", 60.0, priority="urgent"))
        pop(60.0)
        assert served.get("c", 0) <= min(served.get("a", 0), served.get("b", 0)) + 100, served
    assert served.get("c", 0) >= 1000  # and it still gets its share


def test_a_budget_ledger_lets_a_window_go_once_it_ended_and_no_claim_refers_to_it():
    """The ledger kept the spend of every window it ever had: 30 s windows for months, a key each. A window
    ended now leaves, its final row and overrun kept for the report, once no claim still refers to it: a claim
    made in it settles there however late, never in the window open then."""
    from engine.core.budgets import BudgetSpec, Charge, Claim
    from engine.core.ledger import ENDED_KEPT, BudgetBook

    spec = BudgetSpec(tenant="acme", max_budget=1.0, budget_duration="30s")
    book = BudgetBook([spec])

    def claim(rid: str, amount: float) -> Claim:
        return Claim(rid, "acme", "openai", "gpt-5", "urgent", amount)

    assert book.reserve_many([claim("batch", 0.5)], 15.0)[0].ok  # open for hours, as a batch API's
    book.charge_many([Charge("twice", "acme", "openai", "gpt-5", 1.25)], 20.0)  # past the limit: overrun 0.25
    n = 20_000  # a week of windows
    for k in range(1, n):
        t = 30.0 * k + 1
        if k == n // 2:  # a restart in between: the ledger comes back from its journal's snapshot
            again = BudgetBook([spec])
            again.restore(book.spent, book.reserved, book.claims, book.spend, list(book.ended),
                          book.ended_overrun)
            book = again
        assert book.reserve_many([claim(f"c{k}", 0.2)], t)[0].ok
        book.settle_many([(f"c{k}", 0.1)])
    now = 30.0 * (n - 1) + 1
    assert set(book.spent) == {spec.key(0.0), spec.key(now)}, f"{len(book.spent)} windows held"
    book.settle_many([("batch", 0.4)])  # late: in its own window, which then goes
    assert set(book.spent) == set(book.reserved) == {spec.key(now)}
    assert book.spent[spec.key(now)] == 0.1 and abs(book.reserved[spec.key(now)]) < 1e-9
    book.settle_many([("batch", 0.4)])  # again, after its window went: nothing changes, nothing raises
    assert book.spent == {spec.key(now): 0.1}
    rows = book.windows()
    assert len(rows) == ENDED_KEPT + 1 and rows[-1]["window"] == spec.key(now).rsplit("@", 1)[1]
    assert (rows[0]["window"], rows[0]["spent_usd"]) == ("0", 1.65)  # the last to go: the batch's
    assert [r["spent_usd"] for r in rows[-2:]] == [0.1, 0.1]
    for k in range(n, n + ENDED_KEPT):
        assert book.reserve_many([claim(f"c{k}", 0.2)], 30.0 * k + 1)[0].ok
        book.settle_many([(f"c{k}", 0.1)])
    assert len(book.spent) == 1 and all(r["window"] != "0" for r in book.windows())
    assert abs(book.overrun_usd() - 0.65) < 1e-9  # the first window's, its row gone
    assert sum(r["spent_usd"] for r in book.spend_report()) == round(1.25 + 0.4 + 0.1 * (n + ENDED_KEPT - 1), 6)


def test_a_batch_of_the_endpoint_that_fails_validation_keeps_its_errors_and_lets_its_lines_go():
    """A batch refused at validation (a repeated custom_id) kept every parsed line of its file for the
    endpoint's life: it never reached the release an ended batch gets."""
    import json
    from types import SimpleNamespace

    from starlette.requests import Request as HttpRequest

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.core.settings import default_settings

    store = FilesAndBatches(SimpleNamespace(settings=default_settings()), CAT, window_default_s=86400.0,
                            now=lambda: 1000.0)
    lines = [{"custom_id": f"q{k % 1500}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"Question {k}?"}]}}
             for k in range(2000)]  # lines 1501-2000 repeat a custom_id
    src = store._add_file("in.jsonl", "batch", "\n".join(json.dumps(x) for x in lines).encode(), tenant="default")
    body = json.dumps({"input_file_id": src.id, "endpoint": "/v1/chat/completions",
                       "completion_window": "24h"}).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    view = asyncio.run(store.create_batch(HttpRequest({"type": "http", "method": "POST", "headers": []}, receive)))
    job = store.batches[view["id"]]
    assert job.bf is None and not job.futures and not job.results and not job.custom_ids
    again = job.view()
    assert again == view and again["status"] == "failed" and again["failed_at"] == 1000
    assert again["errors"]["data"][0]["code"] == "invalid_custom_id" and again["errors"]["data"][0]["line"] == 1501
    assert again["request_counts"] == {"total": 0, "completed": 0, "failed": 0}  # as OpenAI's failed validation


def test_a_budget_window_that_ended_and_went_is_not_reopened_when_the_clock_steps_back():
    """The budget actor's clock is a wall clock (``ScaledClock`` reads ``time.time()``): it can step back (NTP, or
    Ray restarting the actor on a node whose clock lags). The ledger dropped a window once it ended, so a time
    just before that end opened it again empty: its whole budget could be spent a second time, and the two
    halves, each under the limit, reported no overrun. A time before the latest one given counts as that one."""
    from engine.core.budgets import BudgetSpec, Charge, Claim
    from engine.core.ledger import BudgetBook

    spec = BudgetSpec(tenant="acme", max_budget=1.0, budget_duration="30s")

    def claim(rid: str, amount: float) -> Claim:
        return Claim(rid, "acme", "openai", "gpt-5", "urgent", amount)

    book = BudgetBook([spec])
    assert book.reserve_many([claim("a", 1.0)], 29.0)[0].ok
    book.settle_many([("a", 1.0)])  # the window at 0 is spent to its limit
    assert book.reserve_many([claim("b", 0.1)], 31.0)[0].ok  # the next one: the window at 0 ends and goes
    assert not book.reserve_many([claim("c", 1.0)], 29.5)[0].ok, "the window at 0 had its budget again"
    book.charge_many([Charge("late", "acme", "openai", "gpt-5", 0.5)], 29.5)
    assert spec.key(0.0) not in book.spent and book.spent[spec.key(31.0)] == 0.5, "a window went twice"
    # A restart between (the journal's snapshot, as the budget actor takes it back) does not forget it either.
    again = BudgetBook([spec])
    again.restore(book.spent, book.reserved, book.claims, book.spend, list(book.ended), book.ended_overrun)
    assert not again.reserve_many([claim("d", 1.0)], 29.5)[0].ok


def test_a_call_priced_out_of_order_never_makes_a_cold_gap_warm():
    """The live path can price a call after one that started later. A write at 1,000 s priced first, then one
    at 0 s: a read at 600 s, when no call had the prefix warm (TTL 300 s), is plain. Before, the block kept one
    period from 0 to 1,300 s and the read was a cache hit (a helper's reproducer)."""
    s = Settings()
    prov = SimProvider(CAT.provider("anthropic"), CAT, s, Draws(10, s.sim.max_attempts, 0, s.sim.batch_slot_s),
                       draw=False)
    spec = CAT.provider("anthropic").models["claude-sonnet-4-5"]

    def price(i: int, t: float, write: bool) -> float:
        r = Request.model_validate({"id": f"r{i}", "arrival_s": t, "model": "claude-sonnet-4-5",
                                    "input_tokens": 4096, "output_tokens": 1, "prefix_blocks": list(range(1, 9))})
        return prov._sync_price(r, spec, t, write)

    plain = price(0, 5000.0, False)  # nothing warm yet
    price(1, 1000.0, True)
    price(2, 0.0, True)
    assert price(3, 600.0, False) == plain
    assert price(4, 1100.0, False) < plain  # the period that was warm still reads


def test_a_budget_ledger_forgets_a_charge_id_two_days_past_its_last_sending_as_redis_does(monkeypatch):
    """A charge id is kept as Redis keeps its marker (``CHARGE_KEPT_S`` past its last sending), so one sent again
    within that counts nothing, however often; before, the in-process ledger kept every id it was ever charged.
    The newest ``CHARGES_KEPT`` stay whatever their age (a fast clock): 1,000 here, so the span shows."""
    from engine.core import ledger
    from engine.core.budgets import BudgetSpec, Charge
    from engine.core.ledger import CHARGE_KEPT_S, BudgetBook

    monkeypatch.setattr(ledger, "CHARGES_KEPT", 1_000)
    few = BudgetBook([BudgetSpec(tenant="acme", max_budget=1e9, budget_duration="1d")])
    few.charge_many([Charge(f"x{k}", "acme", "openai", "gpt-5", 0.01) for k in range(10)], 0.0)
    few.charge_many([Charge(f"x{k}", "acme", "openai", "gpt-5", 0.01) for k in range(10)], 30 * 86_400.0)
    assert abs(sum(few.spend.values()) - 0.1) < 1e-9  # under the floor: a month later, still counted once

    book = BudgetBook([BudgetSpec(tenant="acme", max_budget=1e9, budget_duration="1d")])
    step, per = 3_600.0, 50  # 50 charges an hour (late results, a resumed file's lines), for 20 days
    hours = 20 * 24
    for h in range(hours):
        book.charge_many([Charge(f"late:{h}:{k}", "acme", "openai", "gpt-5", 0.01) for k in range(per)], h * step)
        if h == hours // 2:  # a restart: the ledger comes back from its journal's snapshot
            again = BudgetBook(book.specs)
            again.restore(book.spent, book.reserved, book.claims, book.spend, list(book.ended),
                          book.ended_overrun, book.latest, book.charged.state())
            book = again
    kept_hours = CHARGE_KEPT_S / step + 1
    assert len(book.charged) <= kept_hours * per, f"{len(book.charged):,} charge ids kept, of {hours * per:,}"
    total = sum(book.spend.values())
    assert abs(total - hours * per * 0.01) < 1e-6
    # Sent again within two days of its last sending (a put-back, a resume of the file): counted once.
    recent = Charge(f"late:{hours - 40}:0", "acme", "openai", "gpt-5", 0.01)
    book.charge_many([recent], hours * step)
    assert abs(sum(book.spend.values()) - total) < 1e-9


def test_the_budget_controller_reports_every_charge_and_keeps_only_the_recent_ids(monkeypatch):
    """``charged_usd`` counts every charge once (a charge sent again lately counts nothing, after a restart too)
    while the ids it keeps, in memory and in each journal snapshot, are those of the last two days."""
    from actors import BudgetController, ResultHub
    from engine.core import ledger
    from engine.core.budgets import BudgetSettings, BudgetSpec, Charge
    from engine.core.ledger import CHARGE_KEPT_S

    monkeypatch.setattr(ledger, "CHARGES_KEPT", 1_000)  # the floor below the span, so the span shows
    settings = BudgetSettings(specs=(BudgetSpec(max_budget=1e9, budget_duration="1d"),))

    async def go():
        clock, hub = ManualClock(100.0), ResultHub()
        ctl = BudgetController(settings, hub, clock)
        await ctl.check_ledger()
        days, per = 10, 200
        for d in range(days * 8):  # 200 charges every three hours
            await ctl.charge_many([Charge(f"resume:{d}:{k}", "acme", "openai", "gpt-5-mini", 0.005)
                                   for k in range(per)])
            clock.advance(3 * 3_600.0)
        kept = len(ctl._charged)
        rep = await ctl.report()
        await ctl.charge_many([Charge(f"resume:{days * 8 - 1}:3", "acme", "openai", "gpt-5-mini", 0.005)])
        again_rep = await ctl.report()
        ctl2 = BudgetController(settings, hub, clock)  # restarted by Ray: the ledger back from the hub's journal
        ctl2.reconstructed()
        await ctl2.charge_many([Charge(f"resume:{days * 8 - 2}:7", "acme", "openai", "gpt-5-mini", 0.005)])
        return kept, rep, again_rep, await ctl2.report(), len(ctl2._charged)

    kept, rep, again_rep, after_restart, kept2 = asyncio.run(go())
    bound = (CHARGE_KEPT_S / (3 * 3_600.0) + 1) * 200
    assert kept <= bound and kept2 <= bound, f"{kept:,} and {kept2:,} charge ids kept, of 16,000"
    assert abs(rep["charged_usd"] - 16_000 * 0.005) < 1e-6
    assert again_rep["charged_usd"] == rep["charged_usd"] == after_restart["charged_usd"]


def test_a_ledger_snapshot_written_before_the_bound_is_taken_back_and_its_charges_still_count_once():
    """An engine upgraded over a journal: the book's snapshot held a set of ids and the controller's a dict of id
    -> USD, with no time; each is taken back whole, a charge sent again counts nothing, and its span runs from the
    first sending seen since."""
    from engine.core.ledger import KeptCharges

    book = KeptCharges.restore({"late:a", "late:b"})
    ctl = KeptCharges.restore({"late:a": 0.25, "late:b": 0.5})
    assert len(book) == 2 and ctl.usd == 0.75
    assert not book.add("late:a", 0.25, 1e6) and not ctl.add("late:b", 0.5, 1e6)
    assert ctl.add("late:c", 0.125, 1e6) and ctl.usd == 0.875
    again = KeptCharges.restore(ctl.state())
    assert again.usd == 0.875 and all(c in again for c in ("late:a", "late:b", "late:c"))


def test_a_call_of_more_charges_than_the_floor_sent_again_past_the_span_counts_nothing_twice(monkeypatch):
    """A delivery is sent again whole once the budget controller is back (``Peer.deliver``): on a sped-up clock that
    can be days of the ledger's time later, and one batch's late members are one call. Each id of the call is looked
    up before any is forgotten. Before (a review, ``rvsoak82``), the first id sent again moved all but the newest
    ``CHARGES_KEPT`` out, and 20,000 charges of $0.01 sent again three days later counted $199.99 twice."""
    from actors import BudgetController, ResultHub
    from engine.core import ledger
    from engine.core.budgets import BudgetSettings, BudgetSpec, Charge

    monkeypatch.setattr(ledger, "CHARGES_KEPT", 100)
    calls = [[Charge(f"late:b{b}:{k}", "acme", "openai", "gpt-5", 0.01) for k in range(300)] for b in range(2)]
    settings = BudgetSettings(specs=(BudgetSpec(tenant="acme", max_budget=1e9, budget_duration="30d"),))

    async def go():
        clock = ManualClock(100.0)
        ctl = BudgetController(settings, ResultHub(), clock)
        await ctl.check_ledger()
        await ctl.charge_many(calls[0])
        clock.advance(86_400.0)
        await ctl.charge_many(calls[1])
        first = await ctl.report()
        clock.advance(3 * 86_400.0)
        await ctl.charge_many(calls[0])  # sent again whole, three days on the ledger's clock later
        return first, await ctl.report(), sum(ctl.book.spend.values())

    first, again, spend = asyncio.run(go())
    assert abs(first["charged_usd"] - 6.0) < 1e-9
    assert again["charged_usd"] == first["charged_usd"]
    assert abs(spend - 6.0) < 1e-9, f"${spend:.2f} spent on the ledger for $6.00 charged"


def test_the_charge_ids_of_a_snapshot_written_before_the_bound_go_two_days_after_the_first_sending_seen(
        monkeypatch):
    """An old snapshot's ids have no time: each is given the time of the first charge after it was taken back and
    goes two days later, as the newer ones do. Before (a review, ``rvsoak82``), only the oldest got a time, and it
    held every id behind it: 50,000 taken back and 24,000 charged over ten days kept 73,996 ids, 49,996 old."""
    from engine.core import ledger
    from engine.core.ledger import CHARGE_KEPT_S, KeptCharges

    monkeypatch.setattr(ledger, "CHARGES_KEPT", 100)
    kept = KeptCharges.restore({f"late:old:{k}": 0.01 for k in range(500)})
    assert not kept.add("late:old:7", 0.01, 0.0)  # taken back: counted once
    for h in range(5 * 24):
        for k in range(10):
            kept.add(f"late:{h}:{k}", 0.01, h * 3_600.0)
        if h * 3_600.0 < CHARGE_KEPT_S:
            assert "late:old:499" in kept  # within its span from the first sending seen: still known
    assert not any(cid.startswith("late:old:") for cid in kept._at)
    assert len(kept) <= (CHARGE_KEPT_S / 3_600.0 + 1) * 10
    assert abs(kept.usd - 5.0 - 12.0) < 1e-9
