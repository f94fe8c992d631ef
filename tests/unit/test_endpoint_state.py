"""The endpoint's files and batches kept on disk (``make_app(state_dir=...)``, ``smartbatch serve --state-dir``):
a restarted endpoint takes back what it had accepted, and asks nothing twice of the engine."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time

import openai
import pytest

from engine.app.endpoint import make_app
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line, serving, upload, wait_done

CREATE = {"endpoint": "/v1/chat/completions", "completion_window": "24h"}


def until_counted(client, batch_id: str, completed: int, limit_s: float = 60.0):
    # A bound, not a wait: a sound endpoint counts at once (the unit pass runs at idle priority beside the
    # saturating integration pass, so its threads may starve for seconds).
    end = time.monotonic() + limit_s
    while (b := client.batches.retrieve(batch_id)).request_counts.completed < completed:
        assert time.monotonic() < end, b
        time.sleep(0.01)
    return b


@contextlib.contextmanager
def said(text: str):
    """An event set once the endpoint's log says ``text`` (it says when a batch stays open)."""
    seen = threading.Event()
    handler = logging.Handler()
    handler.emit = lambda rec: text in rec.getMessage() and seen.set()
    logging.getLogger("smartbatch.endpoint").addHandler(handler)
    try:
        yield seen
    finally:
        logging.getLogger("smartbatch.endpoint").removeHandler(handler)


def asked_at_next_start(state_dir) -> list[str]:
    """What the next endpoint on ``state_dir`` asks its engine again (it takes the state back, then stops cleanly)."""
    from engine.app._endpoint_batches import FilesAndBatches

    again = FakeEngine()

    async def second() -> None:
        store = FilesAndBatches(again, CAT, window_default_s=86400.0, state_dir=state_dir)
        await store.resume()
        await store.shutdown()

    asyncio.run(second())
    return again.submitted


def left_open(state, bid: str, lines: list[str], *, window_s: float = 86400.0, created: int = 0,
              status: str = "in_progress") -> None:
    """What a crash leaves of an open batch in a state directory: its input and its record, as ``status``."""
    from engine.app._endpoint_job import BatchJob

    (state.batches_dir / f"{bid}.input").write_bytes(("\n".join(lines) + "\n").encode())
    job = BatchJob(bid, "/v1/chat/completions", "file-x", f"{window_s:g}s", window_s, None, "default", created)
    job.status, job.at = status, {"in_progress": created}
    state.save_batch(job.record())


def test_a_restarted_endpoint_takes_back_its_files_and_batches_and_asks_nothing_twice(tmp_path):
    eng, state = FakeEngine(), tmp_path / "state"
    # The first endpoint: a batch that ended, one with a line in and one held, one cancelling (its wait long).
    with serving(make_app(eng, catalog=CAT, state_dir=state, cancel_wait_s=600.0)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        ended = client.batches.create(input_file_id=upload(client, [batch_line("d", "done")]).id, **CREATE)
        ended = wait_done(client, ended.id)
        f = upload(client, [batch_line("a", "fast"), batch_line("b-slow", "held"), batch_line("x", "y", model="no")])
        open_ = client.batches.create(input_file_id=f.id, **CREATE)
        until_counted(client, open_.id, 1)  # "a" is in, "b-slow" is held by the engine
        client.files.delete(f.id)  # allowed while its batch runs: the batch keeps its input
        going = client.batches.create(input_file_id=upload(client, [batch_line("c-slow", "gone")]).id, **CREATE)
        assert client.batches.cancel(going.id).status == "cancelling"
    # The second, on the same directory and the same (still running) engine: a replica restarted.
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        listed = {b.id: b for b in client.batches.list()}
        assert list(listed) == [going.id, open_.id, ended.id]  # newest first, as before
        assert listed[ended.id].status == "completed" and listed[ended.id].request_counts == ended.request_counts
        out = client.files.content(ended.output_file_id).text
        assert [json.loads(x)["custom_id"] for x in out.splitlines()] == ["d"]
        # The batch that was cancelling ended when the first endpoint stopped: its held line is a cancelled one
        # (a crash that leaves it cancelling on disk: the next test).
        gone = listed[going.id]
        assert gone.status == "cancelled" and gone.request_counts.failed == 1
        err = json.loads(client.files.content(gone.error_file_id).text)
        assert err["custom_id"] == "c-slow" and err["error"]["code"] == "batch_cancelled"
        # The open one runs on: the line it had is kept, the held one asked again under the same id.
        assert listed[open_.id].status == "in_progress" and listed[open_.id].request_counts.completed == 1
        eng.release()
        done = wait_done(client, open_.id)
        assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (2, 1)
        rows = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]
        assert sorted(r["custom_id"] for r in rows) == ["a", "b-slow"]
        assert eng.submitted.count(f"{open_.id}/a") == 1  # answered before the restart: never asked again
        assert eng.submitted.count(f"{open_.id}/b-slow") == 2  # asked again: the engine hands over its result
        assert eng.submitted.count(f"{going.id}/c-slow") == 1
        assert f.id not in {x.id for x in client.files.list()}  # deleted stays deleted
        assert client.get(f"/batches/{done.id}/smartbatch_report", cast_to=object)["totals"]["succeeded"] == 2
    # Ended batches keep only their record: no input or results file is left behind.
    assert sorted(p.name for p in (state / "batches").iterdir()) == sorted(
        f"{b}.json" for b in (ended.id, open_.id, going.id))


