"""`smartbatch batch --resume` and what an answered line's earlier calls may have billed (``Result.possibly_billed_usd``
of an answer: a flex call given up at its timeout, then answered standard). The first run's ledger counted that
bound beside the answer's cost; a resumed run's in-process ledger starts at 0 and counts the kept lines from the
files, so the bound must be in them (``BILLED_KEY`` on the output line, and on a kept choice of a line of n choices),
and a line sent again by ``--resend-possibly-billed`` keeps the bound of its earlier calls."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.batchfile import BILLED_KEY, CHOICES_KEY, read_batch_file
from engine.core.catalog import default_catalog
from engine.core.result import Result
from tests.unit.helpers import CtrlCEngine

CAT = default_catalog()
runner = CliRunner()
BOUND = 0.0125  # a flex call's bound, as its ledger kept it
BUDGET = '[{"max_budget": 5.0}]'


class _Engine(CtrlCEngine):
    """Answers every request at $0.002; those of ``flexed`` say an earlier call may have billed ``BOUND`` (answered
    all the same), those of ``billed`` fail possibly billed at ``BOUND``, those of ``refused`` fail billed nothing.
    Records the charges counted."""

    def __init__(self, state: dict) -> None:
        super().__init__(CAT)
        self.state = state

    def count_spent(self, charges) -> None:
        self.state["counted"].extend(charges)

    def submit_many(self, reqs, on_invalid="raise"):
        self.state["sent"] = [r.id for r in reqs]
        futs = []
        for r in reqs:
            if r.id in self.state["billed"]:
                res = Result(id=r.id, status="failed", provider=r.provider, model=r.model, real=True,
                             error="openai failed after 1 attempt(s): its call got no answer and may be billed",
                             possibly_billed_usd=BOUND)
            elif r.id in self.state["refused"]:
                res = Result(id=r.id, status="failed", provider=r.provider, model=r.model, real=True,
                             error="openai failed after 1 attempt(s): openai HTTP 400: bad request")
            else:
                res = Result(id=r.id, status="ok", output="sim://y", cost_usd=0.002, mode="sync",
                             provider=r.provider, model=r.model,
                             possibly_billed_usd=BOUND if r.id in self.state["flexed"] else 0.0)
            f = concurrent.futures.Future()
            f.set_result(res)
            futs.append(f)
        return futs


def _line(cid: str, content: str = "Name three rivers.", n: int = 1) -> str:
    body = {"model": "gpt-5-mini", "messages": [{"role": "user", "content": content}], "max_completion_tokens": 50}
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": body | ({"n": n} if n > 1 else {})})


@pytest.fixture
def rig(tmp_path, monkeypatch):
    import engine.app.driver as driver_mod

    state = {"flexed": set(), "billed": set(), "refused": {"c"}, "counted": []}
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: _Engine(state)))
    return tmp_path / "in.jsonl", tmp_path / "o.jsonl", tmp_path / "o.errors.jsonl", state


def _charged(state: dict, p, cid: str) -> list[float]:
    """The charges counted for the requests of line ``cid`` (its choices too), by their ``Request.uid``."""
    line = next(ln for ln in read_batch_file(p, window_s=86400.0, catalog=CAT).lines if ln.custom_id == cid)
    uids = {q.uid for q in line.choices}
    return [c.usd for c in state["counted"] if c.cid.split(":", 2)[-1] in uids]


def _resume(p, out, state, *more: str) -> None:
    state["counted"].clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", *more])
    assert r.exit_code == 0, r.output


def test_a_resumed_run_charges_a_kept_answer_its_cost_and_its_earlier_calls_bound_once_and_again_on_a_second(
        rig, monkeypatch):
    """Before, the output line carried no bound: a resume counted the kept answer's cost alone, $0.0125 less than
    the first run's ledger held for it (its flex call, given up and maybe billed)."""
    p, out, _, state = rig
    # "a" and "d" alike, but "a"'s flex call timed out; "c" is refused in every run, so each resume starts an engine.
    p.write_text("".join(_line(c) + "\n" for c in ("a", "d")) + _line("c", "Other.") + "\n")
    state["flexed"] = {"a"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    for _ in range(2):  # the resumed run's output, resumed again, still says it
        _resume(p, out, state)
        (a,), (d,) = _charged(state, p, "a"), _charged(state, p, "d")  # once each
        assert d > 0 and a == pytest.approx(d + BOUND), state["counted"]
    rows = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert rows["a"][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["d"]
    assert rows["a"]["error"] is None and rows["a"]["response"]["status_code"] == 200  # OpenAI's shape beside it


def test_a_line_sent_again_by_resend_possibly_billed_keeps_its_earlier_bound_on_the_budgets_and_in_its_line(
        rig, monkeypatch):
    """Before, ``--resend-possibly-billed`` counted nothing of the earlier call that may be billed, and the answer
    it got said its own cost alone, so no later resume counted that call either."""
    p, out, err, state = rig
    p.write_text("".join(_line(c) + "\n" for c in ("a", "b")) + _line("c", "Other.") + "\n")
    state["billed"] = {"b"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    assert json.loads(err.read_text().splitlines()[0])[BILLED_KEY] == pytest.approx(BOUND)
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["billed"] = set()
    _resume(p, out, state, "--resend-possibly-billed")
    assert _charged(state, p, "b") == [pytest.approx(BOUND)], state["counted"]  # its answer: the engine's own
    rows = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert rows["b"][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["a"]
    _resume(p, out, state)
    (a,), (b,) = _charged(state, p, "a"), _charged(state, p, "b")
    assert b == pytest.approx(a + BOUND), state["counted"]


def test_a_kept_choice_whose_flex_call_timed_out_is_charged_its_bound_and_so_is_the_line_it_completes(
        rig, monkeypatch):
    """Lines of n choices: "x"'s choice 0 and "y"'s alike, but x's flex call timed out; each line's choice 1 is
    refused at first. Before, a failed line's error row kept only its failed choices' bounds."""
    p, out, err, state = rig
    p.write_text(_line("x", n=2) + "\n" + _line("y", n=2) + "\n" + _line("c", "Other.") + "\n")
    state["flexed"], state["refused"] = {"x"}, {"x/n1", "y/n1", "c"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["refused"] = {"c"}
    rows = {x["custom_id"]: x for x in map(json.loads, err.read_text().splitlines())}
    _resume(p, out, state)  # sends x/n1 and y/n1; counts the kept choices 0
    (x,), (y,) = _charged(state, p, "x"), _charged(state, p, "y")
    assert y > 0 and x == pytest.approx(y + BOUND), state["counted"]
    assert rows["x"][CHOICES_KEY][0][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["x"]
    rows = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert rows["x"][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["y"]
    _resume(p, out, state)  # the whole lines, kept
    (x,), (y,) = _charged(state, p, "x"), _charged(state, p, "y")
    assert y > 0 and x == pytest.approx(y + BOUND), state["counted"]


def test_a_line_sent_again_that_fails_billed_nothing_keeps_its_earlier_bound_and_is_kept_back_after(
        rig, monkeypatch):
    """Sent again and refused, its earlier call may still be on the bill: its error line keeps that bound, so a
    plain resume keeps it back and counts it. Before, the refusal's line had no bound and the next resume sent it
    again, counting nothing of the first call."""
    p, out, err, state = rig
    p.write_text(_line("b") + "\n" + _line("c", "Other.") + "\n")
    state["billed"] = {"b"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["billed"], state["refused"] = set(), {"b", "c"}
    _resume(p, out, state, "--resend-possibly-billed")
    rows = {x["custom_id"]: x for x in map(json.loads, err.read_text().splitlines())}
    assert rows["b"][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["c"]
    _resume(p, out, state)
    assert _charged(state, p, "b") == [pytest.approx(BOUND)], state["counted"]  # kept back, at its bound, once


def _strict(text: str) -> list[dict]:
    """The lines of a file read as strict JSON (NaN and Infinity are Python's, no reader's of OpenAI's files)."""
    def refuse(c: str):
        raise ValueError(f"not JSON: {c}")
    return [json.loads(x, parse_constant=refuse) for x in text.splitlines()]


def _edit(path, cid: str, value, choice: int | None = None) -> None:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    for r in rows:
        if r["custom_id"] == cid:
            (r if choice is None else r[CHOICES_KEY][choice])[BILLED_KEY] = value
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("value", ["0.0125", -1, float("nan"), float("inf"), 10 ** 400, True, [BOUND], "[/red]"],
                         ids=["string", "negative", "nan", "infinity", "no-float", "bool", "list", "markup"])
def test_a_kept_answers_bound_that_is_no_number_is_said_naming_the_line_and_counted_never_less(rig, monkeypatch,
                                                                                                value):
    """An output line whose key was edited by hand (or is hostile): before (a review of resume85) it was read as 0
    with no word, the line counted its answer alone ($0.0125 less for the string "0.0125"), and NaN or Infinity
    written back, no JSON a strict reader takes. Now it is said, naming the file, the line and the field, counted
    at its calls' reserve bound (a string spelling more, that), written so; its neighbour counted as before."""
    p, out, _, state = rig
    p.write_text("".join(_line(c) + "\n" for c in ("a", "d")) + _line("c", "Other.") + "\n")
    state["flexed"] = {"a"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    _edit(out, "a", value)
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["counted"].clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert f"custom_id 'a': field '{BILLED_KEY}' is" in said and "custom_id 'd'" not in said, r.output
    (a,), (d,) = _charged(state, p, "a"), _charged(state, p, "d")
    floor = BOUND if value == "0.0125" else _reserve(p, "a")
    assert a >= d + floor - 1e-12 and d > 0, state["counted"]
    rows = {x["custom_id"]: x for x in _strict(out.read_text())}
    assert rows["a"][BILLED_KEY] == pytest.approx(a - d) and BILLED_KEY not in rows["d"]


def test_an_error_lines_bound_that_is_no_number_keeps_the_line_back_and_counts_it(rig, monkeypatch):
    """An error line's key spelled as a string: before (a review of resume85) it read as no bound, and the resume
    was refused whole, every neighbour with it, the record beside OUT taking the file for "replaced, or its last
    write failed" (without that record, the line was sent again, its first call maybe paid twice)."""
    p, out, err, state = rig
    p.write_text(_line("b") + "\n" + _line("c", "Other.") + "\n")
    state["billed"] = {"b"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    _edit(err, "b", "0.0125")
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["billed"] = set()
    _resume(p, out, state)
    assert state["sent"] == ["c"]  # "b" kept back
    assert _charged(state, p, "b") == [pytest.approx(BOUND)], state["counted"]
    assert {x["custom_id"]: x for x in _strict(err.read_text())}["b"][BILLED_KEY] == pytest.approx(BOUND)


def test_a_kept_choices_bound_that_is_no_number_is_counted_at_its_calls_reserve_bound(rig, monkeypatch):
    """A kept choice's key edited to -5: before (a review of resume85) it read as 0, the choice counted its answer
    alone. "x" and "y" alike, both choices 0 given up at flex once; only x's key edited."""
    p, out, err, state = rig
    p.write_text(_line("x", n=2) + "\n" + _line("y", n=2) + "\n" + _line("c", "Other.") + "\n")
    state["flexed"], state["refused"] = {"x", "y"}, {"x/n1", "y/n1", "c"}
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    _edit(err, "x", -5, choice=0)
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", BUDGET)
    state["refused"] = {"c"}
    state["counted"].clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and f"'x', {CHOICES_KEY} index 0: field '{BILLED_KEY}' is -5" in said, r.output
    assert "'y'" not in said and state["sent"] == ["x/n1", "y/n1", "c"]
    (x,), (y,) = _charged(state, p, "x"), _charged(state, p, "y")
    assert x == pytest.approx(y - BOUND + _reserve(p, "x", 1)), state["counted"]
    rows = {x["custom_id"]: x for x in _strict(out.read_text())}
    assert rows["x"][BILLED_KEY] == pytest.approx(_reserve(p, "x", 1)) and rows["y"][BILLED_KEY] == BOUND


def _reserve(p, cid: str, n: int | None = None) -> float:
    """The reserve bound of line ``cid``'s calls (its first ``n`` choices'): what a bound that is no number counts."""
    from engine.core.cost import reserve_bound

    line = next(ln for ln in read_batch_file(p, window_s=86400.0, catalog=CAT).lines if ln.custom_id == cid)
    return sum(reserve_bound(q, CAT, "sync") for q in line.choices[:n])
