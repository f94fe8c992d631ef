"""A batch file's chat line whose body asks for ``n`` > 1 choices (``engine.core._choices``), both ways in: ``smartbatch
batch`` (with stand-in engines, no Ray) and the endpoint's Files and Batches API (the official SDK over the tests'
fake engine). Such a line was an error line ("submit n requests"), so a batch file that samples several answers
per line could not move over unchanged (a helper's task). Each choice is a request of its own, as on the chat
route; the line is answered with n choices, or, one choice not answered, it is an error line carrying the
choices that were (paid for), which ``--resume`` keeps."""

from __future__ import annotations

import concurrent.futures
import json

import openai
import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.app.endpoint import make_app
from engine.core.batchfile import read_batch_file, report, write_results
from engine.core.catalog import default_catalog
from engine.core.cost import price_usage
from engine.core.result import Result
from tests.unit.helpers import AnsweringEngine
from tests.unit.test_endpoint import FakeEngine, serving, upload, wait_done

CAT = default_catalog()
runner = CliRunner()


def line(cid: str, content: str = "Name a river.", url: str = "/v1/chat/completions", **body) -> str:
    b = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": content}], "max_completion_tokens": 50}
    if url == "/v1/responses":
        b = {"model": "gpt-5-mini", "input": content, "max_output_tokens": 50}
    return json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": {**b, **body}})


def answer(req, **kw) -> Result:
    return Result(**{"id": req.id, "status": "ok", "output": f"answer of {req.id}", "cost_usd": 0.002, "mode": "sync",
                     "usage": {"input_tokens": 7, "output_tokens": 3}, "provider": req.provider, "model": req.model,
                     "tenant": req.tenant, **kw})


