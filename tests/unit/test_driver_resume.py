"""A driver's crash insurance (``engine.app._driver_resume``): an engine started on ``journal.dir`` takes back what
one killed on it left, and answers from it only the same tenant, id and content submitted again. The crash is
the dispatcher's tasks cancelled and its journal's lock dropped (``test_batch_rescue._crash``)."""

from __future__ import annotations

import pytest

from actors._file_journal import engine_dirs
from engine.app._driver_resume import DRIVER_ANSWERS, KEPT_REASON, KeptAnswers, content_digest, take_back
from engine.core.errors import ConfigError
from engine.core.provider_api import Secret
from engine.core.result import Result

from .test_batch_rescue import FAR, _billed, _crashed_after, _journaled  # noqa: F401
from .test_http_providers import KEY, SPEED, batch_key, emu, jobs_of, req  # noqa: F401  (emu: the fixture)

KEYS = {"openai": Secret(KEY)}


def _ok(r, cost: float = 0.01, status: str = "ok") -> Result:
    return Result(id=r.id, tenant=r.tenant, status=status, provider=r.provider, model=r.model, cost_usd=cost,
                  output="an answer" if status == "ok" else None)


def test_the_batches_a_killed_engine_left_are_read_once_and_answer_the_same_requests_again(emu, tmp_path):  # noqa: F811
    root = tmp_path / "j"
    jobs = jobs_of("openai", claims=True)
    rig = _crashed_after(emu, root, jobs, lambda rig: _billed(emu) and _journaled(rig),
                         "a first member to finish at the provider, and the batch's id in the journal")
    kept = take_back(rig.settings, rig.catalog, KEYS, speedup=SPEED)
    billed = _billed(emu)
    by_key = {batch_key(j): j.req for j in jobs}
    answered = {by_key[k].id for k in billed}
    assert kept is not None and len(kept) == len(answered) and answered
    for j in jobs:
        got = kept.take(j.req.model_copy(update={"arrival_s": 99.0}))  # submitted again, later
        if j.req.id in answered:
            assert got is not None and got.reason == KEPT_REASON and got.mode == "batch_api" and got.output
            assert got.cost_usd == pytest.approx(billed[batch_key(j)], abs=1e-12)
        else:
            assert got is None  # not finished when cancelled: billed nothing, sent again
    assert not engine_dirs(root)  # read once: the journal's records are gone, the answers kept in one file
    cancels = emu.count("batches.cancel")
    # Killed again before it answered anything: the next start has them from the file, and asks no provider.
    again = take_back(rig.settings, rig.catalog, KEYS, speedup=SPEED)
    assert again is not None and len(again) == len(kept) and emu.count("batches.cancel") == cancels


def test_a_kept_answer_goes_only_to_the_same_tenant_id_and_content(tmp_path):
    r = req(0, "openai")
    kept = KeptAnswers(tmp_path, {r.uid: (content_digest(r), _ok(r))})
    assert kept.take(r) is not None and kept.given == 1
    assert kept.take(r.model_copy(update={"prompt": r.prompt + " Another question."})) is None
    assert kept.take(r.model_copy(update={"tenant": "someone-else"})) is None
    assert kept.take(r.model_copy(update={"id": "r-other"})) is None
    assert kept.given == 1 and kept.given_usd == pytest.approx(0.01)


def test_a_kept_answer_whose_flex_call_timed_out_is_charged_its_cost_and_that_calls_bound(tmp_path):
    """Since stop 84 an answer says the bound of its earlier calls that got no answer beside its cost (a flex call
    given up at its timeout: it ran and billed, and the standard call answered). Both were billed by the run cut
    off, and this run's budgets never saw them: charged ``max`` of the two, the smaller went uncounted (a review,
    rvbill84: $0.01 charged of $0.0103)."""
    r, f, q = req(0, "openai"), req(1, "openai"), req(2, "openai")
    answer = _ok(r).model_copy(update={"possibly_billed_usd": 0.0003})
    failed = _ok(f, 0.0, "failed").model_copy(update={"possibly_billed_usd": 0.002})
    read_back = _ok(q, 0.004, "failed").model_copy(update={"possibly_billed_usd": 0.004})  # (``_batch_rescue``)
    kept = KeptAnswers(tmp_path, {x.uid: (content_digest(x), res) for x, res in
                                  ((r, answer), (f, failed), (q, read_back))})
    assert [c.usd for c in kept.charges()] == pytest.approx([0.0103, 0.002, 0.004], abs=1e-12)


def test_answers_are_kept_as_they_come_a_torn_line_is_skipped_and_a_clean_stop_removes_them(emu, tmp_path):  # noqa: F811
    from engine.app._driver_resume import _read

    rs = [req(k, "openai") for k in range(3)]
    kept = KeptAnswers(tmp_path, {})
    kept.record([(rs[0], _ok(rs[0])), (rs[1], _ok(rs[1], 0.0, status="failed"))])  # a failure is no answer
    kept.record([(rs[2], _ok(rs[2]))])
    (path,) = tmp_path.glob(f"{DRIVER_ANSWERS}.*.jsonl")
    with open(path, "a") as f:
        f.write('{"digest": "abc", "result": {"id": "r9", "sta')  # a kill mid-write
    assert set(_read([path])) == {rs[0].uid, rs[2].uid}
    kept.finish(clean=False, engine="sb-t")  # open requests at the stop: left for the next run
    assert path.exists()
    kept.finish(clean=True, engine="sb-t")
    assert not path.exists()


