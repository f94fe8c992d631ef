"""Chaos: kill each kind of engine actor mid-run. Every future resolves, nothing is billed twice, the engine
serves new requests afterwards.

One engine and one loopback provider emulator for all kinds (an engine start costs seconds): each phase submits
800 new requests and, while they run, kills up to three actor kinds in turn the way a crash would
(``ray.kill(no_restart=False)``: Ray restarts it), the next once the last was recovered; then it waits for all
of them. The phase's requests come in one wave before each kill (sent as it is made), and each kill waits until
its wave is in the engine's hands, then asserts that at least an eighth of the phase's requests are accepted
and not answered (the hubs' count, recorded per kill): sent all at once, they were nearly all answered by the
later kills (phases end at their 1,800-s deadlines, 4.5 s at 400x, while each recovery takes 1-2 s: a run saw
two kills with 4 of 800 open). Every wave after a kill shows that new submits work; the last phase ends with a
wave after its last kill. OpenAI and Anthropic are called over HTTP, so the bill is the emulator's, counted per
idempotency key and batch ``custom_id``: the results' costs must add up to it exactly.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import time

import pytest

from engine.app.driver import Engine
from engine.app.live import follow_engine, point_at_emulator
from engine.core.catalog import default_catalog
from engine.core.provider_api import call_key
from engine.core.settings import Settings
from engine.core.tracegen import synth
from engine.emulator import Emulator
from tests.integration._flex_bill import request_key, timed_out_flex

CAT = default_catalog()
SPEEDUP = 400.0
N = 800
GRACE_S = 90.0  # real seconds past the last deadline: restart, rewire and re-admission, on a 2-core machine
KINDS = ["dispatcher-openai", "grouper-0", "ingest", "cache", "budget", "hub", "dispatcher-anthropic"]
PER_PHASE = 3  # kinds killed (in turn) during one phase's requests
# Of a phase's requests, accepted and not answered when each of its kills lands. A first kill sees at most its
# wave (a third) less the twentieth it waits for: 219-243 in runs, so a floor of a quarter would leave a slim margin.
FLOOR = N // 8
# A call's own timeouts are real seconds, the engine's and the emulator's pace the machine's: at load ~20 on 2
# cores (stop 83, beside three busy loops) 48 of a phase's 800 requests failed "anthropic failed after 4
# attempt(s): anthropic: timed out after 60 s", none of them sent (possibly billed $0: the 5-s connect timeout,
# four tries in 48 s), while the emulator answered every call it read within 7.4 s. The test checks kills, not
# timeouts (``tests/unit/test_unanswered.py`` does) nor the hung-actor watch: past the test's own bounds here.
PATIENT_S = 600.0


def phase_requests(phase: int, now: float) -> list[dict]:
    """N (800) requests of the synthetic mix (text, image, video; duplicates), deadlines within 30 min. OpenAI's
    video is left out, as it was when the HTTP provider had no video path: this test's figures were set without
    it (the Videos API path: test_video_http.py, test_http_engine.py)."""
    out = []
    for r in synth(N + 200, seed=104 + phase, duration_s=30.0):
        if r.kind == "video" and r.provider in ("openai", "anthropic"):
            continue
        d = r.model_dump(exclude={"arrival_s", "id"}, exclude_none=True)
        d["deadline_s"] = min(r.deadline_s, 1800.0)
        out.append({**d, "id": f"p{phase}-{r.id}", "arrival_s": now})
    return out[:N]


def waves(reqs: list[dict], parts: int) -> list[list[dict]]:
    """The phase's requests in ``parts`` waves of (nearly) equal size, in order."""
    return [reqs[k * len(reqs) // parts:(k + 1) * len(reqs) // parts] for k in range(max(parts, 1))]


def wait_for(futs, k: int, timeout: float) -> None:
    """Block until ``k`` of ``futs`` are done (on the futures themselves, no polling sleep)."""
    done = 0
    for _ in cf.as_completed(futs, timeout=timeout):
        done += 1
        if done >= k:
            return


def at_hubs(eng, futs) -> tuple[int, int, int]:
    """Of ``futs`` not done here: how many the engine accepted and has not answered (claimed at their hub shard,
    no result routed yet), how many it accepted (those, and those answered, their results on the way here), and
    how many there are. One Ray call per hub shard."""
    import ray

    uids = [f._req.uid for f in futs if not f.done()]
    ask = lambda self: (sum(u in self._owners for u in uids),  # noqa: E731
                        sum(u in self._owners or u in self._recent for u in uids))
    counts = ray.get([h.__ray_call__.remote(ask) for h in eng._h["hubs"]])
    return sum(c[0] for c in counts), sum(c[1] for c in counts), len(uids)


def wait_accepted(eng, futs, timeout: float) -> int:
    """Ask the hubs, round after round, until every one of ``futs`` not done here is in the engine's hands
    (none still on its way to ingest), or ``timeout`` real seconds passed. Returns how many are open then: the
    most the kill can land on, as from then on the count only falls."""
    end = time.monotonic() + timeout
    while True:
        open_, accepted, unfinished = at_hubs(eng, futs)
        if accepted == unfinished or time.monotonic() >= end:
            return open_


SIM_CHAOS = os.environ.get("SMARTBATCH_CHAOS_SIM") == "1"


def patient(settings: Settings) -> Settings:
    """``settings`` whose HTTP endpoints connect and answer, and whose actors answer a health check, within
    ``PATIENT_S``, whatever the machine's load. At load ~38 a dispatcher this test had killed answered none for
    30 s (``actor_hang_s``) while Ray restarted it: the driver killed it again, and ``restarts`` counted 2."""
    endpoints = {name: ep.model_copy(update={"timeout_s": PATIENT_S, "connect_timeout_s": PATIENT_S})
                 for name, ep in settings.providers.endpoints.items()}
    return settings.model_copy(update={"actor_hang_s": PATIENT_S, "providers": settings.providers.model_copy(
        update={"endpoints": endpoints})})


@pytest.fixture(scope="module", params=["http", "simulated"])
def chaos_engine(request, ray_session):
    """The engine with OpenAI and Anthropic over HTTP at the emulator, whose bill is checked item by item; or
    with every provider simulated (``SMARTBATCH_CHAOS_SIM=1``: the same kills, no bill to check, so the HTTP
    run covers it and only it runs in CI, within the suite's time budget)."""
    if request.param == "simulated" and not SIM_CHAOS:
        pytest.skip("the simulated chaos run (no provider bill to check) runs with SMARTBATCH_CHAOS_SIM=1; "
                    "the HTTP run kills the same actors and checks the bill item by item")
    with Emulator(CAT, speedup=SPEEDUP, seed=3, cancel_s=1.0) as emu:
        # A budget in the engine's memory, large enough never to refuse: its ledger must survive its restart.
        settings = point_at_emulator(Settings(), emu) if request.param == "http" else Settings()
        settings = patient(settings)
        eng = Engine.start(settings, speedup=SPEEDUP, metrics_port=None, budget_usd=10_000.0)
        follow_engine(emu, settings, 0)(eng)
        try:
            yield eng, emu, request.param == "http"
        finally:
            eng.stop()


# The suite's 300 s counts the engine's start (setup) too: at load ~20 the start took 87-168 s and the run past
# 213 s, every call answered (stop 83); quiet, 44 s in all. A bound for a hang, not a pace.
@pytest.mark.timeout(900)
def test_killing_each_actor_kind_mid_run_loses_nothing_and_pays_nothing_twice(chaos_engine):
    import ray

    eng, emu, http_run = chaos_engine
    results, opened = [], []  # opened: (phase, kind, requests open at its kill)
    wanted = os.environ.get("CHAOS_KINDS", ",".join(KINDS)).split(",")  # to replay one kind when debugging
    kinds = [k for k in KINDS if k in wanted]
    # Each phase's N requests come in one wave before each of up to three kinds killed in turn (the next once the
    # last is recovered); the last phase's last wave comes after its last kill: new submits still work then.
    phases = [kinds[k:k + PER_PHASE] for k in range(0, len(kinds), PER_PHASE)] or [[]]
    for phase, kill in enumerate(phases):
        reqs = phase_requests(phase, eng.now())
        budget_s = max(r["deadline_s"] for r in reqs) / SPEEDUP + GRACE_S
        futs = []
        for n, wave in enumerate(waves(reqs, len(kill) + (phase == len(phases) - 1))):
            now = eng.now()  # each wave arrives as it is sent: its deadlines run from then
            futs += eng.submit_many([{**r, "arrival_s": now} for r in wave])
            if n == len(kill):
                break
            # A share answered first: the phase's work has reached every stage. No deadline is asserted: a request
            # with less time left at a kill than the restart takes (2-3 real s, 800-1,200 engine s at 400x) ends
            # late, as with any engine (docs/reliability.md, Left), and this wait lets the first sent end first.
            if n == 0:
                wait_for(futs, len(wave) // 20, timeout=budget_s)
            held = wait_accepted(eng, futs, timeout=GRACE_S)
            opened.append((phase, kill[n], held))
            if kill[n].startswith("dispatcher-"):  # a dispatcher killed with none of its provider's work is a restart
                provider = kill[n].removeprefix("dispatcher-")
                assert any(r["provider"] == provider for r in reqs), f"phase {phase} sends {provider} nothing"
            # Killed with nothing open, a kill tests only the restart: this fails if the timing drifts back.
            assert held >= FLOOR, f"{kill[n]} would be killed with {held} of {N} requests open: {opened}"
            ray.kill(eng._h["named"][kill[n]], no_restart=False)
            assert eng.wait_recovered(kill[n], timeout=GRACE_S), f"{kill[n]} was not recovered: {eng.restarts}"
        done, open_ = cf.wait(futs, timeout=budget_s)
        assert not open_, (f"after killing {kill}: {len(open_)} request(s) never finished, e.g. "
                           f"{[f.request_id for f in list(open_)[:5]]}")
        got = [f.result() for f in futs]
        # While the budget controller restarts, nothing can be reserved: work waits, and what is still waiting
        # at its deadline is rejected with that reason (a clear answer, nothing spent). No other fault
        # leaves a request unserved.
        bad = [r for r in got if r.status not in ("ok", "reused") and not (
            "budget" in kill and r.status == "rejected" and r.error == "budget_unavailable")]
        assert not bad, f"after killing {kill}: {len(bad)} not served, e.g. {bad[0]}"
        results.extend(got)
    print(f"requests open at each kill (phase, kind, open; floor {FLOOR}): {opened}")
    assert all(eng.restarts.get(k) == 1 for k in kinds), eng.restarts

    # Every request has one result, and the results' costs are exactly what the providers billed.
    assert len({(r.tenant, r.id) for r in results}) == len(results) == N * len(phases)
    rep = eng.report()
    assert rep["budget"]["overrun_usd"] == 0
    assert rep["billed_behind_refusal"]["requests"] == 0, rep["billed_behind_refusal"]
    if not http_run:
        assert rep["budget"]["spent_usd"] > 0  # the ledger came back from its journal and kept counting
        return  # simulated providers keep no bill of their own: the HTTP run checks it item by item
    http = {"openai", "anthropic"}
    called = [r for r in results if r.status == "ok" and r.provider in http]
    bill = emu.bill()
    rep = eng.report()
    twice = {p: s["paid_twice"] for p, s in rep["providers"].items() if s["paid_twice"]}
    # Each billed item names its request (``request_key``); no request may be billed twice, but for a flex call
    # given up at its timeout and its standard call (``timed_out_flex``), and each billed one has its result.
    keys = [request_key(i) for i in bill.items]
    flex_paid = timed_out_flex(bill.items, {p: s for p, s in rep["providers"].items() if p in http})
    paired = {request_key(i) for i in flex_paid}
    again = sorted((k, i.mode, i.request_id, i.cost_usd) for i, k in zip(bill.items, keys)
                   if keys.count(k) > 1 and k not in paired)
    result_of = {call_key(r.tenant, r.id, r.model).rsplit("-", 1)[0]: r for r in results}
    assert not again, (f"{len(again)} items billed twice: {again[:6]}; late cancels: {twice}; their results: "
                       f"{[result_of.get(k) for k, *_ in again[:2]]}")
    unmatched = [(i, result_of.get(k)) for i, k in zip(bill.items, keys)
                 if result_of.get(k) is None or result_of[k].status != "ok"]
    assert not unmatched, f"{len(unmatched)} billed item(s) whose request's result is not its call: {unmatched[:3]}"
    assert sum(r.cost_usd for r in called) == pytest.approx(bill.total_usd - sum(i.cost_usd for i in flex_paid),
                                                            abs=1e-9)
    assert len(bill.items) == len(called) + len(flex_paid)
    # The budget ledger came back from its journal: its spend covers what was billed, and nothing overran.
    assert rep["budget"]["overrun_usd"] == 0
    assert rep["budget"]["spent_usd"] > 0


def test_a_restarted_actor_has_the_engine_clock_before_its_first_call(ray_session):
    """Ray rebuilds a dead actor from its constructor's arguments, where the clock is a ``ClockRef`` (the clock
    is made once every actor is up). The restarted actor reads the published clock at once: a call that
    reached it before the driver rewired it used to fail on a missing clock, and the work it carried was lost
    until the deadline sweep (or, in a dispatcher, for good: its ids stayed marked as under way)."""
    from actors import BudgetController, Dispatcher, Grouper, ResultCache
    from actors._peer import ClockRef, publish_clock, resolve_clock, unpublish_clock
    from engine.core.budgets import BudgetSettings
    from engine.core.clock import ScaledClock
    from policies import load_policy

    engine = "clock-test"
    assert resolve_clock(ClockRef(engine)) == (None, None)  # first start: not published yet
    clock = ScaledClock(1000.0, 50.0, offset=3.0)
    publish_clock(engine, clock, 7.0)

    def same(c) -> bool:
        return isinstance(c, ScaledClock) and (c.epoch, c.speedup, c.offset) == (1000.0, 50.0, 3.0)

    try:
        later = ClockRef(engine)
        d = Dispatcher("openai", CAT, Settings(), 0, later, [], None, None, None, engine=engine)
        g = Grouper(load_policy("smart", CAT), CAT, later, {}, None, None, "g0", False)
        c = ResultCache(load_policy("smart", CAT).reuse, None, later, CAT, Settings())
        b = BudgetController(BudgetSettings(), None, later, 0.0, engine)
        for actor in (d, g, c, b):
            assert same(actor.clock), type(actor).__name__
        assert same(d.provider.clock) and b.base == 7.0
    finally:
        unpublish_clock(engine)
    assert resolve_clock(ClockRef(engine)) == (None, None)
