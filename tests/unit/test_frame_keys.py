"""No frame of a failed start holds a raw API key among its locals (keys85). Error trackers (Sentry captures every
frame's locals of an exception by default), ``rich.traceback``'s ``show_locals``, ``pytest -l`` and
``TracebackException(capture_locals=True)`` print each local by its repr: a key read into a plain ``str`` was
printed whole, where a ``Secret`` prints masked. Each test makes a start of the driver fail after the keys are
read, then looks for the key in every frame of what it raised (its chain's too); no Ray, nothing sent."""

from __future__ import annotations

import asyncio
import gc
import sys
import traceback

import pytest

from engine.core.errors import ConfigError, SmartbatchError

# Key-shaped, split so no scan of real keys flags the fakes; each provider its own, to say whose leaked.
KEYS = {"OPENAI_API_KEY": "sk-proj-" + "FRAMEKEYopenai0123456789abcdef",
        "ANTHROPIC_API_KEY": "sk-ant-" + "FRAMEKEYanthropic0123456789ab",
        "GEMINI_API_KEY": "AIza" + "FRAMEKEYgemini0123456789abcdefghijklm",
        "REDIS_PASSWORD": "FRAMEKEYredis-password-42"}


def _quoted(exc: BaseException) -> list[str]:
    """Where a key shows in the frames of ``exc``'s traceback, as ``function.local`` (or the formatted locals'
    line): what an error tracker reading the locals would report. Looked for in the frames directly and in
    Python's own formatting with the locals (which follows ``__cause__`` and ``__context__``)."""
    found = []
    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        tb = chain.__traceback__
        while tb is not None:
            frame = tb.tb_frame
            found += [f"{frame.f_code.co_name}.{name}" for name, value in frame.f_locals.items()
                      if any(k in _repr(value) for k in KEYS.values())]
            tb = tb.tb_next
        chain = chain.__cause__ or chain.__context__
    try:
        text = "".join(traceback.TracebackException.from_exception(exc, capture_locals=True).format())
    except Exception:  # Python 3.11's formatting fails on a local whose repr raises: the walk above read them all
        return found
    return found + [line.strip()[:60] for line in text.splitlines() if any(k in line for k in KEYS.values())]


def _repr(value: object) -> str:
    try:
        return repr(value)
    except Exception:  # a half-made object (an SDK's client whose constructor raised)
        return ""


class _CtrlC(BaseException):
    """A Ctrl-C (``KeyboardInterrupt``'s place, which pytest would take for the run's own) where it is raised."""


@pytest.fixture
def keyed_env(monkeypatch):
    for var, key in KEYS.items():
        monkeypatch.setenv(var, key)
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")


def _interrupt(*_a, **_k):
    raise _CtrlC


@pytest.mark.parametrize("where", ["http_setup", "policy", "take_back"])
def test_a_start_that_fails_after_reading_the_keys_holds_none_in_its_frames(keyed_env, monkeypatch, where):
    """``Engine.start`` reads the keys (``http_setup``) and then loads the policy and takes back a killed run's
    work before any Ray. ``http_setup`` held the last key read as a plain ``str`` while it warned of retiring
    models and copied the catalog: a Ctrl-C there showed it (``http_setup.value``); fails on the code before. A bad
    policy name and a take-back that fails leave ``Engine.start``'s own frame, whose keys are ``Secret``s."""
    import engine.app.driver as driver
    import engine.app.provider_setup as setup
    from engine.app.driver import Engine

    if where == "http_setup":
        monkeypatch.setattr(setup, "_warn_retiring", _interrupt)
    elif where == "take_back":
        monkeypatch.setattr(driver, "take_back", _interrupt)
    with pytest.raises(SmartbatchError if where == "policy" else _CtrlC) as got:
        Engine.start(policy="no-such-policy" if where == "policy" else "smart")
    assert _quoted(got.value) == []