def test_a_batch_that_cannot_be_read_stops_the_start_naming_the_directory(emu, tmp_path):  # noqa: F811
    root = tmp_path / "j"
    rig = _crashed_after(emu, root, jobs_of("openai", claims=True), _journaled, "the batch journaled")
    gone = rig.settings.model_copy(update={"providers": rig.settings.providers.model_copy(update={
        "endpoints": {n: ep.model_copy(update={"base_url": "http://127.0.0.1:9/v1"})
                      for n, ep in rig.settings.providers.endpoints.items()}})})
    with pytest.raises(ConfigError, match=r"journal.dir=.*could not be read.*remove that directory"):
        take_back(gone, rig.catalog, KEYS, speedup=SPEED)
    assert engine_dirs(root)  # nothing removed: the next start reads it


@pytest.mark.parametrize("change", [{"take_back": False}, {"dir": None}])
def test_no_take_back_without_a_directory_or_when_turned_off(emu, tmp_path, change):  # noqa: F811
    root = tmp_path / "j"
    rig = _crashed_after(emu, root, jobs_of("openai", claims=True), _journaled, "the batch journaled")
    off = rig.settings.model_copy(update={"journal": rig.settings.journal.model_copy(update=change)})
    assert take_back(off, rig.catalog, KEYS, speedup=SPEED) is None
    sim = rig.settings.model_copy(update={"providers": rig.settings.providers.model_copy(update={"mode": "sim"})})
    assert take_back(sim, rig.catalog, KEYS, speedup=SPEED) is None  # simulated calls bill nothing
    assert engine_dirs(root)



def test_a_clean_stop_removes_only_its_own_run_not_another_engines_still_running_on_the_directory(tmp_path):
    # Two jobs on one journal.dir (SMARTBATCH_JOURNAL__DIR in a shared environment, or two engines of one script):
    # the one that ended cleanly removed the answers the other had received and the other's journal, and the
    # other, killed after, paid again for all of them.
    import asyncio

    from actors._file_journal import ARCHIVE, FileJournal, read_spaces
    from engine.app._driver_resume import _read
    from engine.core.settings import Settings

    settings = Settings(journal={"dir": str(tmp_path)}, providers={"mode": "http"})
    first, second = (take_back(settings, None, {}, speedup=1.0) for _ in range(2))  # both started
    rs = [req(k, "openai") for k in range(2)]
    first.record([(rs[0], _ok(rs[0]))])
    journal = FileJournal(tmp_path, "sb-first")  # the first engine's dispatcher: a batch that ended, archived
    asyncio.run(journal.put("batches:openai", "b1", ("record",)))
    asyncio.run(journal.delete("batches:openai", ["b1"]))
    second.record([(rs[1], _ok(rs[1]))])
    second.finish(clean=True, engine="sb-second")  # the second job ended: its own answers go
    assert {s for s, recs in read_spaces(journal.dir).items() if recs} == {ARCHIVE + "batches:openai"}
    assert set(_read(tmp_path.glob(f"{DRIVER_ANSWERS}.*.jsonl"))) == {rs[0].uid}
    first.finish(clean=True, engine="sb-first")
    assert not list(tmp_path.glob(f"{DRIVER_ANSWERS}.*"))


@pytest.mark.parametrize("where", ["cluster", "stream"])
def test_the_batch_command_never_takes_back_a_driver_jobs_journal_dir(tmp_path, where):
    # ``smartbatch batch`` takes back its own journal (beside OUT) or none (a cluster, OUT a stream): with
    # SMARTBATCH_JOURNAL__DIR exported for a driver job, its engine took that job's journal over, and its end
    # removed what the job's killed run had paid for.
    from engine.app._batch_rescue import prepare
    from engine.core.settings import Settings

    settings = Settings(journal={"dir": str(tmp_path / "nightly")}, providers={"mode": "http"})
    out, address = (tmp_path / "out.jsonl", "auto") if where == "cluster" else (tmp_path, None)  # (not a file)
    got, _, _ = prepare(out, settings, None, [], resume=False, overwrite=False, address=address, speedup=1.0,
                        say=lambda m: None)
    assert got.journal.take_back is False


def test_the_members_of_a_fallback_batch_answer_the_request_as_its_driver_asked_it(emu, tmp_path):  # noqa: F811
    # A model's circuit open, its work went to its fallback in a provider batch (the dispatcher's reroute); the
    # driver killed, the batch's members were kept under the fallback's model, and the request submitted again
    # (as the script asks it, with its own model) was sent and paid again.
    root = tmp_path / "j"
    asked = ("anthropic", "claude-sonnet-4-5")
    jobs = [j._replace(asked=asked) for j in jobs_of("openai", claims=True)]  # as ``Dispatcher._start_reroute``
    rig = _crashed_after(emu, root, jobs, lambda rig: _billed(emu) and _journaled(rig),
                         "a first member to finish at the provider, and the batch's id in the journal")
    kept = take_back(rig.settings, rig.catalog, KEYS, speedup=SPEED)
    answered = {j.req.id for j in jobs if batch_key(j) in _billed(emu)}
    assert answered
    for j in jobs:
        mine = j.req.model_copy(update={"provider": asked[0], "model": asked[1], "arrival_s": 99.0})
        got = kept.take(mine)
        assert (got is not None) == (j.req.id in answered)
        assert kept.take(j.req) is None  # the fallback's own content was never asked under this id
        if got is not None:
            assert got.model == "gpt-5-mini" and got.output  # made by the fallback, as the killed run's was
