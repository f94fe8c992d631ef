"""A driver's crash insurance (``engine.app._driver_resume``) on a live engine over HTTP (the loopback emulator):
a script that leaves its ``with`` block on an error (or Ctrl-C, or a SIGTERM) has not ended its job, even with
nothing open: what the earlier, killed run paid for stays for the next run."""

import pytest

from engine import Engine
from engine.app._driver_resume import DRIVER_ANSWERS, KEPT_REASON, _line, _read, content_digest
from engine.app.live import point_at_emulator
from engine.core.result import Result
from engine.core.settings import Settings
from engine.emulator import Emulator
from tests.integration._catalogs import only
from tests.unit.test_http_providers import fixed_turnaround_catalog, req


def catalog():
    """Batches of a fixed 6,000 s at OpenAI, the one provider these tests call: an engine with the others would
    start three dispatcher processes more, which nothing here reaches."""
    return only("openai", catalog=fixed_turnaround_catalog(6000.0))


# No reuse: the kept answers are the driver's (``_driver_resume``), never the cache's, and an engine without reuse
# starts no cache actor, a Ray worker process fewer per engine.
NO_REUSE = {"reuse_exact": False, "reuse_in_flight": False, "reuse_near": False}


def _killed_run_left(root, reqs) -> None:
    """The answers file of a run killed after its driver had received ``reqs``' answers."""
    root.mkdir(parents=True)
    lines = [_line(content_digest(r), Result(id=r.id, tenant=r.tenant, status="ok", provider=r.provider,
                                               model=r.model, mode="sync", cost_usd=0.01, output=f"paid {r.id}"))
             for r in reqs]
    (root / f"{DRIVER_ANSWERS}.1-1.jsonl").write_text("".join(lines))


def test_a_script_that_fails_with_nothing_open_keeps_what_the_killed_run_paid_for(ray_session, tmp_path):
    root = tmp_path / "journal"
    cat = catalog()
    reqs = [req(k, "openai") for k in range(3)]
    _killed_run_left(root, reqs)
    with Emulator(cat, speedup=1000.0, seed=0) as emu:
        settings = point_at_emulator(Settings(journal={"dir": str(root)}), emu, providers=("openai",))
        with pytest.raises(RuntimeError, match="the script's own"):
            with Engine.start(settings, catalog=cat, speedup=1000.0, metrics_port=None,
                              policy_params=NO_REUSE) as eng:
                got = eng.submit(reqs[0]).result(timeout=60)  # one kept answer given, nothing open after it
                assert got.reason == KEPT_REASON and got.output == f"paid {reqs[0].id}"
                raise RuntimeError("the script's own error, before it submitted the others")
        assert not emu.bill().items  # nothing was sent
    kept = _read(root.glob(f"{DRIVER_ANSWERS}.*.jsonl"))
    assert {r.uid for r in reqs} <= set(kept)  # the next run answers all three, pays for none again


def test_kept_answers_take_no_room_and_every_future_resolves(ray_session, tmp_path):
    import asyncio

    root = tmp_path / "journal"
    cat = catalog()
    reqs = [req(k, "openai") for k in range(4)]
    _killed_run_left(root, reqs[:3])
    with Emulator(cat, speedup=1000.0, seed=0) as emu:
        settings = point_at_emulator(Settings(journal={"dir": str(root)}), emu, providers=("openai",))
        with Engine.start(settings, catalog=cat, speedup=1000.0, metrics_port=None, max_pending=2,
                          overload="raise", policy_params=NO_REUSE) as eng:
            # Larger than max_pending, its kept answers taking no room: its one new request fits, admitted whole.
            futs = eng.submit_many([*reqs[:2], reqs[3].model_copy(update={"priority": "urgent"})])
            assert [f.result(timeout=60).reason == KEPT_REASON for f in futs] == [True, True, False]
            assert asyncio.run(eng.asubmit(reqs[2])).reason == KEPT_REASON
            assert eng.drain(timeout_s=60) == 0 and eng._pending == 0
            assert eng.report()["taken_back"] == {"answers": 3, "cost_usd": pytest.approx(0.03)}
        assert len(emu.bill().items) == 1  # only the request no run had answered
    assert not root.exists()  # the job ended: nothing left to take back
