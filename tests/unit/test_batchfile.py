"""OpenAI Batch files without Ray: reading them, the trace builder, the output/error lines and the report."""

import concurrent.futures
import json

import pytest
from typer.testing import CliRunner

from engine.app._endpoint_wire import ApiError, Validator
from engine.app.cli import app
from engine.app.endpoint import _param_in
from engine.core.batchfile import (
    from_openai_batch,
    parse_window,
    read_batch_file,
    report,
    response_body,
    write_results,
)
from engine.core.catalog import default_catalog
from engine.core.cost import price_alone
from engine.core.errors import ConfigError, TraceError
from engine.core.result import Result
from engine.core.settings import default_settings
from engine.core.trace import load_trace

CAT = default_catalog()
runner = CliRunner()


def line(cid, content="Name three rivers.", model="gpt-5-mini", **extra):
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": model, "messages": [{"role": "user", "content": content}],
                                "max_completion_tokens": 50}, **extra})


@pytest.fixture
def batch(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([line("a"), line("b", "Name two seas."),
                            line("bad", model="no-such-model"), ""]) + "\n")
    return p


def test_window_parses_to_seconds_and_refuses_nonsense():
    assert parse_window("24h") == 86400.0 and parse_window("90m") == 5400.0 and parse_window("1d") == 86400.0
    for bad in ("24", "1mo", "-1h", "soon"):
        with pytest.raises(ConfigError, match="--window"):
            parse_window(bad)


def test_reading_keeps_the_body_and_sets_arrival_deadline_and_tenant(batch):
    bf = read_batch_file(batch, window_s=3600.0, tenant="acme", catalog=CAT)
    assert [ln.custom_id for ln in bf.lines] == ["a", "b", "bad"]
    a = bf.requests[0]
    assert (a.id, a.arrival_s, a.deadline_s, a.tenant) == ("a", 0.0, 3600.0, "acme")
    assert a.body["messages"][0]["content"] == "Name three rivers." and a.max_output_tokens == 50
    (bad,) = bf.invalid
    assert bad.no == 3 and bad.problem[0] == "model" and not bf.file_problems