def test_after_a_crash_a_cancelling_batch_ends_cancelled_and_one_whose_window_passed_expires(tmp_path):
    """A crash leaves open batches on disk as they were (a clean stop ends a cancelling one first): taken back,
    the cancelling one ends at once, and one whose window ended while the endpoint was down expires, keeping the
    line that was in; neither asks the engine for anything."""
    import asyncio

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_state import EndpointState
    from engine.core.result import Result

    state, eng = EndpointState(tmp_path), FakeEngine()
    for bid, status, created in (("batch_c", "cancelling", 1000), ("batch_w", "in_progress", 0)):
        left_open(state, bid, [batch_line("a", "in"), batch_line("b", "not yet")], window_s=3600.0,
                  created=created, status=status)
        state.add_result(bid, Result(id="a", status="ok", output="echo: in", usage={"input_tokens": 7}))
    state.close()

    async def go():
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, now=lambda: 4000.0, state_dir=tmp_path)
        await store.resume()
        await store.shutdown()
        return store

    store = asyncio.run(go())
    c, w = store.batches["batch_c"], store.batches["batch_w"]
    assert c.status == "cancelled" and w.status == "expired" and eng.submitted == []
    assert c.counts() == w.counts() == {"total": 2, "completed": 1, "failed": 1}
    errors = {bid: json.loads(store.files[store.batches[bid].error_file_id].data) for bid in ("batch_c", "batch_w")}
    assert errors["batch_c"]["error"]["code"] == "batch_cancelled"
    assert errors["batch_w"]["custom_id"] == "b" and "window passed" in errors["batch_w"]["error"]["message"]
    assert json.loads(store.files[w.output_file_id].data)["custom_id"] == "a"
    assert sorted(p.name for p in state.batches_dir.iterdir()) == ["batch_c.json", "batch_w.json"]


def test_lines_the_engine_refuses_after_a_restart_end_their_batch_saying_why(tmp_path):
    import asyncio

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_state import EndpointState
    from engine.core.errors import Overloaded

    state, eng = EndpointState(tmp_path), FakeEngine()
    left_open(state, "batch_r", [batch_line("b", "not yet")])
    state.close()

    def full(_):
        raise Overloaded("max_pending=1 unfinished requests")
    eng.submit_many = full

    async def go():
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, now=lambda: 10.0, state_dir=tmp_path)
        await store.resume()  # the endpoint still starts
        await store.shutdown()
        return store

    store = asyncio.run(go())
    r = store.batches["batch_r"]
    assert r.status == "completed" and r.counts() == {"total": 1, "completed": 0, "failed": 1}
    err = json.loads(store.files[r.error_file_id].data)["error"]["message"]
    assert "engine refused" in err and "max_pending" in err


