"""Keys never go to a log (``engine.core._logkeys``): every ``smartbatch.*`` logger masks what a line quotes of
an exception (``%s`` of it, ``exc_info``, ``log.exception``), an SDK's or Ray's words that may hold a provider's
key, a URL's ``?key=`` or password, a header's value. Before (stop 80), the endpoint's 500 line was redacted by
hand and no other line was: a done-callback's exit logged its traceback, key and all."""

from __future__ import annotations

import ast
import logging
import pathlib
import threading

import pytest

from engine.app._future import ResultFuture
from engine.core._logkeys import KeyFilter, get_logger, scrub
from engine.core.errors import ConfigError
from engine.core.request import Request
from engine.core.settings import check_redis_url, masked_url

KEY = "sk-proj-" + "Q" * 40
GEMINI = "AIza" + "G" * 35
TENANT = "tenant-key-7f3a9c"  # no provider's shape: masked for where it stands
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_a_done_callbacks_exit_is_logged_without_the_key(caplog):
    """``ResultFuture``'s guard logs a callback's ``SystemExit`` with its traceback (``exc_info``): a script's
    ``sys.exit(f"failed: {err}")`` of an SDK error quotes what the provider echoed, the key too."""
    fut = ResultFuture(Request(id="r1", provider="openai", model="gpt-4o-mini", prompt="hi",
                                 arrival_s=0.0), None)

    def quits(_f) -> None:
        raise SystemExit(f"failed: Error code: 401 - {{'error': {{'message': 'Incorrect API key provided: {KEY}'}}}}")

    fut.add_done_callback(quits)
    t = threading.Thread(target=fut.set_result, args=(None,))
    with caplog.at_level(logging.ERROR, logger="smartbatch"):
        t.start()
        t.join(10)
    assert not t.is_alive()
    assert "SystemExit" in caplog.text and "Traceback" in caplog.text  # the traceback is kept, masked
    assert KEY not in caplog.text and "[redacted]" in caplog.text


@pytest.mark.parametrize("how", ["args", "exc_info", "exception", "stack"])
def test_every_project_logger_masks_what_it_quotes(caplog, how):
    """Each way a line may quote an exception, on a child logger (a filter on ``smartbatch`` alone would not see
    it): the key, a Gemini URL's ``?key=``, a Redis password and a tenant's bearer are all masked."""
    log = get_logger("smartbatch.test_log_keys")
    words = (f"{KEY} https://generativelanguage.googleapis.com/v1beta/models/g:generateContent?key=hunter{TENANT} "
             f"redis://:pa/ss{TENANT}@host:6379/0 Authorization: Bearer {TENANT} {GEMINI}")
    with caplog.at_level(logging.DEBUG, logger="smartbatch"):
        try:
            raise RuntimeError(words)
        except RuntimeError as exc:
            if how == "args":
                log.warning("dispatcher %s did not answer: %s", "openai", exc)
            elif how == "exc_info":
                log.error("failed", exc_info=exc)
            elif how == "exception":
                log.exception("failed")
            else:
                log.warning("failed: %s", words, stack_info=True)
    assert caplog.records and all(r.exc_info is None for r in caplog.records)
    for secret in (KEY, GEMINI, TENANT, "hunter", "pa/ss"):
        assert secret not in caplog.text, secret
    assert "host:6379" in caplog.text and "[redacted]" in caplog.text  # masked, not dropped


def test_a_line_with_nothing_to_mask_keeps_its_args(caplog):
    """Structured handlers read ``msg`` and ``args``: they are rewritten only when something is masked."""
    with caplog.at_level(logging.INFO, logger="smartbatch"):
        get_logger("smartbatch.test_log_keys").info("batch %s: %d lines", "b1", 3)
    (r,) = caplog.records
    assert (r.msg, r.args, r.getMessage()) == ("batch %s: %d lines", ("b1", 3), "batch b1: 3 lines")
    assert scrub("a key of the cache, key=value in a sentence") == "a key of the cache, key=value in a sentence"


