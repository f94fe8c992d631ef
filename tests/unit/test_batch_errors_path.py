"""`smartbatch batch --errors PATH`, then a later run on the same OUT: the error file's lines that failed possibly
billed are found where the first run wrote them (recorded beside OUT), or the run is refused naming the fix; they
are never sent again unasked (``engine.app._batch_record``)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from engine.app._batch_record import record_path
from engine.app.cli import app
from engine.core.batchfile import BILLED_KEY
from tests.unit.test_batch_billed_resume import _Engine, _line

runner = CliRunner()


@pytest.fixture
def rig(tmp_path, monkeypatch):
    import engine.app.driver as driver_mod

    sent: list[list[str]] = []
    state = {"billed": {"b"}, "refused": {"c"}}
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(
        lambda cls, *a, **k: _Engine(sent, [], state["billed"], state["refused"])))
    p = tmp_path / "in.jsonl"
    p.write_text("".join(_line(c, f"Name {c} rivers.") + "\n" for c in ("a", "b", "c")))
    return p, tmp_path / "o.jsonl", tmp_path / "logs" / "failed.jsonl", sent, state


def _ids(path) -> list[str]:
    return [json.loads(x)["custom_id"] for x in path.read_text().splitlines()]


def _said(r) -> str:
    return " ".join(r.output.split())


def _first_run(p, out, err, sent, state, *flags) -> None:
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), *flags])
    assert r.exit_code == 0, r.output
    assert _ids(err) == ["b", "c"] and json.loads(err.read_text().splitlines()[0])[BILLED_KEY] > 0
    state["billed"], state["refused"] = set(), set()  # a second run would answer both
    sent.clear()


def test_a_resume_without_the_first_runs_errors_flag_keeps_back_its_possibly_billed_line(rig):
    """Before, the resume read OUT's default error file (none there) and sent b again: paid twice."""
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0, r.output
    assert sent == [["c"]], sent
    assert "1 line(s) kept back in the error file" in _said(r) and str(err) in _said(r), _said(r)
    assert _ids(err) == ["b"] and not out.with_name("o.errors.jsonl").exists()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])  # a second resume: the same file
    assert r.exit_code == 0 and sent == [], (r.output, sent)
    assert _ids(err) == ["b"] and sorted(_ids(out)) == ["a", "c"]


@pytest.mark.parametrize("first", ["custom", "default"])
def test_a_run_given_another_errors_while_the_earlier_one_holds_a_possibly_billed_line_is_refused(rig, first):
    """Before, the resume read the file given, empty, and sent b again (either way round)."""
    p, out, err, sent, state = rig
    earlier = err if first == "custom" else out.with_name("o.errors.jsonl")
    _first_run(p, out, earlier, sent, state, *(["--errors", str(err)] if first == "custom" else []))
    other = out.with_name("other.errors.jsonl")
    for flags in (["--resume"], []):
        r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(other), *flags])
        assert r.exit_code == 2 and sent == [], (r.output, sent)
        assert f"--errors {earlier}" in _said(r) and "'b'" in _said(r), _said(r)
    assert not other.exists() and _ids(earlier) == ["b", "c"]
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(earlier), "--resume"])
    assert r.exit_code == 0 and sent == [["c"]], (r.output, sent)


def test_an_error_file_moved_is_read_where_given_and_one_gone_is_refused_naming_the_fixes(rig):
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    moved = out.with_name("moved.jsonl")
    err.rename(moved)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    said = _said(r)
    assert r.exit_code == 2 and sent == [], (said, sent)  # before: b sent again
    assert f"{err} is gone" in said and "Give --errors where that file is now" in said, said
    assert "--resend-possibly-billed" in said and str(record_path(out)) in said, said
    other = out.with_name("other.jsonl")
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--errors", str(other)])
    assert r.exit_code == 2 and sent == [], (r.output, sent)
    assert f"--errors {other} does not exist, and {err} is gone" in _said(r), _said(r)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--errors", str(moved)])
    assert r.exit_code == 0 and sent == [["c"]], (r.output, sent)
    assert _ids(moved) == ["b"] and not err.exists()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])  # now recorded where it was moved
    assert r.exit_code == 0 and sent == [], (r.output, sent)
    moved.unlink()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out)])  # nor sent again by a plain run
    assert r.exit_code == 2 and sent == [] and f"{moved} is gone" in _said(r), _said(r)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--resend-possibly-billed"])
    assert r.exit_code == 0 and sent == [["b"]], (r.output, sent)  # asked for: sent again
    assert moved.read_text() == "" and sorted(_ids(out)) == ["a", "b", "c"]


