"""Keys never go to a log, other libraries' lines included (``engine.core._logkeys.mask_library_logs``).

The project's loggers mask what they quote (``test_log_keys.py``); these are the lines of loggers it does not own,
in its processes. Each was printed whole before (stop 81): an actor's, into its Ray worker's ``.err`` file (a
scratch run on a local Ray, every line below found there with its key), a driver's or a command's, on its
terminal. With ``ANTHROPIC_LOG=info`` (or ``debug``) set, as the SDK documents, every actor that imports it sets
httpx's logger to INFO and adds a root handler, and httpx logs each request's URL whole, a base URL's
credentials too (``https://user:sk-...@proxy/v1``, which the settings take).
"""

from __future__ import annotations

import asyncio
import logging

import pytest

KEY = "sk-proj-" + "L" * 40
GEMINI = "AIza" + "H" * 35
USERS = "a line of the user's own, which quotes " + KEY  # a driver's process is the user's: left whole


@pytest.fixture(autouse=True)
def _factory():
    """Each test starts from, and leaves, this process's record factory as it was."""
    before = logging.getLogRecordFactory()
    logging.setLogRecordFactory(logging.LogRecord)
    yield
    logging.setLogRecordFactory(before)


def _sdk_request_line() -> None:
    """The OpenAI SDK's call, as an actor makes it, to a base URL with credentials: httpx2 logs it at INFO."""
    import httpx2
    import openai

    def answer(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, json={"object": "list", "data": []})

    with httpx2.Client(transport=httpx2.MockTransport(answer)) as http:
        client = openai.OpenAI(api_key=KEY, base_url=f"http://proxy:{KEY}@emulator.invalid/v1", http_client=http)
        client.models.list()


def _ray_unhandled_error() -> None:
    """Ray's word on a call whose failure nobody read (``ray.get`` never called on it): the exception's words."""
    from ray._private.worker import _unhandled_error_handler

    _unhandled_error_handler(RuntimeError(f"Error code: 401 - Incorrect API key provided: {KEY}"))


def _asyncio_orphan() -> None:
    """asyncio's "Task exception was never retrieved", with its traceback, of a task whose exception quotes a key."""
    loop = asyncio.new_event_loop()
    try:
        try:
            raise RuntimeError(f"GET https://generativelanguage.googleapis.com/v1beta/files/f?key={GEMINI}: 403")
        except RuntimeError as exc:
            loop.call_exception_handler({"message": "Task exception was never retrieved", "exception": exc})
    finally:
        loop.close()


def _another_librarys_warning() -> None:
    logging.getLogger("somelib.client").warning("retrying with Authorization: Bearer %s", KEY)


LINES = {"httpx's request line": _sdk_request_line, "Ray's unhandled error": _ray_unhandled_error,
         "asyncio's orphan task": _asyncio_orphan, "another library's line": _another_librarys_warning}


class _Plain:
    def __init__(self, n: int) -> None:
        self.n = n


@pytest.mark.parametrize("line", list(LINES))
def test_an_actors_process_masks_every_librarys_line(caplog, monkeypatch, line):
    """An engine actor's process is the engine's alone: from its start, every logger's line is masked."""
    import actors.remote

    monkeypatch.setattr(actors.remote, "tune_actor", lambda freeze=False: None)  # (pytest's collector, untouched)
    monkeypatch.setattr(actors.remote, "die_with_parent", lambda: None)  # (pytest's process, left to its parent)
    assert actors.remote._in_actor(_Plain)(3).n == 3
    with caplog.at_level(logging.INFO):
        LINES[line]()
    assert caplog.records, "the library logged nothing"
    assert KEY not in caplog.text and GEMINI not in caplog.text, caplog.text
    assert ("[redacted]" in caplog.text or "proxy:***@" in caplog.text)  # masked, not dropped
    assert all(r.exc_info is None for r in caplog.records)


def test_an_actor_started_again_masks_once(monkeypatch):
    """Ray runs ``__init__`` again at each restart: the factory is set once, not wrapped again each time."""
    import actors.remote

    monkeypatch.setattr(actors.remote, "tune_actor", lambda freeze=False: None)
    monkeypatch.setattr(actors.remote, "die_with_parent", lambda: None)  # (pytest's process, left to its parent)
    actors.remote._in_actor(_Plain)(1)
    first = logging.getLogRecordFactory()
    actors.remote._in_actor(_Plain)(2)
    assert logging.getLogRecordFactory() is first and first is not logging.LogRecord


def test_a_driver_masks_ray_and_the_sdks_lines_and_leaves_the_users_own(caplog, monkeypatch):
    """A driver's process (``Engine.start``, ``Engine.connect``, the endpoint's replica) is the user's: the lines
    of Ray and the libraries the engine calls are masked from its first step, the user's own loggers' left whole.
    (Ray's first call is stubbed to end the constructor there: what came before it is what is checked.)"""
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
    with caplog.at_level(logging.INFO):
        _ray_unhandled_error()
        _sdk_request_line()
        logging.getLogger("myapp").warning(USERS)
    assert KEY not in caplog.text.replace(USERS, ""), caplog.text
    assert USERS in caplog.text


