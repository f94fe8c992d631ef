"""`smartbatch batch --resume` and the lines an earlier run failed possibly billed (a batch member that ran and
whose answer could not be read, a call that got no answer): their error line says so (``BILLED_KEY``, its bound),
and a resume keeps them back rather than pay for them twice, unless ``--resend-possibly-billed`` asks for it.
Lines that failed billed nothing (a refusal) are sent again as before."""

from __future__ import annotations

import concurrent.futures
import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.batchfile import BILLED_KEY, read_batch_file
from engine.core.catalog import default_catalog
from engine.core.result import Result
from tests.unit.helpers import CtrlCEngine

CAT = default_catalog()
runner = CliRunner()
BOUND = 0.0125


def _line(cid: str, content: str = "Name three rivers.") -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": "gpt-5-mini", "messages": [{"role": "user", "content": content}],
                                "max_completion_tokens": 50}})


class _Engine(CtrlCEngine):
    """Answers every request, but fails those of ``billed`` possibly billed at ``BOUND`` (what the dispatcher does
    with a batch member whose result line is not JSON) and those of ``refused`` with a 400, billed nothing; records
    the ids of each ``submit_many`` in ``sent`` and the charges counted in ``counted``."""

    def __init__(self, sent: list, counted: list, billed: set[str], refused: set[str]) -> None:
        super().__init__(CAT)
        self.sent, self.counted, self.billed, self.refused = sent, counted, billed, refused

    def count_spent(self, charges) -> None:
        self.counted.extend(charges)

    def submit_many(self, reqs, on_invalid="raise"):
        self.sent.append([r.id for r in reqs])
        futs = []
        for r in reqs:
            if r.id in self.billed:
                res = Result(id=r.id, status="failed", provider=r.provider, model=r.model, real=True,
                             error="openai failed after 1 attempt(s): openai: batch b1 answered this request with a "
                                   "line that could not be read; it ran and may be billed, so it is not sent again",
                             possibly_billed_usd=BOUND)
            elif r.id in self.refused:
                res = Result(id=r.id, status="failed", provider=r.provider, model=r.model, real=True,
                             error="openai failed after 1 attempt(s): openai HTTP 400: bad request")
            else:
                res = Result(id=r.id, status="ok", output="sim://y", cost_usd=0.002, mode="sync",
                             provider=r.provider, model=r.model)
            f = concurrent.futures.Future()
            f.set_result(res)
            futs.append(f)
        return futs


@pytest.fixture
def rig(tmp_path, monkeypatch):
    import engine.app.driver as driver_mod

    sent: list[list[str]] = []
    counted: list = []
    state = {"billed": {"b"}, "refused": {"c"}}
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(
        lambda cls, *a, **k: _Engine(sent, counted, state["billed"], state["refused"])))
    p = tmp_path / "in.jsonl"
    p.write_text("".join(_line(c, f"Name {c} rivers.") + "\n" for c in ("a", "b", "c")))
    return p, tmp_path / "o.jsonl", tmp_path / "o.errors.jsonl", sent, counted, state


def test_a_resume_keeps_back_a_line_that_failed_possibly_billed_and_sends_a_refused_one_again(rig):
    """Before, the error file did not say which line may be billed, and every --resume sent it again: paid twice
    though its own error said "not sent again"."""
    p, out, err, sent, _, state = rig
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = {x["custom_id"]: x for x in map(json.loads, err.read_text().splitlines())}
    assert rows["b"][BILLED_KEY] == pytest.approx(BOUND) and BILLED_KEY not in rows["c"]
    assert rows["b"]["response"] is None and rows["b"]["error"]["code"] == "request_failed"  # OpenAI's shape
    state["billed"], state["refused"] = set(), set()  # a second run would answer both
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert sent == [["c"]], sent  # the refused line goes again; the possibly billed one is kept back
    said = " ".join(r.output.split())
    assert "1 line(s) kept back in the error file" in said and "--resend-possibly-billed" in said, said
    assert [json.loads(x)["custom_id"] for x in err.read_text().splitlines()] == ["b"]
    assert json.loads(err.read_text())[BILLED_KEY] == pytest.approx(BOUND)  # still said for the next resume
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])  # and again: nothing left to send
    assert r.exit_code == 0 and sent == [], (r.output, sent)


def test_resend_possibly_billed_sends_them_again_and_only_with_resume(rig):
    p, out, err, sent, _, state = rig
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    state["billed"], state["refused"] = set(), set()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resend-possibly-billed"])
    assert r.exit_code == 2 and "--resume" in r.output and sent == [], r.output
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])  # nor sent again without --resume, unasked
    assert r.exit_code == 2 and "--resume" in r.output and sent == [], r.output
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--resend-possibly-billed"])
    assert r.exit_code == 0, r.output
    assert sorted(sent[0]) == ["b", "c"], sent
    assert err.read_text() == "" and len(out.read_text().splitlines()) == 3


def test_a_line_kept_back_counts_its_bound_against_budgets_that_live_in_the_run(rig, monkeypatch):
    """An in-process ledger starts at 0: the kept-back line's bound, which the earlier run's budget kept, is
    counted again, as kept answers are."""
    p, out, _, sent, counted, state = rig
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", '[{"max_budget": 1.0}]')
    counted.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    b = read_batch_file(p, window_s=86400.0, catalog=CAT).lines[1].request
    mine = [c for c in counted if c.cid.startswith("resume-billed:")]
    assert [(c.tenant, c.model, c.usd) for c in mine] == [(b.tenant, b.model, pytest.approx(BOUND))], counted


def test_a_line_of_n_choices_one_failed_possibly_billed_is_kept_back_whole_its_answered_choice_counted(
        tmp_path, monkeypatch):
    import engine.app.driver as driver_mod

    sent: list[list[str]] = []
    counted: list = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(
        lambda cls, *a, **k: _Engine(sent, counted, {"x/n1"}, set())))
    p, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    body = {"model": "gpt-5-mini", "n": 2, "max_completion_tokens": 50,
            "messages": [{"role": "user", "content": "Name a river."}]}
    p.write_text(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": body}) + "\n")
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    (row,) = map(json.loads, (tmp_path / "o.errors.jsonl").read_text().splitlines())
    assert row[BILLED_KEY] == pytest.approx(BOUND) and [c["index"] for c in row["smartbatch_choices"]] == [0]
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", '[{"max_budget": 1.0}]')
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent == [], (r.output, sent)  # not even choice 1 alone: it may be billed
    assert json.loads((tmp_path / "o.errors.jsonl").read_text()) == row