def test_default_paths_leave_no_record_unless_their_error_file_holds_a_line_that_may_be_billed(rig):
    p, out, _, sent, state = rig
    err = out.with_name("o.errors.jsonl")
    state["billed"] = set()
    assert runner.invoke(app, ["batch", str(p), "--out", str(out)]).exit_code == 0
    assert _ids(err) == ["c"] and not record_path(out).exists()  # as before this record
    state["billed"], state["refused"] = {"c"}, set()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent[-1] == ["c"], (r.output, sent)
    rec = json.loads(record_path(out).read_text())
    assert (rec["errors"], rec["possibly_billed"]) == (str(err.absolute()), ["c"])
    state["billed"] = set()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--resend-possibly-billed"])
    assert r.exit_code == 0 and sent[-1] == ["c"] and err.read_text() == "", (r.output, sent)
    assert not record_path(out).exists()  # nothing left to say


def test_choices_answered_in_a_custom_error_file_are_kept_by_a_resume_not_given_it(tmp_path, monkeypatch):
    """A line of 3 choices, its third failed: its two answered (paid) are in the error file given by --errors. Before,
    a --resume without it sent all three again; deleted, it is refused, --resend-possibly-billed no way out."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import AnsweringEngine
    from tests.unit.test_batch_choices import CAT, FailsOneChoice, line

    p, out, err = tmp_path / "in.jsonl", tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    p.write_text(line("a", n=3) + "\n" + line("b", "Name a sea.") + "\n")
    sent: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: FailsOneChoice(CAT, sent)))
    assert runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(err)]).exit_code == 0
    saved = err.read_text()
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: AnsweringEngine(CAT, sent)))
    err.unlink()
    sent.clear()
    for flags in (["--resume"], ["--resume", "--resend-possibly-billed"]):
        r = runner.invoke(app, ["batch", str(p), "--out", str(out), *flags])
        assert r.exit_code == 2 and sent == [], (r.output, sent)
        assert "1 line(s) with choices answered" in _said(r) and "--overwrite" in _said(r), _said(r)
    err.write_text(saved)  # put back
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent == [["a/n2"]], (r.output, sent)
    assert err.read_text() == "" and sorted(_ids(out)) == ["a", "b"]
    rec = json.loads(record_path(out).read_text())  # (a custom error file stays recorded, with nothing in it)
    assert (rec["errors"], rec["possibly_billed"], rec["choices"]) == (str(err), [], [])


def test_a_record_that_cannot_be_read_is_refused_naming_it(rig):
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    record_path(out).write_text('{"errors": 3}')
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and sent == [], (r.output, sent)
    assert str(record_path(out)) in _said(r) and "give --errors where" in _said(r), _said(r)


def test_a_run_that_ends_while_another_waits_for_outs_lock_has_its_record_read_under_the_lock(rig, monkeypatch):
    """Run A (``--errors E``, b failed possibly billed) ends between run B's start and B taking OUT's lock. Before
    (a review), B read the record before the lock, found none, read OUT's default error file and sent b again."""
    import contextlib

    import engine.app.cli_batch as cli_batch

    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    left = {f: f.read_bytes() for f in (out, err, record_path(out))}  # what run A leaves
    for f in left:
        f.unlink()
    real = cli_batch._output_lock

    @contextlib.contextmanager
    def a_ends_first(o):
        for f, data in left.items():
            f.write_bytes(data)
        with real(o):
            yield

    monkeypatch.setattr(cli_batch, "_output_lock", a_ends_first)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent == [["c"]], (r.output, sent)
    assert _ids(err) == ["b"] and not out.with_name("o.errors.jsonl").exists()


