"""Kept answers (``engine.app._driver_resume``) at admission: a request answered from what a killed run of the job
paid for takes no room under ``max_pending`` and never waits for any (it is answered at once), and a submit that
raises leaves no kept future open. A stand-in engine with the driver's admission state (``test_admit``); no Ray."""

from __future__ import annotations

import pytest

from engine.app._driver_resume import KeptAnswers, content_digest
from engine.core.errors import Overloaded
from engine.core.result import Result

from .test_admit import Admit, req


def _kept_engine(tmp_path, max_pending: int, kept: list, overload: str = "block") -> Admit:
    eng = Admit(max_pending=max_pending)
    eng._overload, eng._submit_timeout_s = overload, 0.5
    eng._kept = KeptAnswers(tmp_path, {r.uid: (content_digest(r), Result(id=r.id, tenant=r.tenant, status="ok",
                                                                             output="kept", cost_usd=0.01))
                                       for r in kept})
    eng._kept_due = []
    return eng


def _submit_many(eng: Admit, reqs: list):  # as ``Engine.submit_many`` does
    with eng._lock:
        futs = eng._admit(reqs)[0]
    eng._give_kept()
    return futs


@pytest.mark.parametrize("overload", ["block", "raise"])
def test_a_rerun_larger_than_max_pending_is_admitted_as_its_first_run_was(tmp_path, overload):
    # Its new requests just fill max_pending; run again after its kill with one answer kept, the kept future (taken
    # before the wait for room) held a place of its own submit, and the submit waited for room it never got.
    old = req("kept")
    eng = _kept_engine(tmp_path, 2, [old], overload)
    futs = _submit_many(eng, [old, req("a"), req("b")])
    assert futs[0].result(timeout=0).output == "kept"
    assert [r.id for r in eng._buffer] == ["a", "b"] and eng._pending == 2


def test_kept_answers_do_not_make_a_submit_wait_for_room_other_requests_hold(tmp_path):
    old = req("kept")
    eng = _kept_engine(tmp_path, 2, [old], "raise")
    _submit_many(eng, [req("running")])  # one place of two taken by a request under way
    futs = _submit_many(eng, [old, req("a")])  # one kept (no place), one new: room for it
    assert futs[0].done() and [r.id for r in eng._buffer] == ["running", "a"] and eng._pending == 2


def test_a_submit_refused_for_room_leaves_no_kept_future_open(tmp_path):
    old = req("kept")
    eng = _kept_engine(tmp_path, 1, [old], "raise")
    _submit_many(eng, [req("running")])
    with pytest.raises(Overloaded):
        _submit_many(eng, [old, req("a")])
    assert all(f.done() for f in eng._futs.values() if f._req.id != "running"), eng._futs  # drain() would hang
    assert eng._pending == 1 and eng._kept.given <= 1


def test_a_rerun_larger_than_max_pending_is_let_in_by_parts_and_its_kept_answers_are_given(tmp_path):
    # Its first run was let in by parts (admitted whole before, max_pending no bound); so is the rerun after its
    # kill, the kept answers taking no place and answered once the last part is in.
    from .test_admit_parts import _by_parts, _resolve_open

    old = req("kept")
    eng = _kept_engine(tmp_path, 2, [old])
    eng._submit_timeout_s = 10.0
    reqs = [old, req("a"), req("b"), req("c")]
    futs, peak = _by_parts(eng, lambda: _submit_many(eng, reqs))
    assert peak <= 2 and [f.request_id for f in futs] == ["kept", "a", "b", "c"]
    assert futs[0].result(timeout=0).output == "kept" and eng._kept.given == 1
    assert [r.id for r in eng._buffer] == ["a", "b", "c"]  # each sent once; the kept one never
    _resolve_open(eng)
    assert eng._pending == 0 and all(f.done() for f in futs)