def test_every_project_logger_is_made_with_the_filter():
    """No module makes a ``smartbatch`` logger with ``logging.getLogger``: one so made would have no filter
    (a logger's filters see only its own records, and the handlers are not the project's)."""
    bare = []
    for path in sorted([*ROOT.glob("actors/**/*.py"), *ROOT.glob("engine/**/*.py")]):
        if path.name == "_logkeys.py":  # where ``get_logger`` makes them
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "getLogger"
                    and not (node.args and isinstance(node.args[0], ast.Constant)
                             and not str(node.args[0].value).startswith("smartbatch"))):
                bare.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bare == []
    assert any(isinstance(f, KeyFilter) for f in get_logger("smartbatch.dispatcher").filters)
    with pytest.raises(ValueError, match="smartbatch.<part>"):
        get_logger("ray.serve")


@pytest.mark.parametrize("url", ["redis://:abc/def{s}@host:6379/0", "redis://:abc#def{s}@host:6379/0",
                                 "rediss://user:abc?d{s}@host:6380/0"])
def test_a_redis_password_with_a_reserved_character_is_never_shown(url):
    """``check_redis_url``'s ``ConfigError`` (printed, logged) quoted what URL parsing took for the port, a piece of
    a password holding ``/``, ``#`` or ``?`` unescaped, and ``masked_url`` showed all of one holding ``/``."""
    url = url.format(s=TENANT)
    assert "abc" not in masked_url(url) and TENANT not in masked_url(url)
    with pytest.raises(ConfigError, match="budgets.redis_url") as got:
        check_redis_url(url, "budgets.redis_url")
    said = str(got.value)
    assert "abc" not in said and TENANT not in said, said
    assert "%2F" in said  # the fix: how to write such a character