@pytest.fixture
def read_only_dir(monkeypatch):
    """A directory that takes no new file (its files writable): ``os.access`` says so and a temporary file cannot
    be made there, as for a user not root (the tests run as root, who may write anywhere)."""
    import os

    import engine.core.files as files

    ro: list = []
    access, mkstemp = os.access, files.tempfile.mkstemp

    def no_access(path, mode, *a, **k):
        return False if mode & os.W_OK and any(os.path.samefile(path, d) for d in ro if os.path.exists(path)) \
            else access(path, mode, *a, **k)

    def no_mkstemp(*a, dir=None, **k):
        if dir is not None and any(os.path.samefile(dir, d) for d in ro):
            raise PermissionError(13, "Permission denied")
        return mkstemp(*a, dir=dir, **k)

    monkeypatch.setattr(os, "access", no_access)
    monkeypatch.setattr(files.tempfile, "mkstemp", no_mkstemp)
    return ro


@pytest.mark.parametrize("given", [None, "unrecorded", "recorded"])
def test_a_resume_in_a_directory_that_takes_no_new_file_writes_its_answers(rig, read_only_dir, given):
    """OUT and its error file writable in a directory that takes no new file (written in place there; the journal
    goes unmade). Before (a review), the record could not be made beside OUT, and the run, b answered and c failed
    possibly billed, wrote nothing: b's answer lost (paid again by the next resume) and c's mark with it."""
    p, out, _, sent, state = rig
    err = out.with_name("o.errors.jsonl") if not given else out.parent / "logs" / "e.jsonl"
    err.parent.mkdir(exist_ok=True)
    state["billed"], state["refused"] = set(), {"b", "c"}
    flags = ["--errors", str(err)] if given else []
    assert runner.invoke(app, ["batch", str(p), "--out", str(out), *flags]).exit_code == 0
    if given == "unrecorded":
        record_path(out).unlink()  # (made by an older version: none there)
    read_only_dir.append(out.parent)
    state["billed"], state["refused"] = {"c"}, set()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), *flags, "--resume"])
    assert r.exit_code == 0 and sent == [["b", "c"]], (r.output, sent)
    assert sorted(_ids(out)) == ["a", "b"] and _ids(err) == ["c"] and BILLED_KEY in err.read_text()
    if given == "unrecorded":  # said: a later run must be given it again
        assert f"give --errors {err} again" in _said(r), _said(r)
    if given == "recorded":  # written in place, and read by a run not given --errors
        assert json.loads(record_path(out).read_text())["possibly_billed"] == ["c"]
        flags = []
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), *flags, "--resume"])
    assert r.exit_code == 0 and sent == [], (r.output, sent)  # c kept back


def test_a_refusal_says_of_each_error_file_whether_it_is_there(rig):
    """The recorded file there but emptied, another --errors not there. Before (a review), the refusal said "--errors
    X does not exist, and neither does <the recorded file>", which was there; of a stream, that it was replaced."""
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    err.write_text("")
    other = out.with_name("other.jsonl")
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--errors", str(other)])
    assert r.exit_code == 2 and sent == [], (r.output, sent)
    assert f"--errors {other} does not exist, and {err} does not hold them" in _said(r), _said(r)
    state["billed"] = {"b"}
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--overwrite", "--errors", "/dev/null"])
    assert r.exit_code == 0 and sent == [["a", "b", "c"]], (r.output, sent)
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and sent == [], (r.output, sent)
    assert "/dev/null does not hold them (a stream: nothing kept)" in _said(r), _said(r)