def test_lines_with_no_usable_custom_id_are_problems_of_the_file(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text("\n".join([line("a"), line("a"), "{not json", "[1]", json.dumps({"body": {}})]) + "\n")
    bf = read_batch_file(p, window_s=60.0, catalog=CAT)
    assert [ln.custom_id for ln in bf.lines] == ["a"]
    assert [(no, f) for _, no, f, _ in bf.file_problems] == [(2, "custom_id"), (3, "line"), (4, "line"),
                                                           (5, "custom_id")]
    assert "duplicate custom_id 'a' (first on line 1)" in bf.file_problems[0][3]


def test_a_line_that_is_not_utf8_is_answered_by_its_custom_id_and_its_neighbours_go_on(tmp_path):
    """A stray Latin-1 byte in one prompt: that line is an error line of its own (naming the byte), not a
    problem of the whole file (which fails the whole batch at the endpoint, as a line without a custom_id
    must). Only a custom_id that is itself not UTF-8, which could not be written back, stays one."""
    from engine.core.batchfile import parse_batch_file

    data = b"\n".join([line("a").encode(), line("b", "cafe au lait").encode().replace(b"cafe", b"caf\xe9"),
                        b'{"custom_id": "c\xe9", "body": {}}', b"\xff\xfe", line("d").encode()]) + b"\n"
    p = tmp_path / "in.jsonl"
    p.write_bytes(data)
    for bf in (read_batch_file(p, window_s=60.0, catalog=CAT), parse_batch_file(data, source=str(p), window_s=60.0,
                                                                                  catalog=CAT)):
        assert [r.id for r in bf.requests] == ["a", "d"]
        (b,) = bf.invalid
        assert (b.custom_id, b.no, b.problem[0]) == ("b", 2, "line") and "byte 0xe9 at column" in b.problem[1]
        assert [(no, f) for _, no, f, _ in bf.file_problems] == [(3, "custom_id"), (4, "line")]
        assert all("not UTF-8" in msg for *_, msg in bf.file_problems)


def test_builder_refuses_bad_lines_naming_file_line_field_or_skips_them(batch):
    with pytest.raises(TraceError) as exc:
        from_openai_batch(batch, window_s=86400.0, catalog=CAT)
    assert f"{batch}:3: field 'model'" in str(exc.value) and "--skip-invalid" in str(exc.value)
    tr = from_openai_batch(batch, window_s=86400.0, catalog=CAT, skip_invalid=True)
    assert [r.id for r in tr.requests] == ["a", "b"] and tr.skipped == 1


def test_trace_from_openai_batch_refuses_a_misspelt_body_field_as_batch_does_naming_line_field_and_fix(tmp_path):
    """A walkthrough: `trace from-openai-batch` took `body.temprature` (in a simulated run's settings, the default)
    that `smartbatch batch` refuses at OpenAI (`--providers http`). A line is judged as the providers judge it."""
    from engine.app.cli_batch import _strict
    from engine.app.cli_common import _providers, _settings

    src, out = tmp_path / "in.jsonl", tmp_path / "t.jsonl"
    typo = json.loads(line("typo"))
    typo["body"]["temprature"] = 0.2
    src.write_text("\n".join([line("a"), json.dumps(typo)]) + "\n")
    said = ("body.temprature is not a field of OpenAI's /v1/chat/completions, which refuses any field it does not "
            "know")
    r = runner.invoke(app, ["trace", "from-openai-batch", str(src), "--out", str(out)])
    text = " ".join(r.output.split())
    assert r.exit_code == 2 and f"{src}:2: field 'body.temprature': {said}" in text, r.output
    assert "check its spelling, or leave it out" in text and not out.exists()
    settings, cat = _settings(None)  # what `smartbatch batch --providers http` reads the same line as
    bf = read_batch_file(src, window_s=3600.0, catalog=cat, settings=_strict(_providers(settings, "http", None)),
                         live=True)
    assert [(ln.no, ln.problem[0]) for ln in bf.invalid] == [(2, "body.temprature")]
    assert bf.invalid[0].problem[1].startswith(said)
    r = runner.invoke(app, ["trace", "from-openai-batch", str(src), "--out", str(out), "--skip-invalid"])
    assert r.exit_code == 0 and [q.id for q in load_trace(out, catalog=CAT).requests] == ["a"], r.output


def test_trace_from_openai_batch_keeps_the_lines_openai_takes_that_the_engine_calls_otherwise(tmp_path):
    """A review of stop 79: judged as an HTTP run wholesale, a /v1/responses line for a model the catalog calls
    through chat completions (``reasoning``, ``truncation``: fields OpenAI takes there) was refused, where a
    simulated run takes it and so did the builder before; only a field OpenAI does not know is refused."""
    src, out = tmp_path / "in.jsonl", tmp_path / "t.jsonl"
    body = {"model": "gpt-5-mini", "input": "Name three rivers.", "max_output_tokens": 50,
            "reasoning": {"effort": "low"}, "truncation": "auto"}
    typo = json.loads(line("typo"))
    typo["body"]["temprature"] = 0.2
    src.write_text("\n".join([json.dumps({"custom_id": "r", "method": "POST", "url": "/v1/responses",
                                          "body": body}), line("a"), json.dumps(typo)]) + "\n")
    r = runner.invoke(app, ["trace", "from-openai-batch", str(src), "--out", str(out), "--skip-invalid"])
    assert r.exit_code == 0, r.output
    assert [q.id for q in load_trace(out, catalog=CAT).requests] == ["r", "a"]
    assert "body.temprature" in " ".join(r.output.split()) and "body.reasoning" not in r.output


def test_trace_from_openai_batch_command_writes_a_trace_bench_can_load(batch, tmp_path):
    out = tmp_path / "t.jsonl"
    r = runner.invoke(app, ["trace", "from-openai-batch", str(batch), "--out", str(out), "--window", "2h",
                            "--tenant", "acme"])
    assert r.exit_code == 2 and "error:" in r.output and ":3: field 'model'" in r.output
    r = runner.invoke(app, ["trace", "from-openai-batch", str(batch), "--out", str(out), "--window", "2h",
                            "--tenant", "acme", "--skip-invalid"])
    assert r.exit_code == 0, r.output
    tr = load_trace(out, catalog=CAT)
    assert [(q.id, q.arrival_s, q.deadline_s, q.tenant) for q in tr.requests] == [
        ("a", 0.0, 7200.0, "acme"), ("b", 0.0, 7200.0, "acme")]
    assert tr.requests[1].body["messages"][0]["content"] == "Name two seas."


def results_for(bf):
    a, b = bf.requests
    return [Result(id="a", status="ok", output="Nile, Amazon, Rhine", usage={"input_tokens": 5, "output_tokens": 6},
                   provider_request_id="req_1", raw={"id": "chatcmpl-1", "object": "chat.completion"},
                   real=True, cost_usd=0.001, mode="batch_api", provider=a.provider, model=a.model),
            Result(id="b", status="failed", error="HTTP 500 after 3 tries", provider=b.provider, model=b.model)]


def test_a_write_that_fails_midway_leaves_the_earlier_output_whole(batch, tmp_path, monkeypatch):
    """Opened "w", a full disk cut OUT short on a --resume, and answers an earlier run had paid for were lost (a
    helper's hunt): each file is now written beside its name and put in place whole."""
    import errno

    import engine.core.files as files

    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    earlier = '{"custom_id": "a", "response": {"status_code": 200}, "error": null}\n'
    out.write_text(earlier)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        write_results(bf, results_for(bf), out, err)
    assert out.read_text() == earlier and not err.exists()
    assert sorted(x.name for x in tmp_path.iterdir()) == ["e.jsonl", "in.jsonl", "o.jsonl"] if err.exists() else \
        sorted(x.name for x in tmp_path.iterdir()) == ["in.jsonl", "o.jsonl"]  # no file left half written
    monkeypatch.undo()
    assert write_results(bf, results_for(bf), out, err) == (1, 2)


def test_a_linked_output_is_written_through_and_a_new_one_gets_the_usual_permissions(batch, tmp_path):
    """Renamed over it, a symlinked OUT became a plain file and its target kept the old lines, and a new OUT was
    made 0600 (the temporary file's mode; a review)."""
    import os

    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    target, link = tmp_path / "real.jsonl", tmp_path / "o.jsonl"
    target.write_text("old\n")
    link.symlink_to(target)
    assert write_results(bf, results_for(bf), link, tmp_path / "e.jsonl") == (1, 2)
    assert link.is_symlink() and json.loads(target.read_text())["custom_id"] == "a"
    umask = os.umask(0o022)
    try:
        write_results(bf, results_for(bf), tmp_path / "new.jsonl", tmp_path / "new.errors.jsonl")
    finally:
        os.umask(umask)
    assert (tmp_path / "new.jsonl").stat().st_mode & 0o777 == 0o644


def test_output_and_error_files_have_openai_shapes_and_every_custom_id_once(batch, tmp_path):
    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    out, err = tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    assert write_results(bf, results_for(bf), out, err) == (1, 2)
    (o,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert o["custom_id"] == "a" and o["id"].startswith("batch_req_") and o["error"] is None
    assert o["response"] == {"status_code": 200, "request_id": "req_1",
                             "body": {"id": "chatcmpl-1", "object": "chat.completion"}}
    errs = {e["custom_id"]: e for e in map(json.loads, err.read_text().splitlines())}
    assert set(errs) == {"b", "bad"} and errs["bad"]["response"] is None
    assert errs["b"]["error"] == {"code": "request_failed", "message": "HTTP 500 after 3 tries"}
    # The provider's HTTP status in the line's response, as OpenAI's error file has it.
    assert errs["b"]["response"]["status_code"] == 500
    assert errs["bad"]["error"]["code"] == "invalid_request" and ":3: field 'model'" in errs["bad"]["error"]["message"]


def test_results_must_pair_one_to_one(batch, tmp_path):
    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    with pytest.raises(ValueError, match="pair one to one"):
        write_results(bf, results_for(bf)[:1], tmp_path / "o.jsonl")
    with pytest.raises(ValueError, match="request order"):
        write_results(bf, results_for(bf)[::-1], tmp_path / "o.jsonl")


def test_a_simulated_or_reused_result_gets_a_chat_completion_body(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(line("x") + "\n" + line("y") + "\n")  # the same body twice: y reuses x
    bf = read_batch_file(p, window_s=3600.0, catalog=CAT)
    x, y = bf.requests
    sim = Result(id="x", status="ok", output="sim://openai/gpt-5-mini/x", usage={"input_tokens": 5,
                 "output_tokens": 7}, cost_usd=0.002, mode="sync", provider=x.provider, model=x.model)
    body = response_body("/v1/chat/completions", x, sim)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == sim.output
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12,
                             "prompt_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0, "audio_tokens": 0},
                             "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                                           "accepted_prediction_tokens": 0,
                                                           "rejected_prediction_tokens": 0}}
    reused = Result(id="y", status="reused", output=sim.output, mode="reuse", hit="exact", provider=y.provider,
                    model=y.model)
    write_results(bf, [sim, reused], tmp_path / "o.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert [r["custom_id"] for r in rows] == ["x", "y"]
    assert rows[1]["response"]["body"]["choices"][0]["message"]["content"] == sim.output
    assert (tmp_path / "o.errors.jsonl").read_text() == ""
    # A reused line whose leader was called over HTTP gets the leader's raw body and request id.
    raw = {"id": "chatcmpl-9", "object": "chat.completion"}
    real = sim.model_copy(update={"raw": raw, "provider_request_id": "req_9", "real": True})
    write_results(bf, [real, reused], tmp_path / "o.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "o.jsonl").read_text().splitlines()]
    assert rows[1]["response"]["body"] == raw and rows[1]["response"]["request_id"] == "req_9"
    # Another provider's wire format (an Anthropic message) is answered in the shape the file asked for.
    msg = sim.model_copy(update={"raw": {"id": "msg_1", "type": "message", "content": [{"type": "text",
                                                                                       "text": "hi"}]}})
    body = response_body("/v1/chat/completions", x, msg)
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == sim.output


def test_report_sums_the_lines_costs_against_list_prices(batch):
    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    doc = report(bf, results_for(bf), CAT, window_s=3600.0, policy="smart")
    rows = {r["custom_id"]: r for r in doc["lines"]}
    a = bf.requests[0]  # priced at its answer's tokens
    assert rows["a"]["list_price_usd"] == pytest.approx(price_alone(a.model_copy(update={
        "input_tokens": 5, "output_tokens": 6}), CAT, "sync").total)
    assert rows["b"]["status"] == "failed" and rows["bad"]["status"] == "invalid"
    tot = doc["totals"]
    assert tot["cost_usd"] == pytest.approx(sum(r["cost_usd"] for r in doc["lines"])) == pytest.approx(0.001)
    assert tot["saving_usd"] == pytest.approx(tot["list_price_usd"] - tot["cost_usd"])
    assert (tot["lines"], tot["succeeded"], tot["failed"], tot["modes"]) == (3, 1, 2, {"batch_api": 1})
    assert tot["late"] == 0
    # As the engine gives them: "a" answered after the window (counted), "b" failed (deadline_met False, as
    # every failed result: not a late answer, a review).
    late = [r.model_copy(update={"deadline_met": False}) for r in results_for(bf)]
    doc = report(bf, late, CAT, window_s=3600.0, policy="smart")
    assert doc["totals"]["late"] == 1 and {r["custom_id"]: r["deadline_met"] for r in doc["lines"]}["a"] is False


def test_the_report_says_beside_the_cost_what_calls_that_got_no_answer_may_have_billed(batch):
    """An answered line whose flex call was given up at its timeout (then answered standard) and a failed line
    whose call may have run: each line's ``possibly_billed_usd`` and their total beside ``cost_usd``. Before, an
    answered line's was not said at all, and the report was short of the bill by it (bill84)."""
    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    maybe = {"a": 0.00012, "b": 0.0003}
    res = [r.model_copy(update={"possibly_billed_usd": maybe[r.id]}) if r.id in maybe else r for r in results_for(bf)]
    doc = report(bf, res, CAT, window_s=3600.0, policy="smart")
    rows = {r["custom_id"]: r for r in doc["lines"]}
    assert rows["a"]["status"] == "ok" and rows["b"]["status"] == "failed"
    assert {k: r["possibly_billed_usd"] for k, r in rows.items()} == {"a": 0.00012, "b": 0.0003, "bad": 0.0}
    assert doc["totals"]["possibly_billed_usd"] == pytest.approx(0.00042, abs=1e-12)
    assert doc["totals"]["cost_usd"] == pytest.approx(0.001)  # the answers' cost, as before


def test_the_reports_dollars_are_rounded_to_1e_10_and_its_totals_are_the_sums_of_its_lines(batch):
    """A walkthrough: `smartbatch batch --report` wrote "cost_usd": 0.0011542500000000001, a float sum's noise. Each
    figure is rounded to 1e-10 USD (the endpoint's cost header's decimals) and a total is the sum of its lines."""
    import re

    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    noisy = [r.model_copy(update={"cost_usd": 0.0011542500000000001}) if r.id == "a" else r for r in results_for(bf)]
    doc = report(bf, noisy, CAT, window_s=3600.0, policy="smart")
    text = json.dumps(doc)
    assert '"cost_usd": 0.00115425,' in text
    figures = [float(f) for f in re.findall(r'"(?:cost|list_price|saving)_usd": ([-0-9.e]+)', text)]
    assert len(figures) == 3 * 4 and all(f == round(f, 10) for f in figures), figures  # 3 lines and the totals
    tot, lines = doc["totals"], doc["lines"]
    for key in ("cost_usd", "list_price_usd", "saving_usd"):
        assert tot[key] == round(sum(r[key] for r in lines), 10)
    assert tot["cost_usd"] == pytest.approx(0.0011542500000000001, abs=1e-10)
    assert tot["saving_usd"] == round(tot["list_price_usd"] - tot["cost_usd"], 10)


def test_ctrl_c_during_batch_keeps_finished_lines_and_answers_the_rest(tmp_path, monkeypatch):
    """Ctrl-C while a batch file runs used to write nothing at all: the lines already answered (and paid for)
    were lost, and a rerun paid for them again. Now the finished lines are in the output file, the others in
    the error file saying the run was interrupted, and the command exits 130."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import CtrlCEngine

    p = tmp_path / "in.jsonl"
    p.write_text(line("a") + "\n" + line("b", "Name two seas.") + "\n")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: CtrlCEngine(CAT)))
    out = tmp_path / "o.jsonl"
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 130, r.output
    # Simulated providers at real time (the defaults): said at the start, so a wait of hours is not read as a hang.
    assert "simulated providers at real time" in " ".join(r.output.split())
    (o,) = [json.loads(x) for x in out.read_text().splitlines()]
    assert o["custom_id"] == "a" and o["error"] is None
    r = runner.invoke(app, ["batch", str(p), "--out", str(tmp_path / "f.jsonl"), "--speedup", "100"])
    assert "simulated providers at real time" not in " ".join(r.output.split())
    (e,) = [json.loads(x) for x in (tmp_path / "o.errors.jsonl").read_text().splitlines()]
    assert e["custom_id"] == "b" and "interrupted" in e["error"]["message"]


@pytest.mark.parametrize("engine", ["StopInterruptedEngine", "TerminatedEngine"])
def test_an_interrupt_during_the_stop_or_a_sigterm_still_writes_what_finished(tmp_path, monkeypatch, engine):
    """A Ctrl-C while the engine stopped (after every line was answered), a second Ctrl-C, or a SIGTERM (which
    Ray's driver turns into an exit) left no file at all: every answer paid for and lost (a helper's fault
    hunt). The files are now written before the stop, with the signals held, and SIGTERM is taken as Ctrl-C."""
    import signal

    import engine.app.driver as driver_mod
    from tests.unit import helpers

    p = tmp_path / "in.jsonl"
    p.write_text(line("a") + "\n" + line("b", "Name two seas.") + "\n")
    cls = getattr(helpers, engine)
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: cls(CAT)))
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # without the command's own handler: no harm here
    try:
        out = tmp_path / "o.jsonl"
        r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert r.exit_code == 130, r.output
    answered = [json.loads(x)["custom_id"] for x in out.read_text().splitlines()]
    assert answered == (["a", "b"] if engine == "StopInterruptedEngine" else ["a"])
    if engine == "TerminatedEngine":
        (e,) = [json.loads(x) for x in (tmp_path / "o.errors.jsonl").read_text().splitlines()]
        assert e["custom_id"] == "b" and "interrupted" in e["error"]["message"]


@pytest.mark.parametrize("redis", [False, True], ids=["budgets-in-process", "budgets-in-redis"])
def test_a_resumed_run_counts_the_kept_lines_against_budgets_that_live_in_it(tmp_path, monkeypatch, redis):
    """Budgets without Redis start at 0 in each run: a --resume was granted the whole budget again, and spent
    1.85x a hard limit over the two runs (a helper's hunt). The kept lines are counted at the sync price of the
    usage their answers report; with Redis the earlier run's spend is already there, and nothing is counted twice."""
    import engine.app.driver as driver_mod
    from engine.core.cost import price_usage
    from tests.unit.helpers import CtrlCEngine

    p = tmp_path / "in.jsonl"
    p.write_text(line("a") + "\n" + line("b", "Name two seas.") + "\n")
    out = tmp_path / "o.jsonl"
    usage = {"prompt_tokens": 900, "completion_tokens": 300, "total_tokens": 1200,
             "prompt_tokens_details": {"cached_tokens": 512}}
    out.write_text(json.dumps({"id": "batch_req_1", "custom_id": "a", "error": None, "response": {
        "status_code": 200, "request_id": "req_1", "body": {"object": "chat.completion", "usage": usage}}}) + "\n")
    counted: list = []

    class Counting(CtrlCEngine):
        def count_spent(self, charges):
            counted.extend(charges)

        def submit_many(self, reqs, on_invalid="raise"):
            futs = []
            for r in reqs:
                f = concurrent.futures.Future()
                f.set_result(Result(id=r.id, status="ok", output="sim://y", cost_usd=0.002, mode="sync",
                                    provider=r.provider, model=r.model))
                futs.append(f)
            return futs

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: Counting(CAT)))
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", '[{"max_budget": 0.01}]')
    if redis:
        monkeypatch.setenv("SMARTBATCH_BUDGETS__REDIS_URL", "redis://127.0.0.1:6399/0")
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    if redis:
        assert counted == []
        return
    (charge,) = counted
    a = read_batch_file(p, window_s=86400.0, catalog=CAT).requests[0]
    assert (charge.tenant, charge.model) == (a.tenant, a.model) and str(out) in charge.cid
    assert charge.usd == pytest.approx(price_usage(a, CAT, "sync", input_tokens=900, output_tokens=300,
                                                   cache_read=512).total)
    # An Anthropic answer written in chat shape does not say what it wrote to the cache: the unread input is
    # counted as written (1.25x), never less than it cost.
    from engine.app._batch_kept import kept_charges

    claude = read_batch_file(p, window_s=86400.0, catalog=CAT).lines[0]
    claude = claude.__class__(claude.no, claude.custom_id, claude.url, request=claude.request.model_copy(
        update={"provider": "anthropic", "model": "claude-sonnet-4-5"}))
    (c,) = kept_charges([claude], {claude.no: json.loads(out.read_text().splitlines()[0])}, CAT, out)
    assert c.usd == pytest.approx(price_usage(claude.request, CAT, "sync", input_tokens=900, output_tokens=300,
                                              cache_read=512, cache_write=388).total)
    assert c.usd > price_usage(claude.request, CAT, "sync", input_tokens=900, output_tokens=300,
                               cache_read=512).total


def test_resume_sends_only_the_lines_the_earlier_run_did_not_answer(tmp_path, monkeypatch):
    """A run interrupted after line a was answered (and paid); `--resume` writes a's answer again and sends only
    b. Without it every rerun paid again for what the output already held (a helper's fault hunt)."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import AnsweringEngine, CtrlCEngine

    p = tmp_path / "in.jsonl"
    p.write_text(line("a") + "\n" + line("b", "Name two seas.") + "\n" + line("c", "Name two lakes.") + "\n")
    out = tmp_path / "o.jsonl"
    class FirstOfThree(CtrlCEngine):  # a answered, then Ctrl-C while b and c are waited on
        def submit_many(self, reqs, on_invalid="raise"):
            done, ctrl_c = CtrlCEngine.submit_many(self, reqs)
            return [done, ctrl_c, ctrl_c]
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: FirstOfThree(CAT)))
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 130
    (first,) = [json.loads(x) for x in out.read_text().splitlines()]

    sent: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: AnsweringEngine(CAT, sent)))
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert [sorted(ids) for ids in sent] == [["b", "c"]]  # a was not sent again
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["custom_id"] for x in rows] == ["a", "b", "c"] and rows[0] == first  # a's answer, as written
    assert not (tmp_path / "o.errors.jsonl").read_text().strip()  # nothing left unanswered
    assert "1 line(s) kept from the earlier run" in " ".join(r.output.split())
    # Resumed with another input, OUT (rewritten for this one) dropped the paid answers of the first, with no
    # word (a helper's tour): refused, OUT untouched, nothing sent.
    other = tmp_path / "other.jsonl"
    other.write_text(line("z", "Name two capes.") + "\n")
    before, sent[:] = out.read_text(), []
    r = runner.invoke(app, ["batch", str(other), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and "another input's output" in " ".join(r.output.split()) and "'a'" in r.output
    assert out.read_text() == before and sent == []


def test_a_second_run_writing_the_same_output_is_refused_before_anything_is_sent(batch, tmp_path, monkeypatch):
    """Two runs with one --out: the last writer's lines stayed, the other's answers (paid for) were gone, and
    both said they wrote theirs (a helper's fault hunt). The run holds OUT's lock; a second is refused at once."""
    import fcntl

    import engine.app.driver as driver_mod

    def started(*_a, **_k):
        raise AssertionError("an engine started")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(started))
    out = tmp_path / "o.jsonl"
    out.write_text("earlier answers\n")
    with open(out, "a") as other:  # the first run, holding the lock
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        r = runner.invoke(app, ["batch", str(batch), "--out", str(out)])
    assert r.exit_code == 2 and "another run is writing it" in " ".join(r.output.split()), r.output
    assert out.read_text() == "earlier answers\n"  # untouched
    r = runner.invoke(app, ["batch", str(batch), "--out", str(out)])  # free again: this one goes on
    assert "an engine started" in r.output, r.output


def test_a_custom_id_that_cannot_be_written_back_is_refused_before_anything_is_sent(tmp_path):
    """A lone surrogate ("\\ud800" in JSON) was taken, its line sent, and writing its error line failed the whole
    run after every line was paid (UnicodeEncodeError)."""
    from engine.core.batchfile import read_batch_file

    p = tmp_path / "in.jsonl"
    p.write_text('{"custom_id": "c\\ud800", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'
                 + line("a") + "\n")
    bf = read_batch_file(p, window_s=86400.0, tenant="default", catalog=CAT)
    assert [ln.custom_id for ln in bf.lines] == ["a"]
    ((_, no, field, msg),) = bf.file_problems
    assert (no, field) == (1, "custom_id") and "cannot be written back" in msg


@pytest.mark.parametrize("flags, says", [
    (["--out", "{in}"], "--out {in}: that is the input file"),
    (["--out", "{d}/o.jsonl", "--errors", "{d}/o.jsonl"], "--errors {d}/o.jsonl: --out writes to the same file"),
    (["--out", "{d}/o.jsonl", "--report", "{d}/o.errors.jsonl"], "the error file"),
    (["--out", "{d}"], "--out {d}: is a directory"),
    (["--out", "{d}/in.jsonl/o.jsonl"], "cannot write there"),
])
def test_batch_refuses_outputs_it_cannot_write_before_sending_anything(batch, tmp_path, monkeypatch, flags, says):
    """`--out` the input file overwrote it with the output; `--errors` the output file overwrote the answered
    lines; an unwritable `--out` failed only after every line had been sent (and paid), as an 'unexpected' bug,
    losing the results. Each is now one error line, before an engine starts."""
    import engine.app.driver as driver_mod

    def started(*_a, **_k):
        raise AssertionError("an engine started")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(started))
    before = batch.read_bytes()
    fill = {"in": str(batch), "d": str(tmp_path)}
    r = runner.invoke(app, ["batch", str(batch), *[f.format(**fill) for f in flags]])
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert out.startswith("error: ") and says.format(**fill) in out and "unexpected" not in out, out
    assert batch.read_bytes() == before


def test_batch_table_of_a_cheap_file_shows_figures_that_add_up(capsys):
    """At 4 decimals a file of a few cheap lines read cost $0.0008, list $0.0008, saving $0.0001."""
    from engine.app import cli_batch

    rows = [{"mode": "sync", "status": "ok", "cost_usd": 0.0007848, "list_price_usd": 0.0007848},
            {"mode": "reuse", "status": "reused", "cost_usd": 0.0, "list_price_usd": 0.0000606}]
    doc = {"input": "in.jsonl", "lines": rows,
           "totals": {"lines": 2, "succeeded": 2, "cost_usd": 0.0007848, "list_price_usd": 0.0008454,
                      "saving_usd": 0.0000606}}
    cli_batch._print_batch_report(doc)
    text = " ".join(capsys.readouterr().out.split())
    assert "$0.000785 against $0.000845 at list price" in text, text
    assert "0.000785 │ 0.000845 │ 0.000061" in text, text


def test_batch_takes_streams_as_outputs(batch, tmp_path, monkeypatch):
    """`--errors /dev/null` (twice: with `--report /dev/null`) was refused as "writes to the same file", and
    `--report /dev/stdout` into a pipe as "cannot write there" (its path resolves to /proc/PID/fd/pipe:[N], no
    directory to probe): both are written as streams, as before the check."""
    import os

    import engine.app.driver as driver_mod

    def started(*_a, **_k):
        raise RuntimeError("an engine started")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(started))
    r_fd, w_fd = os.pipe()
    try:
        for extra in (["--errors", "/dev/null", "--report", "/dev/null"], ["--report", f"/proc/self/fd/{w_fd}"]):
            r = runner.invoke(app, ["batch", str(batch), "--out", str(tmp_path / "o.jsonl"), *extra])
            assert "an engine started" in r.output and "cannot write" not in r.output, r.output
    finally:
        os.close(r_fd)
        os.close(w_fd)


def test_a_line_asking_to_stream_is_invalid_naming_body_stream(tmp_path):
    # It was a request, sent to the provider with stream=true: the emulator refused it as request_failed after
    # dispatch (in both lanes); a real provider streams and bills a sync call whose answer the engine cannot read.
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([line("a"), json.dumps(
        {"custom_id": "s", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "gpt-5-mini", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}})]))
    bf = read_batch_file(src, window_s=3600, catalog=CAT)
    (bad,) = bf.invalid
    assert bad.custom_id == "s" and bad.problem[0] == "body.stream" and "leave it out" in bad.problem[1]
    assert [r.id for r in bf.requests] == ["a"]


@pytest.mark.parametrize("body, field, says", [
    ({"messages": [{"role": "user", "content": "Hi"}]}, "model", "model is required"),
    ({"model": 5, "messages": [{"role": "user", "content": "Hi"}]}, "model", "model 5 is not a name"),
    ({"model": "gpt-5-mini"}, "body.messages", "give messages with content"),
    ({"model": "gpt-5-mini", "messages": [{"role": "user", "content": 5}]}, "body.messages[0].content",
     "a message's content is text"),
    # A cap over the model's maximum is named as the line wrote it, not as the engine's max_output_tokens.
    ({"model": "gpt-4o-mini", "max_tokens": 100000, "messages": [{"role": "user", "content": "Hi"}]},
     "body.max_tokens", "maximum output of 16,384"),
])
def test_a_line_without_a_model_or_text_names_the_body_field(tmp_path, body, field, says):
    # Before: a missing (or non-string) model was reported as "field 'provider': is required; add it to the
    # line", a body without text as "field 'input_tokens'": fields a batch line does not have.
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    (bad,) = read_batch_file(src, window_s=3600, catalog=CAT).invalid
    assert bad.problem[0] == field and says in bad.problem[1], bad.problem


@pytest.mark.parametrize("model", [5, ["gpt-5-mini"], {"name": "gpt-5-mini"}])
def test_a_body_with_a_non_string_model_names_model_at_the_endpoint_too(model):
    """The endpoint (and a driver) pass the OpenAI body alone, with no model beside it. Before, a non-string
    body.model read "field 'body.model': body.model 5 differs from model None; give one model"."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(ApiError) as info:
        Validator(CAT, default_settings()).request({"id": "x", "body": body}, _param_in(body))
    assert info.value.param == "model" and "field 'model'" in str(info.value) and "is not a name" in str(info.value)


def test_a_line_whose_url_serves_another_kind_than_its_model_is_invalid_naming_url(tmp_path):
    """A chat model under the images url (or an image model under the chat url) was sent as its model's kind,
    billed, and answered in the url's shape: a poem presented as base64 image data, status 200. Such a line is
    refused, naming ``url`` and the url that fits; its neighbours go on."""
    image = {"custom_id": "img", "method": "POST", "url": "/v1/images/generations",
             "body": {"model": "gpt-image-1", "prompt": "a lighthouse at dawn"}}
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join([
        line("ok"),
        json.dumps({**json.loads(line("poem-as-image")), "url": "/v1/images/generations"}),
        json.dumps({**image, "custom_id": "image-as-chat", "url": "/v1/chat/completions"}),
        json.dumps(image)]) + "\n")
    bf = read_batch_file(src, window_s=3600.0, catalog=CAT)
    assert [r.id for r in bf.requests] == ["ok", "img"] and not bf.file_problems
    bad = {b.custom_id: b.problem for b in bf.invalid}
    assert bad.keys() == {"poem-as-image", "image-as-chat"}
    assert bad["poem-as-image"][0] == "url" and "use /v1/chat/completions" in bad["poem-as-image"][1]
    assert bad["image-as-chat"][0] == "url" and "use /v1/images/generations" in bad["image-as-chat"][1]


def test_a_bad_tenant_flag_is_refused_once_naming_the_flag(batch, tmp_path):
    """``smartbatch batch --tenant ''`` put every line in the error file, each naming a field 'tenant' that no
    line has. The flag is checked before the file is read, and named."""
    r = runner.invoke(app, ["batch", str(batch), "--out", str(tmp_path / "out.jsonl"), "--tenant", ""])
    assert r.exit_code == 2 and "--tenant ''" in r.output and "at least 1 character" in r.output, r.output
    assert not (tmp_path / "out.jsonl").exists()
    # Its twin, the trace builder, the same way.
    r = runner.invoke(app, ["trace", "from-openai-batch", str(batch), "--out", str(tmp_path / "t.jsonl"),
                            "--tenant", "", "--skip-invalid"])
    assert r.exit_code == 2 and "--tenant ''" in r.output and not (tmp_path / "t.jsonl").exists(), r.output


def test_a_sigterm_that_stopped_ray_too_ends_batch_at_once_with_its_files_and_report(tmp_path, monkeypatch):
    """A SIGTERM sent to the whole process group (timeout, systemd) stops Ray's processes with the command's:
    the engine's stop then waited a minute for Ray's GCS, Ray ended the process with exit 1, and no report was
    written (a helper's review). Now the stop is watched: once a process of Ray's own is gone, the files and
    the report are written and the command exits 130 without waiting for Ray."""
    import signal
    import threading

    import engine.app.cli_batch as cli_batch
    import engine.app.driver as driver_mod
    from tests.unit.helpers import TerminatedEngine

    stopping, never = threading.Event(), threading.Event()

    class RayGoesDown(TerminatedEngine):
        def stop(self) -> None:  # a Ray call that waits for a GCS that is gone
            stopping.set()
            never.wait(60.0)

    class RayProcess:
        def poll(self):  # running until the engine stops; then exited, as after a SIGTERM to the group
            return 0 if stopping.is_set() else None

    def exit_now(code):
        raise SystemExit(code)

    p = tmp_path / "in.jsonl"
    p.write_text(line("a") + "\n" + line("b", "Name two seas.") + "\n")
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda c, *a, **k: RayGoesDown(CAT)))
    monkeypatch.setattr(cli_batch, "own_ray_processes", lambda: [RayProcess()])
    monkeypatch.setattr(cli_batch, "exit_now", exit_now)
    monkeypatch.setattr("engine.app._ray_stop.GRACE_S", 0.2)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        out, rep = tmp_path / "o.jsonl", tmp_path / "r.json"
        r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--report", str(rep)])
    finally:
        signal.signal(signal.SIGTERM, previous)
        never.set()
    assert r.exit_code == 130, r.output
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a"]
    doc = json.loads(rep.read_text())
    assert doc["totals"]["lines"] == 2 and doc["totals"]["succeeded"] == 1
    assert "interrupted" in " ".join(r.output.split())


