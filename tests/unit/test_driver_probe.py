"""The driver's tries at a restarting ingest (engine/app/_driver_probe.py): one probe per ingest shard, the other
waiting requests held until it is taken. Without Ray: the fakes and the stepped monotonic clock of
``test_driver_readmit``."""

from __future__ import annotations

import collections
import threading
import types

from engine.app._driver_admit import Admitting
from engine.app._driver_pull import CHECK_EVERY_S
from engine.core.result import Result
from tests.unit.test_driver_readmit import (  # noqa: F401  (clock: the fixture)
    Died,
    Driver,
    Fut,
    Ingest,
    Ref,
    Unavailable,
    clock,
    req,
    run_checks,
)


def waiting(d: Driver, n: int) -> list[str]:
    """``n`` requests whose submits ingest refused as restarting, in calls of a micro-batch (1,000) each."""
    reqs = [req(k) for k in range(n)]
    d._futs = {r.uid: Fut(r) for r in reqs}
    for k in range(0, n, d._micro_batch):
        d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([r.uid for r in reqs[k:k + 1000]], 0)
    return [r.id for r in reqs]


def test_a_restarting_ingest_gets_one_probe_a_try_and_every_request_once_it_takes_one(clock):  # noqa: F811
    """5,000 requests wait for an ingest restarting for 30 s: each try sends one micro-batch, a probe, not the
    five (100 at 100,000 waiting, every 5 s: stop 81 measured 2 s of CPU a minute pickling them for a dead
    actor); the others wait held, counted as waiting (the sweep leaves them), and each probe is another
    micro-batch, the one that waited longest. Once a probe is taken every request goes, each once. Before: five
    calls at each try."""
    ingest = Ingest(clock, back_at=30.0)
    d = Driver(ingest)
    ids = waiting(d, 5000)
    run_checks(d, clock, 29.0)
    refused = ingest.calls
    assert len(refused) >= 8 and all(len(sent) <= 1000 for _, sent in refused)
    assert len({t for t, _ in refused}) == len(refused)  # one call a try
    assert len({tuple(sent) for _, sent in refused[:5]}) == 5  # a probe of each micro-batch in turn
    with d._lock:
        assert d._waiting_uids() == set(d._futs) - {u for v, _ in d._inflight_refs.values() for u in v}
    run_checks(d, clock, 40.0)
    assert sorted(ingest.taken) == sorted(ids) and d.failed() == {}  # each once
    assert max(t for t, _ in ingest.calls) <= 35.0 + 2 * CHECK_EVERY_S
    assert d._waited == {} and d._readmit_waits == [] and d._held == {} and d._probes == {}


def test_requests_held_behind_a_probe_fail_at_the_bound_with_the_refused_calls_error(clock):  # noqa: F811
    """An ingest that never comes back: the 2,000 requests held behind the probes fail once they have waited
    the longer of 120 s and ``actor_restart_wait_s``, as refused requests do, not before."""
    d = Driver(Ingest(clock, back_at=float("inf")), restart_wait_s=0.0)
    ids = waiting(d, 3000)
    run_checks(d, clock, 119.0)
    assert d.failed() == {}
    run_checks(d, clock, 127.0)
    errors = d.failed()
    assert sorted(errors) == sorted(ids)
    assert all("restarting" in e and "120 s" in e and "actor_restart_wait_s" in e for e in errors.values())
    assert d._held == {} and d._waited == {}


def test_a_probe_that_fails_otherwise_lets_the_held_requests_go_and_counts_a_try_for_its_own(clock):  # noqa: F811
    """Ingest back, the first probe fails otherwise (a peer died in its call, say): the held requests go at once
    (their tries unchanged), the probe's own are re-admitted as a failed call's; all are taken, each once."""
    ingest = Ingest(clock, back_at=2.0)
    made, failures = ingest._readmit, [1]

    def readmit(part, client, force):
        if clock[0] >= 2.0 and failures[0]:
            failures[0] -= 1
            ingest.calls.append((clock[0], [r.id for r in part]))
            return Ref(Died("a peer died"))
        return made(part, client, force)

    ingest.readmit = types.SimpleNamespace(remote=readmit)
    d = Driver(ingest)
    ids = waiting(d, 3000)
    run_checks(d, clock, 10.0)
    assert failures == [0] and d.failed() == {}
    assert sorted(ingest.taken) == sorted(ids)
    assert d._held == {} and d._probes == {} and d._waited == {}


def test_a_recovery_sends_the_held_requests_and_no_probe_follows_while_its_calls_are_out(clock):  # noqa: F811
    """The driver's recovery of a restarted ingest re-admits every open request, the held ones too: nothing is
    held after it, and no try of theirs goes while its calls are out (two re-admissions of one request at once
    could both be sent)."""
    ingest = Ingest(clock, back_at=1.0)
    d = Driver(ingest)
    ids = waiting(d, 3000)
    run_checks(d, clock, 0.9)
    assert d._held
    d._ray.wait = lambda refs, num_returns, timeout: ([], list(refs))  # the recovery's calls stay out ...
    before = len(ingest.calls)
    out = {d._futs[u]._req.id for v, _ in d._inflight_refs.values() for u in v}  # re-admitted once they return
    d._readmit_open()
    run_checks(d, clock, 10.0)
    sent = [u for _, part in ingest.calls[before:] for u in part]
    assert sorted(sent) == sorted(set(ids) - out)  # each once, and nothing else
    assert d._held == {} and d._readmit_waits == []