def test_choices_answered_and_lost_are_refused_naming_a_way_that_keeps_the_lines_out_answers(tmp_path, monkeypatch):
    """A line of 3 choices whose two answered went with its error file (deleted, or a crash after the record was
    written). Before (a review), the refusal named only --overwrite: every line sent again, b (answered in OUT)
    paid twice. Deleting the record and resuming sends a alone."""
    import engine.app.driver as driver_mod
    from tests.unit.helpers import AnsweringEngine
    from tests.unit.test_batch_choices import CAT, FailsOneChoice, line

    p, out, err = tmp_path / "in.jsonl", tmp_path / "o.jsonl", tmp_path / "e.jsonl"
    p.write_text(line("a", n=3) + "\n" + line("b", "Name a sea.") + "\n")
    sent: list[list[str]] = []
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: FailsOneChoice(CAT, sent)))
    assert runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(err)]).exit_code == 0
    monkeypatch.setattr(driver_mod.Engine, "start", classmethod(lambda cls, *a, **k: AnsweringEngine(CAT, sent)))
    err.unlink()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and sent == [], (r.output, sent)
    assert f"delete {record_path(out)} and --resume" in _said(r), _said(r)
    record_path(out).unlink()  # as named
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent == [["a", "a/n1", "a/n2"]], (r.output, sent)
    assert sorted(_ids(out)) == ["a", "b"]


def test_a_resume_whose_record_names_none_of_its_lines_reads_out_once(rig, monkeypatch):
    """A custom error file stays recorded with nothing in it. Before (a review), every run on OUT read OUT whole
    once more to check the record's lines, none: a big OUT parsed twice before anything was sent."""
    import engine.core.batchfile as batchfile

    p, out, err, sent, state = rig
    state["billed"] = set()
    assert runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(err)]).exit_code == 0
    assert json.loads(record_path(out).read_text())["possibly_billed"] == []
    reads, real = [], batchfile.answered_lines
    monkeypatch.setattr(batchfile, "answered_lines", lambda path: reads.append(path) or real(path))
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 0 and sent == [["c"]], (r.output, sent)
    assert reads == [out], reads


def test_an_out_whose_record_name_would_be_too_long_is_written_and_says_to_give_errors_again(rig):
    """OUT's name 249 bytes, its record's 265 (over the usual 255). Before (a review), the run stopped as a bug
    (ENAMETOOLONG) where it had run before the record; made after the run, the record's error lost its answers."""
    p, out, err, sent, state = rig
    out = out.with_name("o" * 243 + ".jsonl")
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(err)])
    assert r.exit_code == 0 and sent == [["a", "b", "c"]], (r.output, sent)
    assert _ids(out) == ["a"] and _ids(err) == ["b", "c"]
    assert f"give --errors {err} again" in _said(r) and "too long" in _said(r), _said(r)
    state["billed"], state["refused"] = set(), set()
    sent.clear()
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--errors", str(err), "--resume"])
    assert r.exit_code == 0 and sent == [["c"]], (r.output, sent)


def test_another_errors_with_resend_possibly_billed_sends_the_lines_asked_for(rig):
    """--resume --resend-possibly-billed asks for b to be sent again. Before (a review), given another --errors
    while the recorded file still held b, the run was refused (it was not when that file had moved)."""
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    other = out.with_name("other.jsonl")
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume", "--resend-possibly-billed", "--errors",
                            str(other)])
    assert r.exit_code == 0 and sent == [["b", "c"]], (r.output, sent)
    assert other.read_text() == "" and sorted(_ids(out)) == ["a", "b", "c"]


@pytest.mark.parametrize("flag", ["--report", "--errors"])
@pytest.mark.parametrize("own", ["record", "journal"])
def test_a_report_or_error_file_on_one_of_outs_own_files_is_refused_before_any_line_is_sent(rig, flag, own):
    """Before, --report OUT.smartbatch.json wrote the report over the record (where the error file is, which lines
    may be billed), and the next run on OUT was refused as unreadable; --errors there wrote the error lines over
    it. OUT's journal (OUT.journal) is the directory a run keeps its batches under way in."""
    from engine.app._batch_rescue import journal_dir

    p, out, err, sent, state = rig
    path = record_path(out) if own == "record" else journal_dir(out)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), flag, str(path)])
    said = _said(r)
    assert r.exit_code == 2 and sent == [] and not path.exists(), (said, sent)
    assert said.startswith(f"error: {flag} {path}: that is the {own} ") and f"beside --out {out}" in said, said
    assert f"give {flag} another path" in said, said