def test_batch_shows_how_many_lines_are_in_and_their_cost_while_it_waits(monkeypatch):
    """A file due in a day rides provider batches for minutes to hours, and nothing was shown meanwhile."""
    import concurrent.futures
    import io

    from rich.console import Console

    from engine.app import cli_batch
    from engine.core.result import Result

    class Later(concurrent.futures.Future):  # still out at the first look, answered at the second
        looks = 0

        def result(self, timeout=None):
            self.looks += 1
            if self.looks == 1:
                raise concurrent.futures.TimeoutError
            return Result(id="b", status="ok", cost_usd=0.001)

        def done(self):
            return self.looks > 1

    first = concurrent.futures.Future()
    first.set_result(Result(id="a", status="ok", cost_usd=0.002))
    shown = io.StringIO()
    monkeypatch.setattr(cli_batch, "err_console", Console(file=shown, force_terminal=True, width=100))
    cli_batch._wait_showing_progress([first, Later()], "batch in.jsonl")
    assert "1/2" in shown.getvalue() and "$0.0020" in shown.getvalue()


def test_a_refused_batch_file_is_called_a_batch_file(tmp_path):
    """`batch` named a refused OpenAI batch file's lines "invalid trace line(s)" (a helper's tour)."""
    src = tmp_path / "in.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}}
    src.write_text("\n".join([json.dumps(line), json.dumps(line), "not json"]) + "\n")
    r = runner.invoke(app, ["batch", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and "2 invalid batch file line(s)" in r.output and "trace" not in r.output, r.output


class _CtrlCOnce(concurrent.futures.Future):
    """A line's answer waited on when Ctrl-C comes: its first ``result()`` raises KeyboardInterrupt."""

    def __init__(self) -> None:
        super().__init__()
        self.interrupted = False

    def result(self, timeout=None):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return super().result(timeout)


def test_ctrl_c_cancels_the_engines_work_and_keeps_what_the_cancelled_batch_finished(tmp_path, monkeypatch):
    """Ctrl-C while b and c ride a provider batch: the run cancels the engine's work (the batch is cancelled at
    the provider) and waits; b, which the batch finished before its cancel, is answered (it was billed), c ends
    ``batch_cancelled`` (never billed, free for --resume). Before, the run left at once: the batch ran on, billed
    b and c, and their answers were lost, then paid again by --resume (a helper's tour)."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import CtrlCEngine

    cancels: list[int] = []

    class Cancelling(CtrlCEngine):
        def submit_many(self, reqs, on_invalid="raise"):
            self.futs = [concurrent.futures.Future(), _CtrlCOnce(), concurrent.futures.Future()]
            self.reqs = reqs
            self.futs[0].set_result(self._ok(reqs[0]))
            return self.futs

        def _ok(self, r):
            return Result(id=r.id, status="ok", output="sim://x", cost_usd=0.001, mode="batch_api",
                          usage={"input_tokens": 4, "output_tokens": 5}, provider=r.provider, model=r.model)

        def cancel(self):
            cancels.append(1)
            self.futs[1].set_result(self._ok(self.reqs[1]))  # finished in the batch before its cancel
            r = self.reqs[2]
            self.futs[2].set_result(Result(id=r.id, status="failed", error="cancelled: the engine was cancelled",
                                           provider=r.provider, model=r.model))
            return 1

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: Cancelling(CAT)))
    src, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    src.write_text("\n".join(line(c, f"Name {c} rivers.") for c in "abc") + "\n")
    r = runner.invoke(app, ["batch", str(src), "--out", str(out)])
    assert r.exit_code == 130 and cancels == [1], r.output
    assert [json.loads(x)["custom_id"] for x in out.read_text().splitlines()] == ["a", "b"]
    (err,) = [json.loads(x) for x in (tmp_path / "o.errors.jsonl").read_text().splitlines()]
    assert err["custom_id"] == "c" and err["error"]["code"] == "batch_cancelled"


def test_ctrl_c_while_the_engine_starts_says_nothing_was_sent(tmp_path, monkeypatch):
    """Ctrl-C in the seconds the engine takes to start printed nothing at all (a helper's check)."""
    import engine.app.driver as driver_mod

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(interrupted))
    src = tmp_path / "in.jsonl"
    src.write_text(line("a") + "\n")
    r = runner.invoke(app, ["batch", str(src), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 130 and "no line was sent, nothing was billed" in " ".join(r.output.split()), r.output


def test_a_kept_image_sent_without_a_quality_is_counted_at_the_quality_its_answer_names_else_the_dearest(tmp_path):
    """OpenAI picks an image's quality when the request names none ("auto"), and its answer says which. Kept lines
    were counted at the catalog's default (medium): two "high" images at a quarter of their bill, and a resumed run
    spent past a hard limit (a hunt: $0.376 against $0.30)."""
    from engine.app._batch_kept import kept_charges

    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"custom_id": "i1", "method": "POST", "url": "/v1/images/generations",
                             "body": {"model": "gpt-image-1", "prompt": "a lighthouse", "size": "1024x1024"}}) + "\n")
    (line,) = read_batch_file(p, window_s=86400.0, catalog=CAT).lines
    req = line.request

    def counted(answer: dict) -> float:
        (c,) = kept_charges([line], {line.no: {"response": {"status_code": 200, "body": answer}}}, CAT, p)
        return c.usd

    def at(quality: str) -> float:
        return price_alone(req.model_copy(update={"params": {**req.params, "quality": quality}}), CAT, "sync").total

    assert counted({"data": [{"b64_json": "x"}], "quality": "high"}) == pytest.approx(at("high"))
    assert counted({"data": [{"b64_json": "x"}], "quality": "low"}) == pytest.approx(at("low"))
    assert counted({"data": [{"b64_json": "x"}]}) == pytest.approx(at("auto")) == pytest.approx(at("high"))
    assert at("high") > price_alone(req, CAT, "sync").total  # the default the count used before


def test_a_kept_line_the_cache_answered_counts_nothing_against_a_resumed_runs_budget(tmp_path):
    """A line answered from the cache cost 0. Its output line reports the usage of the call that made the answer
    (``reused_result``, d051816); ``kept_charges`` prices a kept line from that usage, so a resumed run counted
    the reused line at its whole sync price against the budgets (before d051816 it reported 0 tokens: 0)."""
    from engine.app._batch_kept import kept_charges
    from engine.core.batchfile import write_results
    from engine.runtime.outcomes import reused_result

    p, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    p.write_text(line("a") + "\n")
    bf = read_batch_file(p, window_s=86400.0, catalog=CAT)
    (ln,) = bf.lines
    res = reused_result(ln.request, at=1.0, hit="exact", source_id="earlier", output="Nile, Amazon, Yangtze.",
                        usage={"input_tokens": 900, "output_tokens": 300})
    write_results(bf, [res], out)
    (c,) = kept_charges([ln], {ln.no: json.loads(out.read_text().splitlines()[0])}, CAT, out)
    assert c.usd == pytest.approx(res.cost_usd) == 0.0


def test_a_kept_copy_answered_by_another_lines_call_counts_that_call_once(tmp_path):
    """Two lines of one content: the first called the provider, the second reused its answer, and its output
    line carries the first's body and request id. A resumed run counts that call once, not twice."""
    from engine.app._batch_kept import kept_charges
    from engine.core.batchfile import write_results

    p, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    p.write_text(line("x") + "\n" + line("y") + "\n")
    bf = read_batch_file(p, window_s=86400.0, catalog=CAT)
    x, y = bf.requests
    usage = {"prompt_tokens": 900, "completion_tokens": 300, "total_tokens": 1200}
    called = Result(id="x", status="ok", output="Nile.", usage={"input_tokens": 900, "output_tokens": 300},
                    cost_usd=0.0008, mode="sync", provider=x.provider, model=x.model, provider_request_id="req_9",
                    raw={"id": "chatcmpl-9", "object": "chat.completion", "usage": usage}, real=True)
    reused = Result(id="y", status="reused", output="Nile.", mode="reuse", hit="exact", provider=y.provider,
                    model=y.model)
    write_results(bf, [called, reused], out)
    kept = {ln.no: json.loads(row) for ln, row in zip(bf.lines, out.read_text().splitlines(), strict=True)}
    first, second = kept_charges(bf.lines, kept, CAT, out)
    assert first.usd > 0.0 and second.usd == 0.0


def test_a_lines_list_price_is_at_the_tokens_its_answer_counted_not_its_cap(batch):
    """A line sent sync whose answer stopped short of its cap saves nothing: its list price is its bill. The
    report priced the estimate (``max_completion_tokens`` 50 here), so a live tour's sync Gemini lines of 40 tokens under
    a cap of 100 reported a saving of 59 % (the engine's own report, pricing the answer's tokens, said 0)."""
    from engine.core.cost import price_usage

    bf = read_batch_file(batch, window_s=3600.0, catalog=CAT)
    a, b = bf.requests
    billed = price_usage(a, CAT, "sync", input_tokens=5, output_tokens=6).total
    done = [Result(id="a", status="ok", output="Nile, Amazon, Rhine", usage={"input_tokens": 5, "output_tokens": 6},
                   real=True, cost_usd=billed, mode="sync", provider=a.provider, model=a.model),
            Result(id="b", status="reused", output="x", usage={"input_tokens": 5, "output_tokens": 6}, cost_usd=0.0,
                   mode="reuse", hit="exact", provider=b.provider, model=b.model)]
    rows = {r["custom_id"]: r for r in report(bf, done, CAT, window_s=3600.0, policy="smart")["lines"]}
    assert 0 < billed < price_alone(a, CAT, "sync").total
    assert rows["a"]["list_price_usd"] == pytest.approx(billed, abs=1e-12) and rows["a"]["saving_usd"] == 0
    # A reused copy's list price is the call it follows, at that call's tokens.
    assert rows["b"]["list_price_usd"] == pytest.approx(price_usage(b, CAT, "sync", input_tokens=5,
                                                                    output_tokens=6).total, abs=1e-12)


def test_a_kept_gemini_line_that_thought_is_counted_with_its_thoughts_one_of_n_choices_too(tmp_path):
    """Gemini's layer counts thinking in ``total_tokens`` alone, and Google bills it as output (the engine bills it
    so, ``gemini_output_tokens``). A resumed run counted a kept line at its ``completion_tokens``, below what it
    cost; and a line of n choices lost the thoughts from its ``total_tokens`` too, as the n calls' usage was added
    up (a helper's live tour: 927 where the three calls' said 1,119)."""
    from engine.app._batch_kept import kept_charges
    from engine.core._choices import merged_body
    from engine.core.cost import price_usage

    p = tmp_path / "in.jsonl"
    p.write_text(line("g", model="gemini-2.5-flash") + "\n")
    (ln,) = read_batch_file(p, window_s=86400.0, catalog=CAT).lines
    call = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
            "usage": {"prompt_tokens": 9, "completion_tokens": 300, "total_tokens": 373}}
    (c,) = kept_charges([ln], {ln.no: {"response": {"status_code": 200, "body": call}}}, CAT, p)
    assert c.usd == pytest.approx(price_usage(ln.request, CAT, "sync", input_tokens=9, output_tokens=364).total)
    three = merged_body([call, call, call])
    assert three["usage"]["total_tokens"] == 3 * 373 and three["usage"]["completion_tokens"] == 900


