"""The bounds of the stop's own cancel for dispatchers Ray did not bring back in time (``actors._stop_left``,
``actors._stop_dispatchers._left_at_once``): a review of stop 81. No Ray, no provider: the journal's records and the
provider's client are stand-ins."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest

import actors._engine_stop as engine_stop
import actors._stop_dispatchers as stop_dispatchers
from actors import _stop_left
from actors._types import BatchJob, Job
from engine.core.catalog import default_catalog
from engine.core.cost import reserve_bound
from engine.core.settings import Settings

from . import test_stop_restarted
from .test_http_providers import req
from .test_stop_restarted import _Fails

fake_ray = test_stop_restarted.fake_ray  # (a fixture: Ray's wait and get over ``_Fails`` handles)


def test_dispatchers_not_back_in_time_have_their_batches_cancelled_at_once_not_one_after_another(fake_ray,
                                                                                             monkeypatch):
    """Each dispatcher's own cancel is bounded (``LEFT_CUT_S``, 20 s); run one after another, two dispatchers not
    back (a node's workers killed together) held the stop twice that, three three times. Here each waits for the
    other to have begun: one after another, the first never saw the second begin."""
    monkeypatch.setattr(stop_dispatchers, "RESTART_AT_STOP_S", 0.3)
    monkeypatch.setattr(stop_dispatchers, "STOP_CALL_S", 0.0)
    both = threading.Barrier(2, timeout=5.0)  # (a bound for the code before, never reached after)
    done: list[str] = []

    def left(name: str):
        both.wait()
        done.append(name)

    names = ("dispatcher-openai", "dispatcher-anthropic")
    restarting = {n: _Fails(fake_ray.exceptions.ActorUnavailableError("restarting", None)) for n in names}
    assert stop_dispatchers._stop_restarted("prod", restarting, (None, None), left) == []
    assert sorted(done) == sorted(names)


def test_a_stops_own_cancel_cut_at_its_bound_still_settles_the_claims_it_read_and_names_the_batch(monkeypatch,
                                                                                                 caplog):
    """The run is cut at ``LEFT_CUT_S`` (its loop held by a call, or its journal read so slow that the cancels'
    own 15 s ran past the cut). The claims it had read, and the batch whose cancel it had sent, were dropped with
    it: the stop said its journal "could not be read", the claims held their room until ``reservation_ttl_s``."""
    import logging

    monkeypatch.setattr(_stop_left, "LEFT_CANCEL_S", 0.1)
    monkeypatch.setattr(_stop_left, "LEFT_CUT_S", 0.3, raising=False)
    catalog = default_catalog()
    jobs = [Job(k, req(k), f"fp-{k}", claim=f"c{k}") for k in range(2)]
    batch = (BatchJob("b", "batch_api", None, False, "test", "test", jobs), jobs, 0.0, 0,
             SimpleNamespace(id="batch_held"), None)

    async def records(settings, provider, copy, journal, space):
        return {"k": batch} if space == f"batches:{provider}" else {}

    release, sent = threading.Event(), threading.Event()

    class Client:  # its cancel holds the run's loop (an SDK's blocking call) until the test ends
        async def cancel(self, handle):
            sent.set()
            release.wait()

        async def close(self):
            pass

    monkeypatch.setattr(_stop_left, "_records", records)
    monkeypatch.setattr(_stop_left, "_client", lambda *a: Client())
    settled: list = []
    layout = {"settings": Settings(), "catalog": catalog}
    try:
        with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
            left = _stop_left.cancel_left("prod", "dispatcher-openai", layout, {}, lambda items: settled.extend(items)
                                          or True, "prod@0")
    finally:
        release.set()
    assert sent.is_set()
    bounds = {j.claim: reserve_bound(j.req, catalog, "batch_api") for j in jobs}
    assert dict(settled) == pytest.approx(bounds, abs=1e-12), left
    assert (left.unread, left.cancelled, [b for b, _ in left.not_cancelled]) == (None, [], ["batch_held"]), left
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "batch_held" in errors and "could not be" not in errors, errors


def _got(_ray, ask, end):
    """``_through_restarts`` over stand-in calls: each answer, or the error Ray would raise for it."""
    got = ask()
    if err := [r for r in got if isinstance(r, BaseException)]:
        raise err[0]
    return got


@pytest.mark.parametrize("kept", [None, {"settlements": 1, "charges": 0, "unsettled_usd": 1.5, "kept_in": "f"}],
                         ids=["nothing waited for Redis", "the ledger kept in a file"])
def test_the_kept_report_keeps_the_ledgers_leftovers_beside_what_the_stop_did_for_a_dispatcher_not_back(
        kept, monkeypatch):
    """``report()["budget"]["ledger"]["left_at_stop"]`` says what the ledger's Redis had not taken at the stop and
    the file it is kept in. The loop over the dispatchers not back reused its name: it held the last dispatcher's
    ``Left`` instead (no JSON, the file's name gone), even where the ledger had nothing left."""
    import ray

    from actors._stop_left import Left
    from engine.app import _driver_report, _ledger_stop
    from engine.app._driver_report import Reporting

    monkeypatch.setattr(_ledger_stop, "keep_ledger", lambda *a: kept)
    monkeypatch.setattr(_driver_report, "_through_restarts", _got)

    class Eng:
        _ray, name, settings, _ledger_dir = ray, "prod", None, None
        _h = {"budget": SimpleNamespace(report=SimpleNamespace(remote=lambda: {"budgets": []})),
              "dispatchers": {"openai": SimpleNamespace(stats=SimpleNamespace(remote=lambda: {"provider": "openai"}))}}
        _last_report = {"budget": {"budgets": [], "rejected": {}}, "providers": {}}

    eng = Eng()
    eng._left_at_stop = {}  # (declared by ``Engine.__init__``)
    Reporting._note_left(eng, "dispatcher-openai", Left(cancelled=["batch_1"], settled=[("c0", 0.01)]))
    Reporting._keep_ledger(eng)
    rep = eng._last_report
    assert rep["budget"].get("ledger", {}).get("left_at_stop") == kept, rep["budget"]
    assert rep["providers"]["openai"]["left_at_stop"]["cancelled"] == ["batch_1"], rep["providers"]


def test_the_kept_report_reads_each_providers_row_again_though_one_dispatcher_is_not_back(monkeypatch):
    """The stop's kept report reads the dispatchers' stats again once they cancelled: read as one, a dispatcher not
    back (or killed for good by the stop, ``actors._engine_stop._left_of``) left every provider's row as it was
    before the cancel, so what the others settled at the stop (``possibly_billed``) was missing from it."""
    import ray

    from engine.app import _driver_report, _ledger_stop
    from engine.app._driver_report import Reporting

    monkeypatch.setattr(_ledger_stop, "keep_ledger", lambda *a: None)
    monkeypatch.setattr(_driver_report, "_through_restarts", _got)
    after = {"provider": "anthropic", "possibly_billed": 3, "possibly_billed_usd": 0.3}

    class Eng:
        _ray, name, settings, _ledger_dir = ray, "prod", None, None
        _h = {"budget": SimpleNamespace(report=SimpleNamespace(remote=lambda: {"budgets": []})),
              "dispatchers": {"openai": SimpleNamespace(stats=SimpleNamespace(remote=lambda: ray.exceptions.
                                                                               ActorDiedError())),
                              "anthropic": SimpleNamespace(stats=SimpleNamespace(remote=lambda: after))}}
        _last_report = {"budget": {"budgets": [], "rejected": {}},
                        "providers": {p: {"possibly_billed": 0, "possibly_billed_usd": 0.0}
                                      for p in ("openai", "anthropic")}}

    eng = Eng()
    eng._left_at_stop = {}  # (declared by ``Engine.__init__``)
    Reporting._keep_ledger(eng)
    rows = eng._last_report["providers"]
    assert rows["anthropic"] == {"possibly_billed": 3, "possibly_billed_usd": 0.3}, rows
    assert rows["openai"] == {"possibly_billed": 0, "possibly_billed_usd": 0.0}, rows


@pytest.mark.parametrize("keyed", [True, False], ids=["its key here", "no key here"])
def test_a_dispatcher_whose_batches_the_stop_cancels_itself_goes_for_good_first(keyed, fake_ray, monkeypatch):
    """The stop's call Ray held for a restarting dispatcher is still queued when the stop gives up on it: brought
    back during the stop's own cancel, or the kept report's read of its stats (up to 5 s more), it took that call,
    cancelled the batch again and settled its claims again, and the report counted them ``possibly_billed`` twice.
    Killed for good once the stop has read what it will cancel, before its cancel; left to come back (it cancels
    with its own key) where this process has no key, killed at the stop's end as before."""
    monkeypatch.setattr(stop_dispatchers, "RESTART_AT_STOP_S", 0.3)
    monkeypatch.setattr(stop_dispatchers, "STOP_CALL_S", 0.0)
    for name in ("unpublish_layout", "_clean_once_dead"):
        monkeypatch.setattr(engine_stop, name, lambda *a: None)
    monkeypatch.setattr(engine_stop, "resolve_clock", lambda ref: (None,))
    monkeypatch.setattr(engine_stop, "_journal_copy", lambda engine: None)
    steps: list = []
    jobs = [Job(0, req(0), "fp-0", claim="c0")]
    batch = (BatchJob("b", "batch_api", None, False, "test", "test", jobs), jobs, 0.0, 0,
             SimpleNamespace(id="batch_1"), None)

    async def records(settings, provider, copy, journal, space):
        steps.append(("read", space))
        return {"k": batch} if space == f"batches:{provider}" else {}

    class Client:
        async def cancel(self, handle):
            steps.append(("cancel", handle.id))

        async def close(self):
            pass

    monkeypatch.setattr(_stop_left, "_records", records)
    monkeypatch.setattr(_stop_left, "_client", lambda *a: Client() if keyed else "no key in this process")
    monkeypatch.setattr(engine_stop, "_kill", lambda hs: steps.append(("kill", *hs)) or len(hs))
    d = _Fails(fake_ray.exceptions.ActorUnavailableError("restarting", None))
    layout = {"settings": Settings(), "catalog": default_catalog(), "kinds": []}
    engine_stop.kill_engine("prod", [d], {"openai": d}, None, claim={"layout": layout})
    kills = [k for k, s in enumerate(steps) if s[0] == "kill" and d in s[1:]]
    last_read = max(k for k, s in enumerate(steps) if s[0] == "read")
    if keyed:
        assert last_read < kills[0] < steps.index(("cancel", "batch_1")), steps
    else:
        assert kills == [len(steps) - 1], steps  # (the stop's end)


def test_a_journal_directory_not_on_the_stopping_machine_is_said_unread_not_empty(tmp_path, caplog):
    """``journal.dir`` is the node's: a stop from another machine (``stop --name --address``), or a dispatcher on
    another node, finds no directory there. Read as empty, the stop said "nothing under way" at WARNING while the
    batch ran on, billed, its claims held."""
    import logging

    from engine.core.settings import JournalSettings

    layout = {"settings": Settings(journal=JournalSettings(dir=tmp_path / "journal")), "catalog": default_catalog()}
    with caplog.at_level(logging.WARNING, logger="smartbatch.engine"):
        left = _stop_left.cancel_left("prod", "dispatcher-openai", layout, None, lambda items: True, "prod@1")
    assert left.unread is not None and "no journal directory" in left.unread, left
    errors = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    assert "no journal directory" in errors and "may run on" in errors, errors


def test_what_the_stop_did_for_its_dispatchers_is_a_field_the_engine_declares():
    """``_left_at_stop`` was made on first use in the instance's ``__dict__`` (``setdefault``), a state no
    constructor named; ``Engine.__init__`` declares it now, and ``_note_left`` fills the field it finds (an
    engine without it is a bug, an AttributeError, not a dict made on the spot). (keys82)"""
    import ast
    import inspect
    import textwrap

    from actors._stop_left import Left
    from engine.app._driver_report import Reporting
    from engine.app.driver import Engine

    init = ast.parse(textwrap.dedent(inspect.getsource(Engine.__init__)))
    declared = {t.attr for n in ast.walk(init) if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"}
    assert "_left_at_stop" in declared
    with pytest.raises(AttributeError):
        Reporting._note_left(SimpleNamespace(), "dispatcher-openai", Left(cancelled=["batch_1"]))
