"""An HTTP run does not answer a provider without an endpoint from the simulator unless told so: a new user's tour
ran a real job with SMARTBATCH_PROVIDERS__MODE=http and its Gemini requests came back ``ok`` with placeholder text
at a simulated cost (only ``Result.real`` and the report said so). ``providers.simulate_others`` decides; by
default it holds only where every endpoint is on this machine (the emulator, a test server)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.batchfile import read_batch_file
from engine.core.catalog import Catalog, default_catalog
from engine.core.request import Request, validation_context
from engine.core.settings import ProvidersSettings, Settings
from engine.core.trace import _problems_of

CAT = default_catalog()
LOOP = {"openai": {"base_url": "http://127.0.0.1:8765/openai/v1"},
        "anthropic": {"base_url": "http://localhost:8765/anthropic"}}


@pytest.fixture(autouse=True)
def no_sdk_urls(monkeypatch):
    for var in ("OPENAI_BASE_URL", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(var, raising=False)


def providers(**kw) -> ProvidersSettings:
    return ProvidersSettings.model_validate({"mode": "http", **kw})


def test_simulate_others_is_decided_by_where_the_endpoints_are(monkeypatch):
    assert providers(endpoints=LOOP).simulates_others()  # the emulator: a demo, a test
    assert providers(endpoints={"openai": {"base_url": "http://[::1]:9/v1"}}).simulates_others()
    assert providers(endpoints={"openai": {"base_url": "http://127.8.0.1:9/v1"}}).simulates_others()
    assert not providers().simulates_others()  # the default pair: the providers' own APIs
    assert not providers(endpoints={**LOOP, "anthropic": {}}).simulates_others()  # one real API among them
    assert not providers(endpoints={"openai": {"base_url": "https://api.together.xyz/v1"}}).simulates_others()
    assert not providers(endpoints={"openai": {"base_url": "http://127.0.0.1.example.com/v1"}}).simulates_others()
    assert not providers(endpoints={}).simulates_others()  # an HTTP run that names no endpoint meant real calls
    # An endpoint without base_url goes where its SDK's variable says.
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert not providers().simulates_others()  # Anthropic's still goes to its API
    monkeypatch.setenv("ANTHROPIC_BASE_URL", "http://localhost:9")
    assert providers().simulates_others()
    assert not providers(simulate_others=False).simulates_others()  # said outright, it holds
    assert providers(endpoints={"openai": {}}, simulate_others=True).simulates_others()
    # An engine decides it once: a driver attaching later with another environment agrees with its start.
    decided = providers().decided()
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert decided.simulate_others is True and decided.simulates_others()
    assert ProvidersSettings().decided().simulate_others is None  # a simulated run has nothing to decide


def validate(d: dict, settings: Settings, live: bool = True) -> Request:
    return Request.model_validate({"id": "q1", "arrival_s": 0.0, "deadline_s": 600, **d},
                                  context=validation_context(CAT, settings, live=live))


def test_an_engines_request_for_a_provider_it_would_simulate_is_refused_naming_the_field_and_the_fixes():
    real = Settings(providers=providers())
    with pytest.raises(ValidationError) as ei:
        validate({"model": "gemini-2.5-flash", "prompt": "Name two seas."}, real)
    ((field, msg),) = _problems_of(ei.value)
    assert field == "model"
    assert "google" in msg and "no HTTP endpoint" in msg and "simulated" in msg and "not real" in msg
    assert "SMARTBATCH_PROVIDERS__ENDPOINTS__GOOGLE__API_KEY_ENV=GEMINI_API_KEY" in msg  # its preset (Gemini)
    assert "SMARTBATCH_PROVIDERS__SIMULATE_OTHERS=true" in msg
    assert "replaces the default openai and anthropic ones" in msg  # adding google alone would drop them
    # Anthropic left out by a user who named OpenAI's endpoint alone; GPU work, whose name no shell exports.
    only_openai = Settings(providers=providers(endpoints={"openai": {}}))
    with pytest.raises(ValidationError, match="ENDPOINTS__ANTHROPIC__API_KEY_ENV=ANTHROPIC_API_KEY"):
        validate({"model": "claude-haiku-4-5", "prompt": "Hi"}, only_openai)
    with pytest.raises(ValidationError, match=r"SMARTBATCH_PROVIDERS__ENDPOINTS='\{\"modal-h100\""):
        validate({"model": "flux-1-dev", "prompt": "a lighthouse"}, real)
    assert validate({"model": "gpt-5-mini", "prompt": "Hi"}, real).provider == "openai"  # has its endpoint
    # Where simulating is allowed, and outside an engine (bench, a trace loaded for the simulator), it passes.
    for settings, live in ((Settings(providers=providers(endpoints=LOOP)), True),
                           (Settings(providers=providers(simulate_others=True)), True), (real, False),
                           (Settings(providers={"simulate_others": False}), True)):  # sim mode: all simulated
        assert validate({"model": "gemini-2.5-flash", "prompt": "Hi"}, settings, live).provider == "google"


def test_a_batch_file_line_for_a_provider_it_would_simulate_is_its_own_error(tmp_path):
    from engine.app.cli_batch import _strict

    lines = [{"custom_id": c, "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": m, "messages": [{"role": "user", "content": "Hi"}], "max_completion_tokens": 9}}
             for c, m in (("a", "gpt-5-mini"), ("g", "gemini-2.5-flash"), ("b", "gpt-4o-mini"))]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))

    def read(settings):
        return read_batch_file(src, window_s=3600.0, catalog=CAT, settings=settings, live=True)
    # `smartbatch batch` on the emulator still refuses it (an output file cannot say a line was simulated),
    # unless told to simulate it.
    bf = read(_strict(Settings(providers=providers(endpoints=LOOP))))
    assert [ln.custom_id for ln in bf.lines if ln.request is not None] == ["a", "b"]
    ((field, msg),) = [ln.problem for ln in bf.invalid]
    assert field == "model" and "SIMULATE_OTHERS=true" in msg
    assert len(read(_strict(Settings(providers=providers(endpoints=LOOP, simulate_others=True)))).requests) == 3


def _trace(tmp_path):
    p = tmp_path / "t.jsonl"
    rows = ([{"id": f"o{k}", "model": "gpt-5-mini"} for k in range(3)] + [{"id": f"g{k}", "model": "gemini-2.5-flash"}
            for k in range(4)] + [{"id": "m0", "model": "flux-1-dev"}])
    p.write_text("".join(json.dumps({"arrival_s": k, "prompt": f"p{k}", "deadline_s": 600, **r}) + "\n"
                         for k, r in enumerate(rows)))
    return p


@pytest.mark.parametrize("dry", [False, True])
def test_run_of_a_trace_with_providers_it_would_simulate_refuses_at_start_counting_them(tmp_path, monkeypatch, dry):
    """Refused before anything starts or is sent, with the count per provider; the dry run says the same."""
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    r = CliRunner().invoke(app, ["run", str(_trace(tmp_path)), "--out", str(tmp_path / "out")]
                           + (["--dry-run"] if dry else []),
                           env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "COLUMNS": "400"})
    said = " ".join(r.output.split())
    assert r.exit_code == 2, r.output  # a ConfigError
    assert "5 request(s) are for providers with no HTTP endpoint" in said
    assert "4 of google (e.g. 'gemini-2.5-flash')" in said and "1 of modal-h100 (e.g. 'flux-1-dev')" in said
    assert "SMARTBATCH_PROVIDERS__ENDPOINTS__GOOGLE__API_KEY_ENV=GEMINI_API_KEY" in said and "SIMULATE_OTHERS=true" in said
    assert "nothing is sent" in said and not (tmp_path / "out").exists()
    # Told to simulate them (a demo), the dry run plans it.
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__SIMULATE_OTHERS", "true")
    r = CliRunner().invoke(app, ["run", str(_trace(tmp_path)), "--dry-run"],
                           env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "COLUMNS": "400"})
    assert r.exit_code == 0 and "dry run: 8 requests, nothing sent" in r.output, r.output


def test_a_fallback_to_a_provider_it_would_simulate_is_refused_at_start():
    """A circuit that opens moves its requests to their fallback model (``resilience.fallbacks``); one served by a
    provider with no endpoint was answered from the simulator, placeholder text at a made-up cost, though every
    request naming it was refused (a fault hunt). The start refuses it, naming the setting and the fixes."""
    from engine.app.provider_setup import http_setup

    fb = {"resilience": {"fallbacks": {"openai/gpt-5-mini": "google/gemini-2.5-flash"}}}
    real = Settings.model_validate({"providers": {"mode": "http", "simulate_others": False}, **fb})
    with pytest.raises(Exception) as err:
        http_setup(CAT, real, need_keys=False)
    said = str(err.value)
    assert "resilience.fallbacks" in said and "gemini-2.5-flash" in said and "SIMULATE_OTHERS" in said, said
    demo = Settings.model_validate({"providers": {"mode": "http", "endpoints": LOOP}, **fb})
    http_setup(CAT, demo, need_keys=False)  # the emulator's run simulates it: a demo
    http_setup(CAT, Settings.model_validate(fb), need_keys=False)  # a simulated run: nothing is real


def test_an_endpoint_named_for_no_catalog_provider_is_refused_at_start_naming_the_one_it_may_mean():
    """An endpoint is matched to the catalog's provider of its name, so a misspelt one ("opnai") was accepted and
    never called: openai, left without an endpoint, was simulated beside the loopback ones (fake answers in an
    HTTP run), or refused naming only openai's fix (a helper's tour of docs/providers.md). The start and the dry
    run refuse it, naming the setting, the provider it may mean and the overlay that adds one."""
    from engine.app.provider_setup import http_setup
    from engine.core.errors import ConfigError

    typo = {"opnai": {"api": "openai", "base_url": "http://127.0.0.1:8765/openai/v1", "api_key_env": "OPENAI_API_KEY"},
            "anthropic": LOOP["anthropic"]}
    with pytest.raises(ConfigError) as err:
        http_setup(CAT, Settings.model_validate({"providers": {"mode": "http", "endpoints": typo}}), need_keys=False)
    said = str(err.value)
    assert "providers.endpoints.opnai" in said and "did you mean 'openai'?" in said, said
    assert "--catalog-overlay" in said, said
    vllm = {**LOOP, "local-vllm": {"api": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "VLLM_KEY"}}
    # Its provider not in the catalog, it starts, warned of (a review: refused, `smartbatch demo` could not run
    # beside it; ``test_an_endpoint_for_a_provider_this_catalog_lacks_is_warned_of_not_refused``). Its provider
    # added (an overlay), it starts; so does the default pair under a catalog without anthropic, and
    # any name in a simulated run, which calls no endpoint.
    added = Catalog.model_validate({"schema_version": CAT.schema_version, "providers": {
        **{k: v.model_dump() for k, v in CAT.providers.items()},
        "local-vllm": {"models": {"llama-3.1-8b": {"kind": "text", "input_per_mtok": 0.02, "output_per_mtok": 0.05}}}}})
    http_setup(added, Settings.model_validate({"providers": {"mode": "http", "endpoints": vllm}}), need_keys=False)
    alone = Catalog.model_validate({"schema_version": CAT.schema_version,
                                    "providers": {"openai": CAT.providers["openai"].model_dump()}})
    http_setup(alone, Settings.model_validate({"providers": {"mode": "http"}}), need_keys=False)
    http_setup(CAT, Settings.model_validate({"providers": {"endpoints": typo}}), need_keys=False)


def test_a_dry_run_with_a_misspelt_endpoint_is_refused_not_planned_as_simulated(tmp_path, monkeypatch):
    """The dry run planned openai's requests as "simulated" and said nothing of the endpoint it never called."""
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", json.dumps(
        {"opnai": {"api": "openai", "base_url": "http://127.0.0.1:8765/openai/v1", "api_key_env": "OPENAI_API_KEY"},
         "anthropic": LOOP["anthropic"]}))
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "o0", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "p",
                                 "deadline_s": 600}) + "\n")
    r = CliRunner().invoke(app, ["run", str(trace), "--dry-run", "--out", str(tmp_path / "out")],
                           env={"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "COLUMNS": "400"})
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "providers.endpoints.opnai" in said and "did you mean 'openai'?" in said, r.output


def test_an_endpoint_for_a_provider_this_catalog_lacks_is_warned_of_not_refused(caplog):
    """An endpoint no slip can explain (``local-vllm``, docs/providers.md's example; ``openai-eu`` beside an ``openai``
    endpoint) whose provider this run's catalog lacks (its overlay given to another command, or the environment
    shared) was refused at every start since stop 84's tour, where it had run, unused: ``smartbatch demo``, which
    takes no overlay, refused so (a review, rvtour84). It is named in a warning; a name close to a provider left
    without an endpoint (``opnai``) is still refused."""
    from engine.app.provider_setup import http_setup
    from engine.core.errors import ConfigError

    vllm = {"api": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "VLLM_KEY"}
    for extra in ({"local-vllm": vllm}, {"openai-eu": vllm}):
        s = Settings.model_validate({"providers": {"mode": "http", "endpoints": {**LOOP, **extra}}})
        caplog.clear()
        with caplog.at_level("WARNING", logger="smartbatch.providers"):
            http_setup(CAT, s, need_keys=False)
        (name,) = extra
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"providers.endpoints.{name}" in said and "not called in this run" in said, said
    with pytest.raises(ConfigError, match="did you mean 'openai'"):  # openai has no endpoint: the slip costs it one
        http_setup(CAT, Settings.model_validate({"providers": {"mode": "http", "endpoints": {
            "openai-eu": vllm, "anthropic": LOOP["anthropic"]}}}), need_keys=False)


def test_a_refusal_beside_a_real_api_names_the_misspelt_endpoint_meant_for_the_provider(tmp_path, monkeypatch):
    """Beside a real API a provider's requests are refused before the start's check of endpoint names, so `run`
    (its dry run too) and each request's refusal named openai's fix alone and nothing of the endpoint `opnai`,
    where docs/providers.md says the dry run names it (a review, rvtour84)."""
    typo = {"opnai": {"api": "openai", "api_key_env": "OPENAI_API_KEY"}, "anthropic": {}}
    with pytest.raises(ValidationError, match="an endpoint is named 'opnai': if it is meant for openai, name it"):
        validate({"model": "gpt-5.4-mini", "prompt": "p"}, Settings(providers=providers(endpoints=typo)))
    with pytest.raises(ValidationError) as err:  # no endpoint named near it: no word of one
        validate({"model": "gemini-2.5-flash", "prompt": "p"}, Settings(providers=providers(endpoints={
            **typo, "local-vllm": {"api": "openai", "base_url": "https://vllm.example/v1", "api_key_env": "K"}})))
    assert "an endpoint is named" not in str(err.value), str(err.value)
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS", json.dumps(typo))
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "o0", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "p",
                                 "deadline_s": 600}) + "\n")
    r = CliRunner().invoke(app, ["run", str(trace), "--dry-run", "--speedup", "1", "--out", str(tmp_path / "out")],
                           env={"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k", "COLUMNS": "400"})
    said = " ".join(r.output.split())
    assert r.exit_code == 2 and "an endpoint is named 'opnai': if it is meant for openai, name it 'openai'" in said, said