def test_a_record_that_cannot_be_read_gives_way_to_overwrite_which_replaces_it(rig):
    """Before, --overwrite (send every line again, keep nothing) was refused too, by a record it does not need, and
    neither the refusal nor --overwrite's help said so."""
    p, out, err, sent, state = rig
    _first_run(p, out, err, sent, state, "--errors", str(err))
    record_path(out).write_text('{"errors": 3}')
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--resume"])
    assert r.exit_code == 2 and sent == [] and "or --overwrite to send every line again" in _said(r), _said(r)
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), "--overwrite", "--errors", str(err)])
    assert r.exit_code == 0 and sorted(sum(sent, [])) == ["a", "b", "c"], (r.output, sent)
    assert json.loads(record_path(out).read_text())["errors"] == str(err)  # written anew: readable again
    helps = " ".join(runner.invoke(app, ["batch", "--help"]).output.split())
    assert "even one that cannot be read" in helps, helps


@pytest.mark.parametrize("flag", ["--report", "--errors"])
def test_a_report_or_error_file_inside_outs_journal_is_refused_before_any_line_is_sent(rig, flag):
    """OUT's journal (OUT.journal) is a directory that a run ending cleanly removes whole (``finish``): an error
    file written in it (lines that may be billed) went with it at the end of the very run that wrote it, and a
    report there at the end of the next run. Only the journal itself was refused."""
    from engine.app._batch_rescue import journal_dir

    p, out, err, sent, state = rig
    path = journal_dir(out) / "logs" / "failed.jsonl"
    r = runner.invoke(app, ["batch", str(p), "--out", str(out), flag, str(path)])
    said = _said(r)
    assert r.exit_code == 2 and sent == [] and not journal_dir(out).exists(), (said, sent)
    assert said.startswith(f"error: {flag} {path}: that is inside the journal ") and "removes" in said, said
    assert f"give {flag} another path" in said, said


@pytest.mark.parametrize("first", ["file", "link"])
def test_a_resume_given_a_link_to_out_or_the_file_a_link_named_keeps_back_the_possibly_billed_line(rig, first):
    """OUT is written through a link (latest.jsonl -> o.jsonl), but its record and journal were named after the
    spelling given: a resume given the other spelling found no record, read that spelling's default error file
    (none) and sent b again, paid twice; a journal of batches under way was missed the same way."""
    import os

    from engine.app._batch_rescue import journal_dir

    p, out, err, sent, state = rig
    link = out.with_name("latest.jsonl")
    os.symlink(out.name, link)
    one, two = (out, link) if first == "file" else (link, out)
    _first_run(p, one, err, sent, state, "--errors", str(err))
    r = runner.invoke(app, ["batch", str(p), "--out", str(two), "--resume"])
    assert r.exit_code == 0 and sent == [["c"]], (_said(r), sent)
    assert link.is_symlink() and sorted(_ids(out)) == ["a", "c"] and _ids(err) == ["b"]
    assert record_path(link) == record_path(out) and journal_dir(link) == journal_dir(out)


def test_a_record_left_beside_a_link_to_out_by_an_earlier_run_is_refused_naming_where_it_goes(rig):
    """A run before records went beside the file a link names left its record beside the link: read no more there,
    its possibly billed line would be sent again; the run is refused, naming where to move it."""
    import os

    p, out, err, sent, state = rig
    link = out.with_name("latest.jsonl")
    out.write_text("")
    os.symlink(out.name, link)
    left = link.with_name("latest.jsonl.smartbatch.json")
    left.write_text(json.dumps({"version": 1, "errors": str(err), "possibly_billed": ["b"], "choices": []}))
    r = runner.invoke(app, ["batch", str(p), "--out", str(link), "--resume"])
    assert r.exit_code == 2 and sent == [], (_said(r), sent)
    assert f"{left} was left beside the link by an earlier run: move it to {record_path(out)}" in _said(r), _said(r)
    left.unlink()  # and a report there would be taken for one: its name is kept free
    r = runner.invoke(app, ["batch", str(p), "--out", str(link), "--report", str(left)])
    assert r.exit_code == 2 and sent == [] and not left.exists(), (_said(r), sent)
    assert f"--report {left}: that is the record the run keeps beside --out {link}" in _said(r), _said(r)