def test_a_command_masks_every_librarys_line(caplog, tmp_path):
    """A ``smartbatch`` command's process is the engine's: its lines go to a terminal a CI keeps."""
    from typer.testing import CliRunner

    from engine.app.cli import app

    r = CliRunner().invoke(app, ["trace", "synth", "--n", "3", "--seed", "1", "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 0, r.output
    with caplog.at_level(logging.INFO):
        for line in LINES.values():
            line()
    assert KEY not in caplog.text and GEMINI not in caplog.text, caplog.text


def test_ray_s_word_on_a_failed_call_quotes_no_password_of_the_actors_repr():
    """Ray's error for a failed actor call (what the caller gets, logs, or puts in a result) carries the actor's
    ``repr``: the cache's showed its Redis URL whole, password too (``repr=ResultCache(..., RedisLayer('redis://
    :pw@host:6379/0', ...))``, seen in a scratch run on a local Ray), and an HTTP provider's (in the dispatcher's)
    its base URL, credentials too."""
    from actors.cache_layers import RedisLayer
    from actors.providers.openai_http import OpenAIProvider
    from engine.core.catalog import default_catalog
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Secret
    from engine.core.settings import ProviderEndpoint, Settings

    layer = RedisLayer(f"redis://:{KEY}@127.0.0.1:6379/0")
    ep = ProviderEndpoint(api="openai", base_url=f"http://proxy:{KEY}@127.0.0.1:9/v1", api_key_env="UNUSED_KEY")
    provider = OpenAIProvider("openai", default_catalog(), Settings(), ep, Secret(KEY), ManualClock(0.0))
    for shown in (repr(layer), repr(provider)):
        assert KEY not in shown and "***@127.0.0.1" in shown, shown


class _Stop(Exception):
    pass


def _stop(*_a, **_k):
    raise _Stop


def test_a_drivers_start_masks_the_libraries_lines_before_its_first_call(caplog, monkeypatch):
    """``Engine.start`` reads what an engine killed on ``journal.dir`` left before Ray starts (``take_back``: the
    SDKs' calls that read and cancel its batches, httpx's request line of each), then starts Ray and the actors,
    all before its ``Engine`` is built: those lines were printed whole (rvlogs81). Ray's start is stubbed to end
    the start there."""
    import engine.app.driver as driver
    from engine.core.settings import Settings

    def take_back(*_a, **_k):
        _sdk_request_line()

    monkeypatch.setattr(driver, "take_back", take_back)
    monkeypatch.setattr(driver, "init_ray", _stop)
    with caplog.at_level(logging.INFO), pytest.raises(_Stop):
        driver.Engine.start(Settings())
    assert caplog.records, "the SDK logged nothing"
    assert KEY not in caplog.text and "proxy:***@" in caplog.text, caplog.text


@pytest.mark.parametrize("call", ["connect", "stop_named"])
def test_a_drivers_connect_or_named_stop_masks_rays_lines_from_its_first_call(caplog, monkeypatch, call):
    """``Engine.connect`` attaches to Ray and reads the engine's actors before its ``Engine`` is built, and
    ``Engine.stop_named`` builds none: Ray's lines there (an unread failed call's) were printed whole
    (rvlogs81)."""
    import ray  # noqa: F401 - its import gives logger "ray" a handler of its own and stops it propagating

    import engine.app._driver_shared as shared
    from engine.app.driver import Engine

    def attach(*_a, **_k):
        _ray_unhandled_error()
        raise _Stop

    monkeypatch.setattr(shared, "_attach", attach)
    # Its records to the root, where caplog reads them: run alone (or first in its worker), the test read none
    # (mask83: it passed in its module only after the tests before it, in another order under xdist).
    monkeypatch.setattr(logging.getLogger("ray"), "propagate", True)
    with caplog.at_level(logging.INFO), pytest.raises(_Stop):
        getattr(Engine, call)("sb-x")
    assert caplog.records and KEY not in caplog.text, caplog.text


def test_a_masked_line_keeps_its_arguments_for_a_formatter_that_reads_them(capsys):
    """uvicorn's access lines are formatted from their five ``args`` (``AccessFormatter``): a line masked into
    ``msg`` with ``args=()`` was a "--- Logging error ---" traceback on stderr, the request's line lost, for each
    request whose query held ``?key=``, ``?api_key=``, ``?token=`` (rvlogs81). The secret, held in one argument,
    is masked there, the arguments kept."""
    from uvicorn.logging import AccessFormatter

    from engine.core._logkeys import mask_library_logs

    mask_library_logs()
    handler = logging.StreamHandler()  # sys.stderr, as capsys has it now
    handler.setFormatter(AccessFormatter("%(client_addr)s - %(request_line)s %(status_code)s", use_colors=False))
    access = logging.getLogger("uvicorn.access")  # (as an earlier uvicorn in this process may have left it)
    was = access.level, access.disabled
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.disabled = False
    try:
        access.warning('%s - "%s %s HTTP/%s" %d', "127.0.0.1:5000", "GET", f"/v1/models?key={GEMINI}", "1.1", 200)
    finally:
        access.removeHandler(handler)
        access.setLevel(was[0])
        access.disabled = was[1]
    err = capsys.readouterr().err
    assert err == '127.0.0.1:5000 - GET /v1/models?key=[redacted] HTTP/1.1 200 OK\n', err


@pytest.mark.parametrize("msg, args, kept", [
    ("GET %s %d", (f"/v1/models?key={GEMINI}", 200), True),  # the secret within one argument: masked there
    ("%(path)s", ({"path": f"http://u:{KEY}@host/v1"},), True),  # a mapping's
    ("Authorization: Bearer %s", ("plainsecret42",), False),  # the format and the argument make it: masked whole
    ("error: %r", (RuntimeError(KEY),), False),  # an argument shown by its repr
])
def test_a_masked_line_keeps_its_arguments_only_where_they_make_the_same_line(msg, args, kept):
    from engine.core._logkeys import KeyFilter, scrub

    record = logging.LogRecord("somelib", logging.INFO, __file__, 1, msg, args, None)
    clean = scrub(record.getMessage())
    KeyFilter().filter(record)
    assert record.getMessage() == clean and KEY not in clean and GEMINI not in clean
    assert (record.args != ()) is kept and (record.msg == msg) is kept, (record.msg, record.args)