def test_a_start_refused_for_its_settings_shows_no_credential_of_them_in_its_frames(keyed_env, monkeypatch):
    """A key pasted where its variable's name goes (``api_key_env``), refused by the start without quoting it;
    Redis URLs with a password (a base URL with a key as its user is refused as settings load now:
    tests/unit/test_base_url_credentials.py). The settings are a local of
    every frame of the start, and pydantic's repr printed them whole (``Engine.start.settings``,
    ``http_setup.ep``, ...): fails on the code before. Their repr masks them now, their values unchanged."""
    from engine.app.driver import Engine
    from engine.core.settings import load_settings

    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__ANTHROPIC__API_KEY_ENV", KEYS["ANTHROPIC_API_KEY"])
    for part in ("BUDGETS", "CACHE", "JOURNAL"):
        monkeypatch.setenv(f"SMARTBATCH_{part}__REDIS_URL", f"redis://:{KEYS['REDIS_PASSWORD']}@127.0.0.1:1/0")
    settings = load_settings()
    assert settings.budgets.redis_url == f"redis://:{KEYS['REDIS_PASSWORD']}@127.0.0.1:1/0"  # the value itself
    with pytest.raises(ConfigError, match="api_key_env: give the name of the environment variable") as got:
        Engine.start(settings)
    del settings
    assert _quoted(got.value) == []


def test_a_dry_runs_key_problems_hold_no_key_in_their_frames(keyed_env, monkeypatch):
    """``key_problems`` (a dry run's) checks each key as the start does: interrupted in the check, no frame holds
    it. Fails on the code before (``_key_problem.value``)."""
    import engine.app.provider_setup as setup
    from engine.core.catalog import load_catalog
    from engine.core.settings import Settings

    monkeypatch.setattr(setup, "is_variable_name", _interrupt)  # the check's first step, the key in hand
    settings = Settings()
    with pytest.raises(_CtrlC) as got:
        setup.key_problems(load_catalog(settings.catalog_path), settings)
    assert _quoted(got.value) == []


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google"])
def test_a_provider_made_in_the_driver_holds_no_key_in_its_frames(keyed_env, monkeypatch, provider):
    """A stop cancels a dead dispatcher's batches with the provider made in the driver, the key from its own
    environment (``actors._stop_left._client``; a take-back's rescue makes them from the start's keys). The SDK's
    client refuses a malformed proxy variable as it is made (httpx's ``ValueError``), and the key was an argument
    of its constructor (``__init__.api_key``, the Gemini one's ``default_headers`` too) and a plain local of
    ``_client``: each fails on the code before. The client is now made with a stand-in and given the key after."""
    from actors._stop_left import _client
    from engine.core.catalog import load_catalog
    from engine.core.settings import Settings

    monkeypatch.setenv("HTTPS_PROXY", "bogus://proxy.invalid:1")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", '{"openai": {"api": "openai", "api_key_env": '
                       '"OPENAI_API_KEY"}, "anthropic": {"api": "anthropic", "api_key_env": "ANTHROPIC_API_KEY"}, '
                       '"google": {"api": "openai", "api_key_env": "GEMINI_API_KEY", "base_url": '
                       '"https://generativelanguage.googleapis.com/v1beta/openai/"}}')
    settings = Settings()
    catalog = load_catalog(settings.catalog_path)
    try:
        _client(provider, settings, catalog)
    except ValueError as exc:
        assert "proxy" in str(exc), exc
        quoted = _quoted(exc)
    else:
        pytest.fail("the client was made past a malformed HTTPS_PROXY")
    # The SDK's half-made client fails in its __del__ (its httpx wrapper's ``is_closed``), the SDK's own: its
    # finalizer runs here, not in a later test's phase.
    finalized: list = []
    monkeypatch.setattr(sys, "unraisablehook", finalized.append)
    gc.collect()
    assert quoted == []