def test_records_a_crash_or_another_version_left_unreadable_are_set_aside_and_the_endpoint_starts(tmp_path):
    """One bad record must not keep the endpoint from starting (a replica whose start fails restarts forever
    and serves nothing): it is renamed *.bad, logged, and the rest is taken back. A results line cut inside a
    multi-byte character is dropped, and the next result starts a line of its own."""
    import asyncio

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_state import EndpointState
    from engine.core.errors import ConfigError
    from engine.core.result import Result

    state, eng = EndpointState(tmp_path), FakeEngine()
    left_open(state, "batch_ok", [batch_line("a", "in"), batch_line("b-slow", "w")])
    state.add_result("batch_ok", Result(id="a", status="ok", output="caf\u00e9 \u2603"))
    with open(state.batches_dir / "batch_ok.results.jsonl", "ab") as f:  # a second line, cut mid-character
        f.write(Result(id="b-slow", status="ok", output="\u2603").model_dump_json().encode()[:-4])
    (state.batches_dir / "batch_keyless.json").write_text('{"id": "batch_keyless"}')
    (state.batches_dir / "batch_list.json").write_text("[]")
    (state.files_dir / "file-old.json").write_text('{"id": "file-old", "filename": "a", "purpose": "batch"}')
    (state.files_dir / "file-old.data").write_bytes(b"x")
    with __import__("pytest").raises(ConfigError, match="another endpoint uses this directory"):
        FilesAndBatches(eng, CAT, window_default_s=86400.0, state_dir=tmp_path)
    state.close()

    async def go():
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, now=lambda: 10.0, state_dir=tmp_path)
        await store.resume()
        eng.release()
        await store.batches["batch_ok"].task
        await store.shutdown()
        return store

    store = asyncio.run(go())
    assert list(store.batches) == ["batch_ok"] and store.batches["batch_ok"].status == "completed"
    assert eng.submitted == ["batch_ok/b-slow"]  # the cut line asked again, the whole one kept
    out = [json.loads(x) for x in store.files[store.batches["batch_ok"].output_file_id].data.splitlines()]
    assert [o["custom_id"] for o in out] == ["a", "b-slow"]
    assert out[0]["response"]["body"]["choices"][0]["message"]["content"] == "caf\u00e9 \u2603"
    assert sorted(p.name for p in state.batches_dir.iterdir()) == [
        "batch_keyless.json.bad", "batch_list.json.bad", "batch_ok.json"]
    assert sorted(p.name for p in state.files_dir.iterdir() if p.suffix == ".bad") == ["file-old.json.bad"]



def test_a_line_asked_again_gets_what_is_left_of_the_window_in_the_engines_seconds(tmp_path):
    """The window is the lines' deadline, in engine seconds; the endpoint was down for real seconds. At 100x,
    30 real seconds of a one-hour window leave 600 engine seconds."""
    import asyncio

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_state import EndpointState

    state, eng = EndpointState(tmp_path), FakeEngine()
    left_open(state, "batch_s", [batch_line("b-slow", "w")], window_s=3600.0, created=1000)
    state.close()

    async def go():
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, now=lambda: 1030.0, state_dir=tmp_path,
                                speedup=100.0)
        await store.resume()
        await store.shutdown()

    asyncio.run(go())
    assert eng.seen["batch_s/b-slow"]["deadline_s"] == 600.0


