"""The driver's tries at a restarting ingest (engine/app/_driver_probe.py): one probe per ingest shard, the other
waiting requests held until it is taken. Without Ray: the fakes and the stepped monotonic clock of
``test_driver_readmit``."""

from __future__ import annotations

import types

from engine.app._driver_pull import CHECK_EVERY_S
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