def test_the_sdk_clients_send_the_key_given_after_they_are_made(keyed_env, monkeypatch):
    """The stand-in never goes out: each client made in the driver sends, on the wire, the credential headers an SDK
    client made with the key as its argument sends (the way before), the key in them (Gemini's native routes
    ``x-goog-api-key`` too); a copy of the client (``with_options``) too."""
    import anthropic
    import httpx2
    import openai
    from anthropic._base_client import get_platform

    from actors._stop_left import _client
    from engine.core.catalog import load_catalog
    from engine.core.settings import Settings

    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", '{"anthropic": {"api": "anthropic", "api_key_env": '
                       '"ANTHROPIC_API_KEY"}, "google": {"api": "openai", "api_key_env": "GEMINI_API_KEY", '
                       '"base_url": "https://generativelanguage.googleapis.com/v1beta/openai/"}}')
    settings = Settings()
    catalog = load_catalog(settings.catalog_path)
    gemini, claude = KEYS["GEMINI_API_KEY"], KEYS["ANTHROPIC_API_KEY"]
    google = _client("google", settings, catalog)
    pairs = [(_client("anthropic", settings, catalog).client,  # its key in x-api-key (test_anthropic_key_header)
              anthropic.AsyncAnthropic(api_key=claude, default_headers={"X-Api-Key": claude,
                                                                        "Authorization": anthropic.Omit()})),
             (google.client, openai.AsyncOpenAI(api_key=gemini)),
             (google._native, openai.AsyncOpenAI(api_key=gemini, default_headers={"x-goog-api-key": gemini}))]

    def sent(client) -> dict[str, str]:
        got: list[httpx2.Headers] = []

        def answer(request: httpx2.Request) -> httpx2.Response:
            got.append(request.headers)
            return httpx2.Response(200, json={})

        client._client._transport = httpx2.MockTransport(answer)
        client._platform = get_platform()  # (read in a worker thread at the first call otherwise)
        asyncio.run(client.get("/x", cast_to=object))
        return {k: v for k, v in got[0].items() if k in ("authorization", "x-api-key", "x-goog-api-key")}

    for made, before in pairs:
        wire = sent(made)
        assert wire == sent(before) == sent(made.with_options(timeout=3.0))
        assert any(gemini in v or claude in v for v in wire.values()), wire


def test_an_endpoint_tenant_key_refused_holds_no_key_in_its_frames(monkeypatch):
    """``serve --http-tenant-key`` reads each tenant's key and refuses a key two tenants share: the refusal raised
    with the key a plain local of ``_tenant_keys`` (fails on the code before: ``_tenant_keys.key``)."""
    from engine.app.cli_serve import _tenant_keys

    monkeypatch.setenv("ACME_KEY", KEYS["OPENAI_API_KEY"])
    monkeypatch.setenv("BETA_KEY", KEYS["OPENAI_API_KEY"])
    with pytest.raises(ConfigError, match="holds the same key as ACME_KEY") as got:
        _tenant_keys(["acme=ACME_KEY", "beta=BETA_KEY"], 8000, None, None)
    assert _quoted(got.value) == []


@pytest.mark.parametrize("header", ["authorization", "x-api-key"])
def test_an_endpoint_route_that_raises_holds_no_caller_key_in_its_frames(header):
    """The endpoint's key check (``EndpointKeys.guard``) ran every route inside its own frame with the caller's key
    a plain local (``check_key.key``; ``check_key.anthropic`` for ``x-api-key``), and the ASGI scope, a local of
    every frame of the frameworks' between the server and the route, held it among its headers: a route that
    raised showed it in each (fails on the code before). The key is read in a helper that returns before the
    route runs, and leaves the scope once checked."""
    import hashlib

    from fastapi import FastAPI

    from engine.app._endpoint_keys import EndpointKeys

    app = FastAPI()

    class RouteBug(Exception):
        pass

    @app.get("/v1/models")
    async def models():
        raise RouteBug

    EndpointKeys(hashlib.sha256(KEYS["OPENAI_API_KEY"].encode()).hexdigest()).guard(app)

    async def call() -> BaseException:
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                 "scheme": "http", "path": "/v1/models", "raw_path": b"/v1/models", "query_string": b"",
                 "root_path": "", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
                 "headers": [(header.encode(), (b"Bearer " if header == "authorization" else b"")
                              + KEYS["OPENAI_API_KEY"].encode())]}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            pass

        try:
            await app(scope, receive, send)
        except RouteBug as exc:  # the route ran: the key was taken
            return exc
        pytest.fail("the route did not run")

    assert _quoted(asyncio.run(call())) == []