def test_a_chat_line_of_n_choices_is_n_requests_and_a_bad_n_fails_its_line_alone(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([
        line("a", n=3), line("one", n=1), line("zero", n=0), line("many", n=129), line("half", n=1.5),
        line("text", n="3"), line("yes", n=True), line("resp", url="/v1/responses", n=2),
        json.dumps({"custom_id": "img", "url": "/v1/images/generations",
                    "body": {"model": "gpt-image-1", "prompt": "a lighthouse", "n": 2}}),
        line("b", "Name a sea.")]) + "\n")
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    assert [q.id for q in bf.requests] == ["a", "a/n1", "a/n2", "one", "b"]
    a, a1, a2 = bf.requests[:3]
    # Choice 0 is the line as sent without n (an identical request answered before may answer it); the others are
    # generated: never the cache's copy of choice 0. None carries n to the provider (Anthropic takes none).
    assert (a.reuse, a1.reuse, a2.reuse) == ("exact", "none", "none")
    assert all("n" not in q.body and q.body["messages"] == a.body["messages"] and q.deadline_s == 3600.0
               for q in (a, a1, a2))
    # n 1 is one choice, and n goes on the wire no more than on the chat route: a Claude model takes a line with
    # it, as the endpoint's chat route does (Anthropic refuses n; the line was an error line).
    assert "n" not in bf.requests[3].body
    claude = tmp_path / "claude.jsonl"
    claude.write_text("".join(json.dumps({"custom_id": cid, "body": {
        "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 20, "n": n}}) + "\n"
        for cid, n in (("c1", 1), ("c2", 2))))
    assert [q.id for q in read_batch_file(claude, window_s=3600.0, catalog=CAT).requests] == ["c1", "c2", "c2/n1"]
    problems = {ln.custom_id: ln.problem for ln in bf.invalid}
    for cid in ("zero", "many", "half", "text", "yes"):
        fld, msg = problems[cid]
        assert fld == "body.n" and "from 1 to 128" in msg and "leave it out" in msg, (cid, msg)
    assert problems["resp"][0] == "body.n" and "Responses API has no n" in problems["resp"][1]
    assert problems["img"][0] == "body.n" and "one request makes one output" in problems["img"][1]  # as before


def test_a_choice_whose_id_is_another_lines_custom_id_fails_only_the_line_of_n_choices(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([line("a", n=2), line("a/n1", "Name a sea.")]) + "\n")
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    assert [q.id for q in bf.requests] == ["a/n1"]
    ((fld, msg),) = [ln.problem for ln in bf.invalid]
    assert fld == "custom_id" and "'a/n1', the custom_id of line 2" in msg


def test_the_output_line_has_n_choices_and_a_failed_choice_fails_its_line_keeping_the_others(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(line("a", n=3) + "\n" + line("x", "Name a lake.", n=3) + "\n")
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    results = [answer(q, provider_request_id=f"req_{q.id}") for q in bf.requests]
    results[5] = Result(id="x/n2", status="failed", error="openai HTTP 503: overloaded", cost_usd=0.0,
                        provider=results[5].provider, model=results[5].model)
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    assert write_results(bf, results, out, err) == (1, 1)
    (o,) = map(json.loads, out.read_text().splitlines())
    body = o["response"]["body"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["message"]["content"] for c in body["choices"]] == ["answer of a", "answer of a/n1", "answer of a/n2"]
    assert body["usage"] == {"prompt_tokens": 21, "completion_tokens": 9, "total_tokens": 30,  # each input billed
                             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                           "accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}
    assert o["custom_id"] == "a" and o["response"]["request_id"] == "req_a"
    # x's choice 2 failed: the line fails, as the endpoint's call does; choices 0 and 1 were billed all the same,
    # and ride in the error line, so nothing paid for is lost.
    (e,) = map(json.loads, err.read_text().splitlines())
    assert e["custom_id"] == "x" and e["error"]["code"] == "request_failed"
    assert e["error"]["message"].startswith("choice 2 of 3: openai HTTP 503") and "2 of the 3" in e["error"]["message"]
    assert e["response"]["status_code"] == 503
    assert [(c["index"], c["request_id"]) for c in e["smartbatch_choices"]] == [(0, "req_x"), (1, "req_x/n1")]
    assert e["smartbatch_choices"][1]["body"]["choices"][0]["message"]["content"] == "answer of x/n1"
    # The report: a line's cost is every choice's (billed), its list price each choice sent alone (at the tokens
    # its answer counted), once answered.
    doc = report(bf, results, CAT, window_s=3600.0, policy="smart")
    rows = {r["custom_id"]: r for r in doc["lines"]}
    alone = sum(price_usage(q, CAT, "sync", input_tokens=7, output_tokens=3).total for q in bf.requests[:3])
    assert rows["a"]["list_price_usd"] == pytest.approx(alone) and rows["a"]["cost_usd"] == pytest.approx(0.006)
    assert (rows["a"]["status"], rows["a"]["mode"], rows["a"]["choices"]) == ("ok", "sync", 3)
    assert (rows["x"]["status"], rows["x"]["list_price_usd"]) == ("failed", 0.0)
    assert rows["x"]["cost_usd"] == pytest.approx(0.004)
    tot = doc["totals"]
    assert (tot["lines"], tot["succeeded"], tot["failed"], tot["modes"]) == (2, 1, 1, {"sync": 5})
    assert tot["cost_usd"] == pytest.approx(0.01) and tot["saving_usd"] == pytest.approx(alone - 0.01)


def test_identical_lines_of_n_choices_answer_once_each_copy_with_its_own_answer(tmp_path):
    """Two identical lines of 2 choices: y's choice 0 is a copy of x's (the cache), its choice 1 generated. The
    copy borrows the body of the call whose answer it is (x's choice 0, not x's choice 1 of the same content),
    and a resumed run counts y's line, which shares that call's request id, at its calls: choice 1 was paid."""
    from engine.app._batch_kept import kept_charges

    def raw(text: str) -> dict:
        return {"id": f"chatcmpl-{text}", "object": "chat.completion", "model": "gpt-5-mini",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10,
                          "prompt_tokens_details": {"cached_tokens": 2}}}

    p, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    p.write_text(line("x", n=2) + "\n" + line("y", n=2) + "\n")
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    x, x1, y, y1 = bf.requests
    results = [answer(x, output="X0", raw=raw("X0"), provider_request_id="req_x0"),
               answer(x1, output="X1", raw=raw("X1"), provider_request_id="req_x1"),
               answer(y, status="reused", output="X0", mode="reuse", hit="exact", cost_usd=0.0, usage=None),
               answer(y1, output="Y1", raw=raw("Y1"), provider_request_id="req_y1")]
    assert write_results(bf, results, out) == (2, 0)
    rows = {r["custom_id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert [c["message"]["content"] for c in rows["y"]["response"]["body"]["choices"]] == ["X0", "Y1"]
    assert rows["y"]["response"]["request_id"] == "req_x0" and rows["y"]["response"]["body"]["id"] == "chatcmpl-X0"
    # The usage adds up the input read from the provider's prompt cache too: a kept line is priced by it.
    assert rows["x"]["response"]["body"]["usage"]["prompt_tokens_details"] == {"cached_tokens": 4}
    xc, yc = kept_charges(bf.lines, {ln.no: rows[ln.custom_id] for ln in bf.lines}, CAT, out)
    assert xc.usd > 0 and yc.usd == pytest.approx(xc.usd)  # never less than y's one paid call


class FailsOneChoice(AnsweringEngine):
    """Answers every request but those whose id ends ``/n2``: they fail with a provider's 503."""

    def submit_many(self, reqs, on_invalid="raise"):
        futs = super().submit_many(reqs)
        for k, r in enumerate(reqs):
            if r.id.endswith("/n2"):
                futs[k] = concurrent.futures.Future()
                futs[k].set_result(Result(id=r.id, status="failed", error="openai HTTP 503: overloaded",
                                          provider=r.provider, model=r.model))
        return futs


def test_resume_sends_only_the_choices_an_earlier_run_did_not_answer(tmp_path, monkeypatch):
    """A line of 3 choices whose third failed: its error line keeps the two answered (billed); the same command
    again is refused (they would be paid twice), and --resume sends the third alone and writes the line whole."""
    import engine.app.driver as driver_mod

    p, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    p.write_text(line("a", n=3) + "\n" + line("b", "Name a sea.") + "\n")
    sent: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: FailsOneChoice(CAT, sent)))
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert sent == [["a", "a/n1", "a/n2", "b"]]
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["b"]
    (e,) = map(json.loads, (tmp_path / "o.errors.jsonl").read_text().splitlines())
    assert [c["index"] for c in e["smartbatch_choices"]] == [0, 1]

    sent.clear()
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: AnsweringEngine(CAT, sent)))
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 2 and sent == [] and "--resume" in r.output, r.output
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert sent == [["a/n2"]]  # b is in OUT, a's choices 0 and 1 in the error file: neither is sent again
    assert "2 choice(s) of 1 line(s) of n choices kept" in " ".join(r.output.split())
    rows = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    choices = rows["a"]["response"]["body"]["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert choices[:2] == [c["body"]["choices"][0] | {"index": c["index"]} for c in e["smartbatch_choices"]]
    assert rows["a"]["response"]["body"]["usage"]["prompt_tokens"] == 3 * 4  # the kept two's and the new one's
    assert (tmp_path / "o.errors.jsonl").read_text() == ""


def test_a_resumed_run_counts_each_kept_choice_against_its_budgets(tmp_path):
    from engine.app._batch_kept import earlier_answers, kept_charges

    p, out, err = tmp_path / "in.jsonl", tmp_path / "o.jsonl", tmp_path / "o.errors.jsonl"
    p.write_text(line("a", n=3) + "\n")
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    results = [answer(q) for q in bf.requests]
    results[2] = Result(id="a/n2", status="failed", error="boom", provider=results[2].provider, model="gpt-5-mini")
    write_results(bf, results, out, err)
    bf, kept, kept_lines, _ = earlier_answers(bf, p, out, err, resume=True, overwrite=False)
    assert kept == {} and [q.id for q in bf.requests] == ["a/n2"]
    charges = kept_charges(kept_lines + bf.lines, kept, CAT, out)
    assert [c.cid.rsplit("/", 1)[-1] for c in charges] == ["a", "n1"]
    # Each as a kept line of one choice with the same answer counts.
    single = tmp_path / "one.jsonl"
    single.write_text(line("s") + "\n")
    one = read_batch_file(single, window_s=3600.0, catalog=CAT)
    write_results(one, [answer(one.requests[0])], tmp_path / "s.jsonl")
    (c1,) = kept_charges(one.lines, {1: json.loads((tmp_path / "s.jsonl").read_text())}, CAT, out)
    assert c1.usd > 0 and all(c.usd == pytest.approx(c1.usd) for c in charges)


def test_choices_a_crashed_run_left_answered_are_not_sent_again(tmp_path, monkeypatch):
    """A run killed mid-way leaves its answers in its journal, by request id: a choice is one, so ``--resume``
    (``prepare``) hands back what was answered and only the others go to the engine, merged into one line."""
    import engine.app.cli_batch as cli_batch
    import engine.app.driver as driver_mod
    from engine.app._batch_rescue import Rescued

    p, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    p.write_text(line("a", n=3) + "\n")
    (a, a1, a2) = read_batch_file(p, window_s=86400.0, catalog=CAT).requests

    def prepare(_out, settings, _cat, requests, **_kw):
        assert [q.id for q in requests] == ["a", "a/n1", "a/n2"]
        return settings, Rescued(results={"a/n1": answer(a1, mode="batch_api")}), [a, a2]
    monkeypatch.setattr(cli_batch, "prepare", prepare)
    sent: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: AnsweringEngine(CAT, sent)))
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert sent == [["a", "a/n2"]]
    (row,) = map(json.loads, out.read_text().splitlines())
    assert [c["message"]["content"] for c in row["response"]["body"]["choices"]] == [
        "sim://y", "answer of a/n1", "sim://y"]


# -- the endpoint's Files and Batches API ---------------------------------------------------------------------

class FakeEngineFailingN2(FakeEngine):
    def _result(self, req):
        if req.id.endswith("part/n2"):
            return Result(id=req.id, tenant=req.tenant, status="failed", error="openai HTTP 503: overloaded")
        return super()._result(req)


def test_a_batch_of_lines_of_n_choices_through_the_sdk():
    eng = FakeEngineFailingN2()
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        f = upload(client, [line("a", "one", n=3), line("b", "two"), line("part", "three", n=3),
                            line("bad", "four", n=200)])
        b = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        b = wait_done(client, b.id)
        assert b.status == "completed"
        # Lines, as OpenAI counts them: a line of n choices is one, failed when one of its choices is.
        assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (4, 2, 2)
        assert [i for i in eng.submitted if i.startswith(f"{b.id}/a")] == [f"{b.id}/a", f"{b.id}/a/n1", f"{b.id}/a/n2"]
        assert [eng.seen[f"{b.id}/a{k}"].get("reuse") for k in ("", "/n1", "/n2")] == ["exact", "none", "none"]
        assert "n" not in eng.seen[f"{b.id}/a/n1"]["body"]
        out = {o["custom_id"]: o for o in map(json.loads, client.files.content(b.output_file_id).text.splitlines())}
        choices = out["a"]["response"]["body"]["choices"]
        assert [(c["index"], c["message"]["content"]) for c in choices] == [(k, "echo: one") for k in range(3)]
        assert out["a"]["response"]["body"]["usage"]["prompt_tokens"] == 3 * 7
        assert len(out["b"]["response"]["body"]["choices"]) == 1
        errs = {e["custom_id"]: e for e in map(json.loads, client.files.content(b.error_file_id).text.splitlines())}
        assert errs["part"]["error"]["message"].startswith("choice 2 of 3") and len(errs["part"]["smartbatch_choices"]) == 2
        assert errs["bad"]["error"]["code"] == "invalid_request" and "body.n" in errs["bad"]["error"]["message"]
        # The batch's usage counts every call billed (3 of a, 1 of b, 2 of part); its report, each line's.
        assert b.usage.input_tokens == 6 * 7
        rep = client.get(f"/batches/{b.id}/smartbatch_report", cast_to=object)
        rows = {r["custom_id"]: r for r in rep["lines"]}
        one = price_usage(read_batch_file_line(line("b", "two")), CAT, "sync", input_tokens=7, output_tokens=3).total
        assert rows["a"]["cost_usd"] == pytest.approx(3 * rows["b"]["cost_usd"]) == pytest.approx(3 * one / 2)
        assert rows["a"]["list_price_usd"] == pytest.approx(3 * one)  # at the answers' tokens
        part = price_usage(read_batch_file_line(line("part", "three")), CAT, "sync", input_tokens=7,
                           output_tokens=3).total
        assert rows["part"]["cost_usd"] == pytest.approx(2 * part / 2) and rows["part"]["list_price_usd"] == 0.0


def read_batch_file_line(text: str):
    from engine.core.batchfile import parse_batch_file

    return parse_batch_file((text + "\n").encode(), source="x", window_s=86400.0, catalog=CAT).requests[0]


def test_a_restarted_endpoint_asks_only_the_choices_it_had_no_result_for(tmp_path):
    eng, state = FakeEngine(), tmp_path / "state"
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        b = client.batches.create(input_file_id=upload(client, [line("c-slow", "held", n=3)]).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
        # Choices 1 and 2 are answered at once, choice 0 ("-slow") is held: the line is neither completed nor
        # failed. The stop keeps the two answers (taken by its collector or at the shutdown).
        counts = client.batches.retrieve(b.id).request_counts
        assert (counts.completed, counts.failed) == (0, 0)
    with serving(make_app(eng, catalog=CAT, state_dir=state)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        eng.release()
        done = wait_done(client, b.id)
        assert (done.request_counts.completed, done.request_counts.failed) == (1, 0)
        (row,) = map(json.loads, client.files.content(done.output_file_id).text.splitlines())
        assert len(row["response"]["body"]["choices"]) == 3
    # Choices 1 and 2 were in before the restart: never asked again; choice 0 was asked again (handed over).
    assert [eng.submitted.count(f"{b.id}/c-slow{k}") for k in ("", "/n1", "/n2")] == [2, 1, 1]