def test_each_ingest_shard_gets_its_own_probe(clock):  # noqa: F811
    """Two ingest shards, back at 5 s and 12 s: a try probes each shard once, and a shard back lets its own held
    requests go while the other's stay held; every request taken once, by its shard."""
    shards = [Ingest(clock, back_at=5.0), Ingest(clock, back_at=12.0)]
    d = Driver(shards[0])
    d._h["ingests"] = shards
    d._by_ingest = lambda reqs: [(i, p) for k, i in enumerate(shards)
                                 if (p := [r for r in reqs if int(r.id[1:]) % 2 == k])]
    ids = waiting(d, 4000)
    run_checks(d, clock, 20.0)
    for k, ingest in enumerate(shards):
        assert sorted(ingest.taken) == sorted(i for i in ids if int(i[1:]) % 2 == k)
        refused = [t for t, _ in ingest.calls if t < ingest.back_at]
        assert len(set(refused)) == len(refused)  # one probe a try
    assert d.failed() == {} and d._held == {} and d._probes == {}


class Ending(Fut):
    """A future that ends as the engine's do, through ``Admitting._resolve``."""

    _claimed = False

    def set_result(self, res: Result) -> None:
        self.error = res.error or res.status


def test_a_held_request_that_ends_keeps_no_wait_for_a_submit_of_its_id_again(clock):  # noqa: F811
    """A request held behind the probes of 99 other micro-batches is answered (its refused call had run after all),
    forgotten, and submitted again while ingest still restarts: the new one waits afresh, for the whole bound.
    Before (a review, ``rvprobe82``), the old one's first refusal stayed on record until its micro-batch's turn
    as the probe (up to 100 probes, 5 s apart), and the new one failed 10 s after its submit, "Ray was restarting
    it (its calls refused) for 121 s" (stop 81 had fixed the same for a wait of at most 5 s)."""
    d = Driver(Ingest(clock, back_at=float("inf")), restart_wait_s=0.0)
    d._micro_batch = 10
    d._room, d._pending, d._finished = threading.Condition(d._lock), 1000, collections.deque()
    d._learn_response = lambda res: None
    reqs = [req(k) for k in range(1000)]
    d._futs = {r.uid: Ending(r) for r in reqs}
    for k in range(0, 1000, 10):
        d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([r.uid for r in reqs[k:k + 10]], 0)
    run_checks(d, clock, 1.0)
    x = reqs[-1]
    assert x.uid in d._held_uids() and x.uid in d._waited
    Admitting._resolve(d, d._futs[x.uid], Result(id=x.id, tenant=x.tenant, status="ok", output="answered"))
    run_checks(d, clock, 110.0)
    del d._futs[x.uid]  # forgotten (``retention_s`` past), then submitted again: ingest refuses it as restarting
    again = req(999)
    d._futs[again.uid] = Ending(again)
    d._inflight_refs[Ref(Unavailable("The actor is restarting."))] = ([again.uid], 0)
    run_checks(d, clock, 200.0)
    assert d._futs[again.uid].error is None and d._waited[again.uid] > 110.0
    run_checks(d, clock, 240.0)
    assert "for 12" in d._futs[again.uid].error  # its own 120 s, from its own refusal


def test_requests_held_behind_a_probe_that_stays_out_go_in_their_own_calls(clock):  # noqa: F811
    """Ingest refused the submits of 3,000 requests without restarting (a blip: no recovery follows) and takes the
    first probe, whose call then stays out (its readmit awaits a peer; ingest answers its health checks, so no hang
    check kills it): the held requests go in their own calls once the probe has been out ``PROBE_OUT_MAX_S``, where
    the deadline sweep sees them, each once. Before (a review, ``rvprobe82``), they stayed held for good, and a held
    request counts as waiting: the sweep, the safety net under every path, left them."""
    from engine.app._driver_probe import PROBE_OUT_MAX_S

    ingest = Ingest(clock, back_at=1.0)
    d = Driver(ingest)
    ids = waiting(d, 3000)
    made, stuck = ingest._readmit, []

    def readmit(part, client, force):
        ref = made(part, client, force)
        if clock[0] >= 1.0 and not stuck:
            stuck.append(ref)
        return ref

    ingest.readmit = types.SimpleNamespace(remote=readmit)
    d._ray.wait = lambda refs, num_returns, timeout: ([r for r in refs if r not in stuck], stuck)
    run_checks(d, clock, 20.0)
    assert len(stuck) == 1 and len(ingest.taken) == 1000  # the probe alone, the others held
    run_checks(d, clock, 1.0 + PROBE_OUT_MAX_S + 5.0)
    assert sorted(ingest.taken) == sorted(ids) and d.failed() == {}  # each once
    with d._lock:
        assert d._held == {} and d._waiting_uids() == set()