def test_the_clis_word_on_a_bug_never_prints_a_key(monkeypatch, tmp_path):
    """A bug's exception ends a command with its first line (``cli_common._Group``), printed where a CI keeps its
    logs: its words may quote a key, as the endpoint's 500 line did."""
    from typer.testing import CliRunner

    import engine.core.trace
    from engine.app.cli import app

    def buggy(*_a, **_k):
        raise RuntimeError(f"Error code: 401 - Incorrect API key provided: {KEY}, sent to ?key={TENANT}")

    monkeypatch.setattr(engine.core.trace, "write_trace", buggy)
    r = CliRunner().invoke(app, ["trace", "synth", "--n", "5", "--seed", "1", "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 1 and "unexpected, so a bug" in r.output, r.output
    assert KEY not in r.output and TENANT not in r.output and "[redacted]" in r.output, r.output


def test_the_rescues_word_on_a_batch_or_video_it_could_not_read_holds_no_key():
    """``brief``, the line a rescue (``batch --resume``, ``serve --state-dir``) prints or raises for a provider batch
    or video of the earlier run it could not read, quoted the exception's words whole."""
    from engine.app._batch_ended import brief

    said = brief(RuntimeError(f"GET https://generativelanguage.googleapis.com/v1beta/operations/x?key={GEMINI} "
                              f"said 401: Incorrect API key provided: {KEY}"))
    assert said.startswith("RuntimeError: GET https://") and KEY not in said and GEMINI not in said, said


def test_a_word_with_sk_inside_is_no_key(caplog):
    """``sk-`` inside a word is not a key's start: a review (rvkeylogs80) found a tenant ``risk-management`` logged
    as ``ri[redacted]`` and a custom_id ``task-000042`` as ``ta[redacted]``, in every log line and the CLI's."""
    words = "tenant risk-management-team, request task-000042, disk-usage-monitor1"
    with caplog.at_level(logging.INFO, logger="smartbatch"):
        get_logger("smartbatch.test_log_keys").info("refused: %s", words)
    assert caplog.records[-1].getMessage() == f"refused: {words}"
    assert scrub(f"{words} ({KEY}) key={KEY}") == f"{words} ([redacted]) key=[redacted]"


@pytest.mark.parametrize("url", ["https://us-east5-aiplatform.googleapis.com/v1/projects/p/locations/us-east5/"
                                 "publishers/anthropic/models/claude-3-5-sonnet-v2@20241022:rawPredict",
                                 "https://example.com/v1/files?owner=ops@example.com", "https://[::1]:8080/m@v"])
def test_an_at_in_a_web_urls_path_or_query_is_no_password(url):
    """A web URL whose authority is a host names no user: its "@" is the path's or the query's. Before (a review,
    rvkeylogs80), ``masked_url`` took all up to it for a password, and a log line showed ``https://***@20241022``,
    its host and path gone; a Redis URL's password with an unescaped "/" is still masked whole."""
    assert masked_url(url) == url and scrub(f"POST {url} said 404") == f"POST {url} said 404"
    assert masked_url("redis://:pa/ss@host:6379/0") == "redis://:***@host:6379/0"
    assert masked_url("https://u:pa/ss@host/v1") == "https://u:***@host/v1"


def test_a_key_set_in_a_variable_of_a_longer_name_is_masked():
    """``OPENAI_API_KEY=...`` (a shell's or a setting's echo, a child's environment in a traceback) was shown whole:
    the name must begin a word for ``\\b`` and ``_API_KEY`` does not (a review, rvkeylogs80)."""
    for line in (f"OPENAI_API_KEY={TENANT}", f"SMARTBATCH_PROVIDERS__OPENAI__API_KEY={TENANT}",
                 f"{{'x_api_key': '{TENANT}'}}"):
        assert TENANT not in scrub(line) and "[redacted]" in scrub(line), scrub(line)
    assert scrub("max_tokens=5 input_tokens=3 api_keys: 2") == "max_tokens=5 input_tokens=3 api_keys: 2"


def test_a_line_with_a_bad_format_is_logged_masked_and_the_caller_goes_on(caplog):
    """A filter runs in the caller's ``log.warning``: its ``getMessage`` raised the line's ``TypeError`` there (a
    review, rvkeylogs80: ``log.warning("%d lines", None)`` in an ``except`` became the caller's own error), where
    logging reports a bad format in the handler and goes on; that report printed the args, a key among them."""
    with caplog.at_level(logging.INFO, logger="smartbatch"):
        get_logger("smartbatch.test_log_keys").warning("%d lines for %s", None, KEY)
    (r,) = caplog.records
    assert "could not be formatted" in r.getMessage() and "%d lines" in r.getMessage(), r.getMessage()
    assert KEY not in r.getMessage() and "[redacted]" in r.getMessage()


@pytest.mark.parametrize("secret", [GEMINI, f"redis://:{TENANT}@host:6379/0"])
def test_the_rescues_word_masks_a_secret_its_cut_at_200_characters_ends(secret):
    """``brief`` cut the exception's words at 200 characters and masked what was left: a Google key cut short was
    no longer the shape ``redact`` knows, nor a Redis URL cut before its "@" a password's, and their first
    characters were printed (a review, rvkeylogs80: 25 of a Gemini key's 39)."""
    from engine.app._batch_ended import brief

    said = brief(RuntimeError("x" * 180 + f" {secret}"))
    assert GEMINI[:12] not in said and TENANT[:8] not in said, said
    assert said.startswith("RuntimeError: xxx") and len(said) <= len("RuntimeError: ") + 200


@pytest.mark.parametrize("scheme", ["Basic", "Token"])
def test_an_authorization_header_of_another_scheme_is_masked(scheme):
    """``Authorization: Basic <base64 of user:password>`` (a proxy's, a self-hosted endpoint's) kept its value: the
    mask took the scheme's word for it (a review, rvkeylogs80)."""
    said = scrub(f"headers: {{'Authorization': '{scheme} {TENANT}'}}, Proxy-Authorization: {scheme} {TENANT}")
    assert TENANT not in said and said.count(f"{scheme} [redacted]") == 2, said
