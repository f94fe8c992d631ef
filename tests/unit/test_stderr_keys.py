"""Keys never go to stderr either (``engine.core._stderrkeys``): what a process prints outside logging.

Each was printed whole before (keys82, a scratch script per hook, the key found on stderr once each): an uncaught
exception's traceback (``sys.excepthook``, Ray's own in front of it once Ray is imported), a thread's
(``threading.excepthook``), an exception Python could not raise (``sys.unraisablehook``, "Exception ignored in"),
a warning (``warnings.showwarning``), and a command's ``--debug`` traceback (typer's rich one, each frame's locals
too). The engine's processes install the masked hooks where they start: an actor's, a command's, a driver's.
pytest puts hooks of its own in some of those places; each test puts Python's back first, and monkeypatch puts
pytest's back after.
"""

from __future__ import annotations

import gc
import sys
import threading
import warnings

import pytest

KEY = "sk-ant-api03-" + "K" * 32
SECRETS = (KEY, "O" * 30)  # a provider key's shape, and an opaque token after an Authorization header
WORDS = f"401 from the proxy: Authorization: Bearer {'O' * 30}, x-api-key {KEY}"


@pytest.fixture
def python_hooks(monkeypatch):
    """Python's own hooks in place (pytest's replaced for the test), each put back after it."""
    import ray._private.worker as ray_worker

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    monkeypatch.setattr(warnings, "showwarning", warnings._showwarning_orig)
    monkeypatch.setattr(warnings, "formatwarning", warnings._formatwarning_orig)
    monkeypatch.setattr(warnings, "_showwarnmsg_impl", _python_showwarnmsg_impl)
    monkeypatch.setattr(ray_worker, "normal_excepthook", sys.__excepthook__)  # as a Ray imported first left it


def _python_showwarnmsg_impl(msg) -> None:
    """Python's own (3.11's ``warnings._showwarnmsg_impl``): pytest records each test's warnings in its place."""
    (msg.file or sys.stderr).write(warnings._formatwarnmsg(msg))


def _uncaught() -> None:
    try:
        raise RuntimeError(WORDS)
    except RuntimeError:
        sys.excepthook(*sys.exc_info())


def _uncaught_behind_ray() -> None:
    """A driver's uncaught exception once Ray is imported: Ray's hook records it, then calls the one that stood."""
    from ray._private.worker import custom_excepthook

    try:
        raise RuntimeError(WORDS)
    except RuntimeError:
        custom_excepthook(*sys.exc_info())


def _in_a_thread() -> None:
    def run():
        raise ValueError(WORDS)

    t = threading.Thread(target=run, name="smartbatch-test")
    t.start()
    t.join()


def _unraisable() -> None:
    class Closing:
        def __del__(self):
            raise ValueError(WORDS)

    Closing()  # (dropped at once: its __del__'s exception has nowhere to go)
    gc.collect()


def _warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(WORDS, UserWarning, stacklevel=1)


PRINTS = {"an uncaught exception": (_uncaught, "RuntimeError"),
          "one behind Ray's hook": (_uncaught_behind_ray, "RuntimeError"),
          "a thread's": (_in_a_thread, "Exception in thread smartbatch-test"),
          "an unraisable one": (_unraisable, "Exception ignored in"),
          "a warning": (_warning, "UserWarning")}


def _masked(err: str, said: str) -> None:
    assert said in err, err  # printed, not dropped
    assert not any(s in err for s in SECRETS) and "[redacted]" in err, err


class _Plain:
    def __init__(self, n: int) -> None:
        self.n = n


def _actor(monkeypatch) -> None:
    import actors.remote

    monkeypatch.setattr(actors.remote, "tune_actor", lambda freeze=False: None)  # (pytest's collector, untouched)
    monkeypatch.setattr(actors.remote, "die_with_parent", lambda: None)  # (pytest's process, left to its parent)
    actors.remote._in_actor(_Plain)(1)


def _command(monkeypatch) -> None:
    from typer.testing import CliRunner

    from engine.app.cli import app

    r = CliRunner().invoke(app, ["trace", "synth", "--n", "2", "--seed", "1", "--out", "/dev/null"])
    assert r.exit_code == 0, r.output


def _driver(monkeypatch) -> None:
    """``Engine.__init__``'s first steps (Ray's first call is stubbed to end the constructor there)."""
    import ray

    from engine.app.driver import Engine

    class Stop(Exception):
        pass

    def stop(*_a, **_k):
        raise Stop

    monkeypatch.setattr(ray, "get", stop)
    with pytest.raises(Stop):
        Engine(handles={"hubs": []}, clock=None, settings=None, catalog=None, started_ray=False, micro_batch=1,
               flush_ms=1.0)


STARTS = {"an actor's": _actor, "a command's": _command, "a driver's": _driver}


@pytest.fixture
def records_as_they_were():
    """The record factory an entry point sets, put back (``test_library_log_keys.py`` checks it)."""
    import logging

    before = logging.getLogRecordFactory()
    yield
    logging.setLogRecordFactory(before)