@pytest.mark.parametrize(("provider", "fails"), [("anthropic", "body"), ("google", "body"), ("openai", "header"),
                                                 ("google", "header")])
def test_a_request_the_sdk_cannot_build_holds_no_key_in_its_frames(keyed_env, monkeypatch, provider, fails):
    """The SDK builds each request in frames of its own: its headers, the key among them, were a local of
    ``_build_request`` while httpx encoded the body (a value JSON cannot carry: a ``TypeError``), where httpx's
    repr masks ``Authorization`` alone (``_build_request.headers``: Anthropic's ``x-api-key``, Gemini's
    ``x-goog-api-key``), and a plain dict of ``_build_headers`` while httpx read them (a header that is not ASCII:
    ``_build_headers.headers_dict``, OpenAI's Bearer too). Fails on the code before; the key is put on the
    request as it is sent now (``actors.providers._sdk_key``)."""
    from actors._stop_left import _client
    from engine.core.catalog import load_catalog
    from engine.core.settings import Settings

    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", '{"openai": {"api": "openai", "api_key_env": '
                       '"OPENAI_API_KEY", "base_url": "http://127.0.0.1:9/v1"}, "anthropic": {"api": "anthropic", '
                       '"api_key_env": "ANTHROPIC_API_KEY", "base_url": "http://127.0.0.1:9"}, "google": {"api": '
                       '"openai", "api_key_env": "GEMINI_API_KEY", "base_url": "http://127.0.0.1:9/v1beta/openai/"}}')
    settings = Settings()
    made = _client(provider, settings, load_catalog(settings.catalog_path))
    client = made._native if provider == "google" and fails == "body" else made.client
    ask = ({"body": {"metadata": object()}} if fails == "body" else
           {"body": {}, "options": {"headers": {"X-Note": "caf\u00e9"}}})

    async def call() -> BaseException:
        try:
            await client.post("/x", cast_to=object, **ask)
        except (TypeError, UnicodeEncodeError) as exc:
            return exc
        pytest.fail("the SDK sent what it cannot encode")

    assert _quoted(asyncio.run(call())) == []


@pytest.mark.parametrize(("asked", "header"), [(False, "authorization"), (False, "x-api-key"), (False, "x-goog-api-key"),
                                              (True, "authorization")])
def test_the_endpoints_failing_route_holds_no_caller_key_in_its_frames_key_asked_or_not(monkeypatch, asked, header):
    """An endpoint that asks no key (``smartbatch serve`` without ``--http-key-env``) still gets one: an
    application moved to it by its ``base_url`` alone sends the key its SDK reads (``OPENAI_API_KEY``, a real
    provider key). keys86 dropped the caller's key headers from the ASGI scope only where a key is asked: without
    one, every frame a failing route raised through held the key in its ``scope`` (``call_next.scope``,
    ``wrapped_app.scope``: fails on the code before for each header; Google's ``x-goog-api-key``, which a Gemini
    SDK pointed at the endpoint sends, was dropped in neither). The whole app (``make_app``), its bug's
    500 caught where the endpoint catches it (``internal_error``)."""
    import hashlib

    import engine.app._endpoint_errors as errors
    from engine.app.endpoint import make_app
    from tests.unit.test_endpoint import CAT, FakeEngine

    key = KEYS["OPENAI_API_KEY"]
    caught: list[BaseException] = []
    internal = errors.internal_error
    monkeypatch.setattr(errors, "internal_error", lambda exc, *a, **k: caught.append(exc) or internal(exc, *a, **k))

    def boom():
        raise KeyError("a bug of the route's")

    app = make_app(FakeEngine(), catalog=CAT,
                   api_key_sha256=hashlib.sha256(key.encode()).hexdigest() if asked else None)
    app.add_api_route("/v1/boom", boom)
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": "/v1/boom", "raw_path": b"/v1/boom", "query_string": b"", "root_path": "",
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2),
             "headers": [(header.encode(), (b"Bearer " if header == "authorization" else b"") + key.encode())]}
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 500 and len(caught) == 1  # the route ran: the key was let in, or none asked
    assert _quoted(caught[0]) == []