@pytest.mark.parametrize("cut", ["stop", "stop-unsent", "cancel"])
def test_a_batch_the_engine_stopped_under_stays_open_and_the_next_endpoint_answers_it(tmp_path, cut):
    """``smartbatch stop`` fails what the engine holds open; the endpoint took those failures as answers, so the
    batch ended "completed" with every caught line an error and its input gone: nothing left to take back. A
    ``serve`` stop first cancels the engine's work and waits for its provider batches (stop 49): a line that
    cancel ended is not answered either, and a line the cancelled provider batch finished meanwhile (billed),
    after the cancelled ones, is kept; left untaken, it was asked again at the next start and paid twice."""
    from engine.core.result import ENGINE_CANCELLED, Result

    eng, state = FakeEngine(), tmp_path / "state"
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        f = upload(client, [batch_line("a", "fast"), batch_line("b-slow", "held"), batch_line("c-slow", "late")])
        b = client.batches.create(input_file_id=f.id, **CREATE)
        until_counted(client, b.id, 1)
        late = eng._held.pop()  # answered at the last moment, after b's failure (not yet taken then)
        with said("stays open") as seen:  # the endpoint took the failure the stop (or the cancel) gave
            if cut == "stop":
                eng.stop_under("engine 'prod' was stopped")
            elif cut == "stop-unsent":  # the stop named it cut before it was sent (``actors._stop_cut``)
                from engine.app._driver_stop import unsent_at_stop

                eng.gone = "engine 'prod' was stopped"
                fut, res = eng._held.pop()
                fut.set_result(Result(id=res.id, tenant=res.tenant, status="failed", error=unsent_at_stop(eng.gone)))
            else:
                fut, res = eng._held.pop()
                fut.set_result(Result(id=res.id, tenant=res.tenant, status="failed", error=ENGINE_CANCELLED))
            late[0].set_result(late[1])
            assert seen.wait(10)
        # The late answer is taken by the batch's collector on its own loop: counted soon, not at once. Two
        # rehearsals' failures here (stops 56 and 84) were no slowness: the collector ended at the stop's failure,
        # and an answer set after it ran was never taken (stop 85: the next test forces that order).
        kept = until_counted(client, b.id, 2)
        assert kept.status == "in_progress" and (kept.request_counts.completed, kept.request_counts.failed) == (2, 0)
    again = FakeEngine()  # a new engine under the next endpoint on the same state
    with serving(make_app(again, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        again.release()
        done = wait_done(client, b.id)
        assert done.status == "completed" and (done.request_counts.completed, done.request_counts.failed) == (3, 0)
        assert again.submitted == [f"{b.id}/b-slow"]  # only the line the stop caught is asked again


@pytest.mark.parametrize("cut", ["stop", "stop-unsent", "stop-then-raises"])
def test_an_answer_that_comes_after_the_stops_first_failure_is_kept_at_once_not_asked_again(tmp_path, cut):
    """A stop elsewhere fails a line (unsent, or cut with ``why``) and then the result thread hands over another
    line's answer, got before the actors went (billed). The collector ended at the first failure: an answer that
    came after it stayed untaken (the batch counted 1 of 2 for good, a clean-clone rehearsal's 60 s), kept only if
    the endpoint stopped cleanly; after a kill the next endpoint asked it again, and it was paid twice. The order
    is forced here: the late answer comes once the endpoint has said the batch stays open. A future that raises
    after the stop's failure (``stop-then-raises``) leaves the batch open too, never ended with the stop's lines
    as errors (a guard of the collector's going on, which the code before did not need)."""
    import asyncio

    from engine.app._driver_stop import unsent_at_stop
    from engine.app._endpoint_batches import FilesAndBatches
    from engine.core.result import Result

    eng, gone = FakeEngine(), "engine 'prod' was stopped"

    async def first() -> tuple[str, dict]:
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, state_dir=tmp_path)
        f = store._add_file("in.jsonl", "batch", (batch_line("b-slow", "cut") + "\n" + batch_line("c-slow", "late")
                                                  + "\n").encode(), tenant="default")
        view = await store._create_batch({"input_file_id": f.id, **CREATE}, "default", "batch_s", None)
        job = store.batches[view["id"]]
        (cut_fut, cut_res), (late_fut, answer) = eng._held
        with said("stays open") as seen:
            eng.gone = gone
            cut_fut.set_result(Result(id=cut_res.id, tenant=cut_res.tenant, status="failed",
                                      error=gone if cut == "stop" else unsent_at_stop(gone)))
            for _ in range(1000):  # the collector runs on this loop: it takes the failure within a few turns
                if seen.is_set():
                    break
                await asyncio.sleep(0)
            assert seen.is_set()
        if cut == "stop-then-raises":
            late_fut.set_exception(RuntimeError("the result thread ended"))
        else:
            late_fut.set_result(answer)
        await job.task  # every future of the batch is resolved now: the collector ends
        store.state.close()  # a kill: no shutdown takes what the collector left
        return job.status, dict(job.results)

    status, results = asyncio.run(first())
    raised = cut == "stop-then-raises"
    assert status == "in_progress" and list(results) == ([] if raised else ["c-slow"])
    assert raised or results["c-slow"].output == "echo: late"
    asked = asked_at_next_start(tmp_path)
    # The late answer was kept: only the cut line is asked again (a line with no answer, both).
    assert asked == ["batch_s/b-slow"] + (["batch_s/c-slow"] if raised else [])


def test_a_stop_that_fails_many_lines_says_once_that_the_batch_stays_open_and_a_line_left_open_holds_no_shutdown(
        tmp_path):
    """Two lines the stop failed (one unsent, one cut), one the engine's cancel cut, a late answer, and a line
    still open when the endpoint stops: the batch says once that it stays open (a review of stop 85: its
    collector, which goes on after the stop's first failure now, must not say it per line), keeps the late answer
    at once, and the endpoint's shutdown ends with that line still open (no collector waits on it for good); the
    next endpoint asks all but the answered line again, none twice."""
    import asyncio

    from engine.app._driver_stop import unsent_at_stop
    from engine.app._endpoint_batches import FilesAndBatches
    from engine.core.result import ENGINE_CANCELLED, Result

    eng, gone = FakeEngine(), "engine 'prod' was stopped"
    names = ["a-slow", "b-slow", "c-slow", "d-slow", "e-slow"]
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda rec: "stays open" in rec.getMessage() and records.append(rec.getMessage())

    async def first() -> tuple[str, list[str], bool]:
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, state_dir=tmp_path)
        f = store._add_file("in.jsonl", "batch", "".join(batch_line(n, n) + "\n" for n in names).encode(),
                            tenant="default")
        view = await store._create_batch({"input_file_id": f.id, **CREATE}, "default", "batch_s", None)
        job = store.batches[view["id"]]
        (fa, ra), (fb, rb), (fc, rc), (fd, answer), _open = eng._held
        eng.gone = gone
        for fut, res, why in ((fa, ra, unsent_at_stop(gone)), (fb, rb, gone), (fc, rc, ENGINE_CANCELLED)):
            fut.set_result(Result(id=res.id, tenant=res.tenant, status="failed", error=why))
        for _ in range(1000):  # the collector runs on this loop: it takes the three within a few turns
            if records:
                break
            await asyncio.sleep(0)
        fd.set_result(answer)  # the late answer, once the batch has said it stays open
        for _ in range(1000):
            if "d-slow" in job.results:
                break
            await asyncio.sleep(0)
        at_once = list(job.results)  # before the shutdown's own take-back, which a kill never runs
        await asyncio.wait_for(store.shutdown(), 10)  # a bound, not a wait: it ends at once
        return job.status, at_once, job.task.done()

    logging.getLogger("smartbatch.endpoint").addHandler(handler)
    try:
        status, taken, ended = asyncio.run(first())
    finally:
        logging.getLogger("smartbatch.endpoint").removeHandler(handler)
    assert (status, taken, ended) == ("in_progress", ["d-slow"], True)
    assert len(records) == 1, records
    asked = asked_at_next_start(tmp_path)
    assert sorted(asked) == [f"batch_s/{n}" for n in names if n != "d-slow"]