@pytest.mark.parametrize("start", list(STARTS))
@pytest.mark.parametrize("prints", list(PRINTS))
def test_a_process_of_the_engine_prints_no_key_outside_logging(python_hooks, records_as_they_were, monkeypatch,
                                                               capsys, start, prints):
    STARTS[start](monkeypatch)
    capsys.readouterr()
    make, said = PRINTS[prints]
    make()
    _masked(capsys.readouterr().err, said)


def test_a_hook_someone_else_installed_is_theirs(monkeypatch):
    """A driver's process is the user's: a hook of theirs (or pytest's) stays; only Python's own is replaced."""
    from engine.core._stderrkeys import mask_stderr

    def theirs(*_a):
        pass

    for mod, name in ((sys, "excepthook"), (threading, "excepthook"), (sys, "unraisablehook"),
                      (warnings, "formatwarning")):
        monkeypatch.setattr(mod, name, theirs)
    mask_stderr()
    mask_stderr()  # twice, as an actor started again: nothing wrapped
    assert sys.excepthook is theirs and threading.excepthook is theirs and sys.unraisablehook is theirs
    assert warnings.formatwarning is theirs


def test_a_commands_debug_traceback_is_printed_masked(python_hooks, records_as_they_were, monkeypatch):
    """``--debug`` shows the traceback: typer's own printed it (rich, each frame's locals too) past every filter,
    a setting's value whole where its error quotes it (the key given as a seed: twice in a scratch run)."""
    from typer.testing import CliRunner

    from engine.app.cli import app

    monkeypatch.setenv("SMARTBATCH_SIM__SEED", KEY)
    r = CliRunner().invoke(app, ["--debug", "trace", "synth", "--n", "2", "--out", "/dev/null"])
    assert r.exit_code == 1
    assert "Traceback (most recent call last)" in r.output and "ConfigError: setting sim.seed" in r.output, r.output
    assert KEY not in r.output and "[redacted]" in r.output, r.output


def _cancel_failed(monkeypatch) -> None:
    """``smartbatch batch``'s Ctrl-C: the engine's cancel fails (a dispatcher's provider call, through Ray)."""
    from engine.app.cli_batch import _cancel_and_keep

    class Eng:
        def cancel(self):
            raise RuntimeError(WORDS)

    assert _cancel_and_keep(Eng(), [], [], wait=False) == []


def _serve_lost_ray(monkeypatch) -> None:
    """``smartbatch serve``'s watch: Ray does not answer three times running, its error quoted."""
    import actors._peer
    from engine.app.cli_serve import _watch_layout

    def unread(_name):
        raise ConnectionError(WORDS)

    monkeypatch.setattr(actors._peer, "read_layout", unread)
    done = threading.Event()
    _watch_layout("e", done, every_s=0.0)
    assert done.is_set()


def _lag_unplanned(monkeypatch) -> None:
    """``smartbatch run``'s word on late requests whose simulator run failed."""
    from types import SimpleNamespace

    import engine.app.live
    from engine.app.cli import _flag_run_lag

    def fails(*_a, **_k):
        raise ValueError(WORDS)

    monkeypatch.setattr(engine.app.live, "planned", fails)
    _flag_run_lag({}, [], SimpleNamespace(policy="p", params={}), None, None, 0, 10.0)


COMMAND_WORDS = {"batch's failed cancel": (_cancel_failed, "could not cancel the engine's work: RuntimeError"),
                 "serve's lost Ray": (_serve_lost_ray, "its Ray cluster does not answer"),
                 "run's unplanned lag": (_lag_unplanned, "not compared with the simulator's run: ValueError")}


@pytest.mark.parametrize("case", list(COMMAND_WORDS))
def test_a_commands_own_word_on_an_exception_prints_no_key(monkeypatch, capsys, case):
    """A command's console quoted an exception's words itself, past the hooks and the logs' filter: the key
    printed whole on the terminal, a CI's log (rvkeys82); masked now as its ``error:`` line is (``brief``)."""
    make, said = COMMAND_WORDS[case]
    make(monkeypatch)
    err = capsys.readouterr().err
    _masked(err, said)


def test_a_warning_a_catch_warnings_records_stays_recorded(python_hooks, capsys):
    """``catch_warnings(record=True)`` (a user's, pytest's) puts Python's ``showwarning`` back and records in
    ``_showwarnmsg_impl``: the masking installed there took the warnings past the recorder to stderr (the record
    empty, rvkeys82). A record holds the warning itself, the user's own; the mask is on what is printed."""
    from engine.core._stderrkeys import mask_stderr

    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        mask_stderr()
        warnings.warn(WORDS, UserWarning, stacklevel=1)
    assert [str(w.message) for w in got] == [WORDS]
    assert capsys.readouterr().err == ""


def test_the_warnings_mask_outlives_a_catch_warnings_block(python_hooks, capsys):
    """A driver started in ``with warnings.catch_warnings(): ...`` (a start's warnings silenced): the block's end
    put Python's ``showwarning`` back, and every later warning printed its key whole (rvkeys82)."""
    from engine.core._stderrkeys import mask_stderr

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        mask_stderr()
    _warning()
    _masked(capsys.readouterr().err, "UserWarning")
