"""A base URL holding ``user:password@`` replaced the API key on the wire; it is refused at settings and start."""

from __future__ import annotations

import traceback
from collections.abc import Iterator

import anthropic
import openai
import pytest

from engine.core.errors import ConfigError
from engine.core.settings import ProvidersSettings, Settings, load_settings
from engine.emulator import Emulator

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

PASSWORD = "s3cret-PASSWORD-9f2"
KEY = "sk-BASEURL-TEST-KEY"


@pytest.fixture(scope="module")
def emu() -> Iterator[Emulator]:
    with Emulator(latency_scale=0.0, speedup=1e4) as e:
        yield e


def _with_user(url: str, user: str = f"alice:{PASSWORD}") -> str:
    return url.replace("http://", f"http://{user}@", 1)


def test_the_sdks_send_a_base_urls_credentials_in_place_of_the_key(emu: Emulator) -> None:
    """Why the URL is refused: through the official SDKs the emulator sees Basic auth and no key (a 401 for
    a missing key), where the same call without the user part is answered. If an SDK ever sends both, this
    fails, and the refusal can go."""
    oai = openai.OpenAI(base_url=_with_user(emu.base_url("openai")), api_key=KEY, max_retries=0)
    ant = anthropic.Anthropic(base_url=_with_user(emu.anthropic_base_url("anthropic")), api_key=KEY, max_retries=0)
    with oai, ant:
        with pytest.raises(openai.AuthenticationError, match="missing API key"):
            oai.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.AuthenticationError, match="x-api-key header is required"):
            ant.messages.create(model="claude-haiku-4-5", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    with openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0) as plain:
        plain.chat.completions.create(model="gpt-5-mini", messages=[{"role": "user", "content": "hi"}])
    assert emu.count("chat.completions", status=401) == 1 and emu.count("messages", status=401) == 1


def _said(ei: pytest.ExceptionInfo[ConfigError]) -> str:
    return "".join(traceback.format_exception(ei.value))


@pytest.mark.parametrize(("name", "url", "key_env"), [
    ("openai", f"http://alice:{PASSWORD}@127.0.0.1:8765/openai/v1", "OPENAI_API_KEY"),
    ("anthropic", f"http://alice:{PASSWORD}@127.0.0.1:8765/anthropic", "ANTHROPIC_API_KEY"),
    ("google", f"https://alice:{PASSWORD}@generativelanguage.googleapis.com/v1beta/openai/", "GEMINI_API_KEY"),
    ("openai", f"https://{PASSWORD}@proxy.example/v1", "OPENAI_API_KEY"),  # a key given as the user name
], ids=["openai", "anthropic", "google", "key-as-user"])
def test_an_endpoints_base_url_with_credentials_is_refused_naming_the_field_and_fix(monkeypatch, name, url, key_env):
    env = f"SMARTBATCH_PROVIDERS__ENDPOINTS__{name.upper()}__BASE_URL"
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setenv(env, url)
    with pytest.raises(ConfigError) as from_env:
        load_settings()
    monkeypatch.delenv(env)
    with pytest.raises(ConfigError) as from_driver:
        Settings(providers={"mode": "http", "endpoints": {name: {"base_url": url}}})
    for ei in (from_env, from_driver):
        said = _said(ei)
        assert f"providers.endpoints.{name}.base_url" in said and "user:password@" in said, said
        assert f"the key in {key_env}" in said and PASSWORD not in said, said
    assert env in str(from_env.value)


@pytest.mark.parametrize(("api", "var"), [("openai", "OPENAI_BASE_URL"), ("anthropic", "ANTHROPIC_BASE_URL")])
def test_an_sdk_base_url_variable_with_credentials_is_refused_at_the_start(api: str, var: str) -> None:
    providers = ProvidersSettings(mode="http", endpoints={api: {}})
    with pytest.raises(ConfigError) as ei:
        providers.decided({var: f"http://bob:{PASSWORD}@127.0.0.1:8765/{api}/v1"})
    said = _said(ei)
    assert f"the variable {var}" in said and "bob:***" in said and PASSWORD not in said, said
    # Without the user part it is taken in as before.
    fine = providers.decided({var: f"http://127.0.0.1:8765/{api}/v1"})
    assert fine.endpoints[api].base_url == f"http://127.0.0.1:8765/{api}/v1"


HEAD = "s3cretHEAD"  # a password's start, before a character URL parsing ends the host at


@pytest.mark.parametrize("url", [f"http://alice:{HEAD}/{PASSWORD}@127.0.0.1:8765/openai/v1",
                                 f"http://alice:{HEAD}#{PASSWORD}@127.0.0.1:8765/openai/v1",
                                 f"http://alice:{HEAD}?{PASSWORD}@127.0.0.1:8765/openai/v1",
                                 f"alice:{HEAD}@{PASSWORD}@127.0.0.1:8765/openai/v1"],
                         ids=["slash", "hash", "question-mark", "no-scheme"])
def test_a_password_that_url_parsing_cuts_short_is_refused_and_not_quoted(url: str) -> None:
    """A password holding an unescaped "/" or "#" passed (urlsplit ends the host there; the SDK then failed on
    "Invalid port: 's3cretHEAD'", a crash quoting it), one with "?" was refused as a query quoting its start, and a
    URL without its scheme was refused by pydantic quoting it whole: fails on the code before (a review)."""
    with pytest.raises(ConfigError) as ei:
        Settings(providers={"mode": "http", "endpoints": {"openai": {"base_url": url}}})
    said = _said(ei)
    assert "providers.endpoints.openai.base_url" in said and "user:password@" in said, said
    assert HEAD not in said and PASSWORD not in said, said
    # An "@" in the path is no credential (the host before it is whole).
    fine = Settings(providers={"mode": "http", "endpoints": {"openai": {"base_url": "http://127.0.0.1:8765/v1/@x"}}})
    assert fine.providers.endpoints["openai"].base_url == "http://127.0.0.1:8765/v1/@x"


def test_a_dry_run_says_a_credentialed_sdk_variable_would_stop_the_start(tmp_path, monkeypatch) -> None:
    """`run --dry-run` with OPENAI_BASE_URL holding user:password@ said nothing of it (the start refuses it): it
    says the start's words now, the password masked. Fails on the code before (a review)."""
    from typer.testing import CliRunner

    from engine.app.cli import app

    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id":"a1","arrival_s":0,"model":"gpt-5-mini","prompt":"hello","deadline_s":600}\n')
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://alice:{PASSWORD}@127.0.0.1:9/openai/v1")
    r = CliRunner().invoke(app, ["run", str(trace), "--dry-run", "--providers", "http", "--speedup", "1"])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split())
    assert "the real run would stop at its start: the variable OPENAI_BASE_URL" in said, said
    assert "user:password@" in said and PASSWORD not in said, said