def test_a_shutdown_keeps_the_answers_its_collectors_had_not_taken_yet(tmp_path):
    """The endpoint stops while a line's answer is in (its future resolved) but not yet taken by the batch's
    collector: it is kept on disk, and the next endpoint asks only the line that had none."""
    import asyncio

    class Stalled(FakeEngine):
        async def as_completed(self, futures):  # a collector that takes nothing (it is behind)
            await asyncio.Event().wait()
            yield  # pragma: no cover

    state = tmp_path / "state"
    with serving(make_app(Stalled(), catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        f = upload(client, [batch_line("a", "in"), batch_line("b-slow", "not yet")])
        b = client.batches.create(input_file_id=f.id, **CREATE)
        assert client.batches.retrieve(b.id).request_counts.completed == 0
    again = FakeEngine()
    with serving(make_app(again, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        again.release()
        done = wait_done(client, b.id)
        assert (done.status, done.request_counts.completed, done.request_counts.failed) == ("completed", 2, 0)
        assert again.submitted == [f"{b.id}/b-slow"]


def test_a_new_engine_counts_a_kept_lines_calls_that_got_no_answer_at_their_bound_beside_its_cost():
    """A kept answer whose flex call was given up at its timeout says that call's bound beside its cost (stop 84),
    and a kept failure that may be billed says its own: the old engine's ledger held both, the new one counts
    them too. Counted at the cost alone, $0.0003 of the answer's and the failure's $0.002 were spent again (a
    review, rvbill84)."""
    import asyncio
    from types import SimpleNamespace

    from engine.app._endpoint_resume import TakeBack
    from engine.core.result import Result

    counted: list = []
    take = TakeBack.__new__(TakeBack)
    take.engine = SimpleNamespace(count_spent=counted.extend)
    one = {"tenant": "t", "provider": "openai", "model": "gpt-5-mini"}
    results = {"a": Result(id="a", status="ok", cost_usd=0.01, possibly_billed_usd=0.0003, **one),
               "b": Result(id="b", status="failed", possibly_billed_usd=0.002, **one),
               "c": Result(id="c", status="failed", **one)}
    asyncio.run(take._count_kept(SimpleNamespace(id="batch_1", tenant="t"), results))
    assert {c.cid.rsplit(":", 1)[1]: c.usd for c in counted} == pytest.approx({"a": 0.0103, "b": 0.002}, abs=1e-12)


def test_a_new_engine_counts_what_an_open_batch_kept_against_its_budgets_and_a_restarted_replica_does_not(tmp_path):
    """An endpoint restarted with its state directory on a new engine took its open batch back and spent its hard
    budget again: the kept lines were paid for under the old engine's ledger, which the new one never saw (a hunt:
    $0.008064 billed against a $0.006 limit). They are counted first, as ``batch --resume`` counts its kept lines;
    a replica restarted under the same engine (the same ledger) counts nothing again."""
    from engine.core.budgets import BudgetSettings, BudgetSpec

    class Budgeted(FakeEngine):
        def __init__(self, ledger: str):
            super().__init__()
            self.settings = self.settings.model_copy(
                update={"budgets": BudgetSettings(specs=(BudgetSpec(max_budget=1.0),))})
            self.ledger, self.counted = ledger, []

        def report(self) -> dict:
            return {"budget": {"ledger_id": self.ledger}}

        def count_spent(self, charges) -> None:
            self.counted.extend(charges)

    first, state = Budgeted("L1"), tmp_path / "state"
    with serving(make_app(first, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        f = upload(client, [batch_line("a", "fast"), batch_line("b-slow", "held")])
        open_ = client.batches.create(input_file_id=f.id, **CREATE)
        until_counted(client, open_.id, 1)  # "a" is in and paid for, "b-slow" is held by the engine
    assert first.counted == []
    paid = json.loads((state / "batches" / f"{open_.id}.results.jsonl").read_text().splitlines()[0])["cost_usd"]
    second = Budgeted("L2")  # a new engine: its ledger never saw "a"
    with serving(make_app(second, catalog=CAT, state_dir=state)):
        pass
    (charge,) = second.counted
    assert paid > 0 and charge.usd == pytest.approx(paid) and open_.id in charge.cid and charge.model == "gpt-5-mini"
    with serving(make_app(second, catalog=CAT, state_dir=state)):  # its replica restarted: the same ledger
        pass
    assert len(second.counted) == 1
    # A count that fails (the budget actor restarting) keeps the batch, and the next start counts it.
    third = Budgeted("L3")
    third.count_spent = lambda charges: (_ for _ in ()).throw(TimeoutError("budget restarting"))
    with serving(make_app(third, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        assert client.batches.retrieve(open_.id).status == "in_progress"
    fourth = Budgeted("L3")  # the same engine, its replica restarted: counts what the failed count left
    with serving(make_app(fourth, catalog=CAT, state_dir=state)):
        pass
    assert [c.cid for c in fourth.counted] == [charge.cid]


@contextlib.contextmanager
def disk_full(match: str):
    """Writes under the state directory whose path holds ``match`` fail as on a full disk (ENOSPC)."""
    import errno

    import engine.app._endpoint_state as st

    real_write, real_link = st.write_atomic, st.os.link

    def write(path, data, **kw):
        if all(m in str(path) for m in match.split("*")):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data, **kw)

    def link(src, dst):
        if match in str(dst):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_link(src, dst)
    st.write_atomic, st.os.link = write, link
    try:
        yield
    finally:
        st.write_atomic, st.os.link = real_write, real_link


def test_an_upload_or_a_create_the_state_directory_cannot_keep_is_refused_not_lost_at_the_next_start(tmp_path):
    """A full disk: the upload was answered 200 and gone at the next start, and a create answered in_progress,
    its lines run and paid, then failed at the next start, "its input was not found" (a helper's hunt)."""
    eng, state = FakeEngine(), tmp_path / "state"
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        with disk_full("/files/"), pytest.raises(openai.APIStatusError) as up:
            upload(client, [batch_line("a", "one")])
        assert up.value.status_code == 507 and "state directory" in str(up.value) and "free room" in str(up.value)
        assert list(client.files.list()) == []  # not accepted: nothing to lose
        with disk_full("/files/*.json"), pytest.raises(openai.APIStatusError):  # its bytes written, its record not
            upload(client, [batch_line("a", "one")])
        assert list((state / "files").iterdir()) == []  # nothing left behind (its bytes stayed for good)
        f = upload(client, [batch_line("b", "two")])
        with disk_full("/batches/"), pytest.raises(openai.APIStatusError) as create:
            client.batches.create(input_file_id=f.id, **CREATE)
        assert create.value.status_code == 507 and eng.submitted == []  # nothing sent, nothing paid
        assert list(client.batches.list()) == [] and not list((state / "batches").iterdir())


def test_a_batch_whose_end_cannot_be_written_stays_open_on_disk_and_the_next_start_writes_it(tmp_path):
    """The output file's write failed (a full disk), and the batch was saved completed with its results let go:
    at the next start its output was a 404, the paid answers gone (a helper's hunt)."""
    import engine.app._endpoint_state as st

    eng, state = FakeEngine(), tmp_path / "state"
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client, \
            pytest.MonkeyPatch.context() as mp:
        f = upload(client, [batch_line("a", "one"), batch_line("b", "two")])
        # Its results' appends fail too, before its end does (a full disk): the end is kept from memory.
        mp.setattr(st.EndpointState, "add_result", lambda self, bid, res: None)
        with disk_full("-output."):
            b = wait_done(client, client.batches.create(input_file_id=f.id, **CREATE).id)
            assert b.status == "completed" and len(client.files.content(b.output_file_id).text.splitlines()) == 2
    asked = list(eng.submitted)
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        again = wait_done(client, b.id)
        out = client.files.content(again.output_file_id).text
    assert again.status == "completed" and again.request_counts.completed == 2
    assert sorted(json.loads(x)["custom_id"] for x in out.splitlines()) == ["a", "b"]
    assert eng.submitted == asked  # written from the results kept on disk: nothing asked again


def test_what_a_kill_left_half_written_is_swept_at_the_next_start(tmp_path):
    """A kill during an upload's write left its temporary file (8 MB of a 156 MB upload) for good."""
    from engine.app._endpoint_state import EndpointState

    state = tmp_path / "state"
    st = EndpointState(state)
    left_open(st, "batch_kept", [batch_line("a", "one")])  # an open batch: its input stays
    st.close()
    (state / "files" / ".tmp-cut").write_bytes(b"x" * 100)
    (state / "batches" / ".tmp-cut2").write_bytes(b"{")
    (state / "batches" / "batch_gone.input").write_bytes(b"line\n")  # its create never reached its record
    EndpointState(state).close()
    assert sorted(p.name for p in (state / "files").iterdir()) == []
    assert sorted(p.name for p in (state / "batches").iterdir()) == ["batch_kept.input", "batch_kept.json"]


def test_a_line_the_restarted_engine_would_simulate_is_its_own_error_and_the_others_are_asked(tmp_path, monkeypatch):
    """An endpoint restarted on its state directory whose engine now may not simulate (``simulate_others``,
    decided at each start: a restart with real endpoints, or without SIMULATE_OTHERS=true) met an open batch's
    Gemini line: the engine refused the whole submission, and every line not yet answered failed "the engine
    refused this line", the OpenAI ones too (a fault hunt). The line is its own error, as at a create."""
    import asyncio

    from engine.app._endpoint_batches import FilesAndBatches
    from engine.app._endpoint_state import EndpointState
    from engine.core.request import validation_context
    from engine.core.result import Result
    from engine.core.settings import Settings

    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    state, eng = EndpointState(tmp_path), FakeEngine()
    left_open(state, "batch_g", [batch_line("a", "one"), batch_line("g", "two", model="gemini-2.5-flash"),
                                 batch_line("h", "three", model="gemini-2.5-flash")])
    state.add_result("batch_g", Result(id="h", status="ok", output="answered before"))  # kept as it was
    state.close()
    eng.settings = Settings(providers={"mode": "http"})  # the providers' own APIs: Gemini is refused
    eng._ctx = validation_context(CAT, eng.settings, live=True)  # the engine's way in (``Engine._as_request``)

    async def go():
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, now=lambda: 10.0, state_dir=tmp_path)
        await store.resume()
        r = store.batches["batch_g"]
        if r.task is not None:  # the lines asked: their answers collected
            await asyncio.wait_for(r.task, 5.0)
        await store.shutdown()
        return store, r

    store, r = asyncio.run(go())
    assert r.counts() == {"total": 3, "completed": 2, "failed": 1}, r.counts()
    out = {x["custom_id"] for x in map(json.loads, store.files[r.output_file_id].data.decode().splitlines())}
    assert out == {"a", "h"}
    (err,) = map(json.loads, store.files[r.error_file_id].data.decode().splitlines())
    assert err["custom_id"] == "g" and "simulated" in err["error"]["message"], err
    assert eng.submitted == ["batch_g/a"]