def test_a_kept_flex_answer_is_counted_at_flex_prices_where_its_model_takes_the_tier(tmp_path):
    """An answer kept from an earlier run whose body says ``service_tier: "flex"`` was billed at flex prices
    (batch prices, half of standard at OpenAI): a resumed run counted it at the standard price, twice what it
    cost, against its budgets. A body naming another tier, a model the catalog gives no flex tier, and a line of
    n choices (its merged body names the first call's tier only; another may have been refused and sent
    standard) stay at the standard price, an upper bound."""
    from engine.app._batch_kept import kept_charges
    from engine.core.cost import mode_factor

    p = tmp_path / "in.jsonl"
    p.write_text(line("f") + "\n" + line("o", model="gpt-4o-mini") + "\n")
    flexible, other = read_batch_file(p, window_s=86400.0, catalog=CAT).lines
    assert CAT.provider("openai").supports_flex(flexible.request.model)
    assert not CAT.provider("openai").supports_flex(other.request.model)
    usage = {"prompt_tokens": 900, "completion_tokens": 300, "total_tokens": 1200}

    def counted(ln, tier: str | None, n: int = 1) -> float:
        choices = [{"index": k, "message": {"role": "assistant", "content": "Nile."}} for k in range(n)]
        body = {"object": "chat.completion", "choices": choices, "usage": usage}
        if tier is not None:
            body["service_tier"] = tier
        (c,) = kept_charges([ln], {ln.no: {"response": {"status_code": 200, "body": body}}}, CAT, p)
        return c.usd

    standard = counted(flexible, "default")
    assert standard > 0 and counted(flexible, None) == pytest.approx(standard)
    assert mode_factor(CAT.provider("openai"), "flex") == 0.5
    assert counted(flexible, "flex") == pytest.approx(standard / 2)
    responses = {"object": "response", "service_tier": "flex", "output": [],
                 "usage": {"input_tokens": 900, "output_tokens": 300, "total_tokens": 1200}}
    (c,) = kept_charges([flexible], {flexible.no: {"response": {"status_code": 200, "body": responses}}}, CAT, p)
    assert c.usd == pytest.approx(standard / 2)
    assert counted(other, "default") > 0 and counted(other, "flex") == pytest.approx(counted(other, "default"))
    assert counted(flexible, "flex", n=2) == pytest.approx(counted(flexible, "default", n=2))


def test_the_batch_command_gives_its_engine_room_for_every_line(tmp_path, monkeypatch):
    """A file of more lines than the engine's default ``max_pending`` starts its engine with room for them all. A
    call past the room is let in by parts (stop 78), and a file's lines ride its window, freeing places only as
    batches end: the lines past the first part would wait in vain for room, and the run fail ``Overloaded``."""
    import engine.app.cli_batch as cli_batch
    import engine.app.driver as driver_mod
    from tests.unit.helpers import AnsweringEngine

    monkeypatch.setattr(cli_batch, "MAX_PENDING", 2, raising=False)  # the default, scaled to a file of 3 lines
    p = tmp_path / "in.jsonl"
    p.write_text("".join(line(c, f"Name the {c} river.") + "\n" for c in ("a", "b", "c")))
    got, sent = {}, []

    def started(cls, *a, **k):
        got.update(k)
        return AnsweringEngine(CAT, sent)

    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(started))
    r = runner.invoke(app, ["batch", str(p), "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0, r.output
    assert got.get("max_pending") == 3 and [sorted(ids) for ids in sent] == [["a", "b", "c"]]
