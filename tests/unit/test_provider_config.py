"""Requests that speak the providers' APIs, provider configuration, the catalog overlay and the dry run."""

import json
import math

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from engine.app.cli import app
from engine.app.provider_setup import http_setup
from engine.core.catalog import Catalog, default_catalog, load_catalog
from engine.core.cost import price_usage
from engine.core.errors import CatalogError, ConfigError
from engine.core.features import fingerprint
from engine.core.request import Request, validation_context
from engine.core.settings import ProvidersSettings, Settings, load_settings
from engine.emulator import Emulator

CAT = default_catalog()
CTX = validation_context(CAT)
runner = CliRunner()


def req(d):
    return Request.model_validate({"arrival_s": 0, **d}, context=CTX)


def test_a_request_may_carry_the_providers_own_body():
    r = req({"id": "a", "model": "gpt-4o-mini", "messages": [{"role": "system", "content": "be brief"},
                                                            {"role": "user", "content": "hello there"}],
             "temperature": 0.2, "max_tokens": 50, "response_format": {"type": "json_object"}})
    assert r.body == {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}],
                      "temperature": 0.2, "max_tokens": 50, "response_format": {"type": "json_object"}}
    assert r.max_output_tokens == 50 and r.output_tokens == 50  # the cap bounds the estimate and the budget
    assert r.input_tokens == math.ceil(len("be brief\nhello there") / 4) and r.prompt == "be brief\nhello there"
    # The body shapes the output, so it is part of what makes two requests the same.
    other = req({"id": "b", "model": "gpt-4o-mini", "messages": r.body["messages"], "temperature": 0.9,
                 "max_tokens": 50, "response_format": {"type": "json_object"}})
    assert fingerprint(r) != fingerprint(other)


def test_a_line_of_an_openai_batch_file_is_a_request():
    r = req({"custom_id": "job-7", "method": "POST", "url": "/v1/chat/completions",
             "body": {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}})
    assert (r.id, r.provider, r.model) == ("job-7", "openai", "gpt-4o-mini")
    with pytest.raises(ValidationError, match="url"):
        req({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": {"model": "gpt-4o-mini"}})
    with pytest.raises(ValidationError, match="body.model"):
        req({"id": "y", "model": "gpt-5", "body": {"model": "gpt-4o-mini", "messages": []}})


def test_bad_strings_and_n_are_refused_per_request():
    with pytest.raises(ValidationError, match="not valid Unicode"):
        req({"id": "s", "model": "gpt-5", "prompt": "bad \ud800 text"})
    with pytest.raises(ValidationError, match="n must be 1"):
        req({"id": "n", "model": "gpt-image-1", "prompt": "a cat", "n": 4})


def test_price_usage_bills_cached_and_written_tokens_at_their_prices():
    r = req({"id": "c", "model": "claude-sonnet-4-5", "input_tokens": 5000, "output_tokens": 100})
    p = price_usage(r, CAT, "sync", input_tokens=5000, output_tokens=100, cache_read=2000, cache_write=1000)
    spec = CAT.model("anthropic", "claude-sonnet-4-5")
    expect = (3.0 * (2000 * 0.1 + 1000 * 1.25 + 2000) + 15.0 * 100) * 1e-6
    assert p.total == pytest.approx(expect) and spec.input_per_mtok == 3.0
    half = price_usage(r, CAT, "batch_api", input_tokens=5000, output_tokens=100, cache_read=2000, cache_write=1000)
    assert half.total == pytest.approx(expect / 2)


def test_an_overlay_adds_a_provider_with_prices_alone_and_overrides_a_price(tmp_path):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text("providers:\n"
                       "  local-vllm:\n"
                       "    models:\n"
                       "      llama-3.1-8b: {kind: text, input_per_mtok: 0.02, output_per_mtok: 0.05}\n"
                       "  openai:\n"
                       "    models:\n"
                       "      gpt-5: {input_per_mtok: 1.0}\n")
    cat = load_catalog(None, overlay)
    assert cat.model("local-vllm", "llama-3.1-8b").output_per_mtok == 0.05
    assert cat.model("openai", "gpt-5").input_per_mtok == 1.0
    assert cat.model("openai", "gpt-5").output_per_mtok == CAT.model("openai", "gpt-5").output_per_mtok
    assert set(CAT.providers) < set(cat.providers)
    overlay.write_text("providers:\n  openai:\n    models:\n      gpt-5: {input_per_mtok: -1}\n")
    with pytest.raises(CatalogError, match="overlay"):
        load_catalog(None, overlay)



@pytest.mark.parametrize("entry, says", [
    # A cap above the window: every request under it was refused for the window, and a budget reserved for it.
    ("gpt-5.4-mini: {max_output_tokens: 500000}", "max_output_tokens 500,000 is over context_window 400,000"),
    ("gpt-5.4-mini: {max_input_tokens: 900000}", "max_input_tokens 900,000 is over context_window 400,000"),
    # The long-prompt tier is the dearer one: below the base price, a longer prompt was billed less.
    ("gpt-6.2-sol: {long_context: {above_input_tokens: 272000, input_per_mtok: 1.0, output_per_mtok: 15.0}}",
     "long_context.input_per_mtok 1 is below input_per_mtok 2"),
    ("gpt-6.2-sol: {long_context: {above_input_tokens: 272000, input_per_mtok: 4.0, output_per_mtok: 5.0}}",
     "long_context.output_per_mtok 5 is below output_per_mtok 10"),
])
def test_an_overlay_whose_model_contradicts_itself_is_refused_at_load_naming_the_model_and_both_fields(
        tmp_path, entry, says):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"providers:\n  openai:\n    models:\n      {entry}\n")
    model = entry.split(":")[0]
    with pytest.raises(CatalogError) as ei:
        load_catalog(None, overlay)
    msg = str(ei.value)
    assert f"field 'providers.openai.models.{model}': {says}" in msg and "Value error" not in msg, msg
    assert str(overlay) in msg and "\n" not in msg



def test_an_overlay_of_a_price_alone_refused_for_the_catalogs_long_tier_or_a_default_cap_names_a_fix_it_can_give(
        tmp_path):
    """An overlay raising gpt-6-luna's input price above the packaged long tier's was told to "leave long_context
    out", which it had (the tier is the catalog's, merged under it); a model added with a small window and no cap
    was told of "max_output_tokens 4,096", a value it never gave."""
    overlay = tmp_path / "overlay.yaml"

    def load(entry: str):
        overlay.write_text(f"providers:\n  openai:\n    models:\n      {entry}\n")
        return load_catalog(None, overlay)

    with pytest.raises(CatalogError) as ei:
        load("gpt-6-luna: {input_per_mtok: 0.25}")
    msg = str(ei.value)
    assert "long_context.input_per_mtok 0.2 is below input_per_mtok 0.25" in msg and "leave long_context out" not in msg
    assert "long_context: null" in msg and "long_context: {input_per_mtok: ..., output_per_mtok: ...}" in msg, msg
    luna = "gpt-6-luna: {input_per_mtok: 0.25, long_context: %s}"
    assert load(luna % "null").providers["openai"].models["gpt-6-luna"].long_context is None
    assert load(luna % "{input_per_mtok: 0.5}").providers["openai"].models["gpt-6-luna"].long_context.input_per_mtok == 0.5
    with pytest.raises(CatalogError) as ei:
        load("tiny: {kind: text, input_per_mtok: 0.1, output_per_mtok: 0.2, context_window: 2048}")
    assert "max_output_tokens 4,096 (the default: none is given) is over context_window 2,048" in str(ei.value), ei.value
    assert load("tiny: {kind: text, input_per_mtok: 0.1, output_per_mtok: 0.2, context_window: 2048, "
                "max_output_tokens: 2048}").providers["openai"].models["tiny"].max_output_tokens == 2048

@pytest.mark.parametrize("entry, field", [
    # Refused before by their ranges: a batch price above the sync one needs a discount outside (0, 1).
    ("models: {gpt-5.4-mini: {input_per_mtok: -0.75}}", "models.gpt-5.4-mini.input_per_mtok"),
    ("batch_api: {discount: 1.5}", "batch_api.discount"),
    ("batch_api: {discount: -0.5}", "batch_api.discount"),
    ("flex: {discount: 1.0}", "flex.discount"),
    ("models: {gpt-5.4-mini: {prompt_cache: {read_multiplier: 1.5}}}", "models.gpt-5.4-mini.prompt_cache.read_multiplier"),
])
def test_an_overlays_price_out_of_its_range_is_refused_naming_it(tmp_path, entry, field):
    overlay = tmp_path / "overlay.yaml"
    overlay.write_text(f"providers:\n  openai:\n    {entry}\n")
    with pytest.raises(CatalogError, match=f"field 'providers.openai.{field}'"):
        load_catalog(None, overlay)


def test_every_model_of_the_packaged_catalog_keeps_its_cap_within_its_window():
    for prov in CAT.providers.values():
        for m in prov.models.values():
            assert m.context_window is None or m.max_output_tokens <= m.context_window


def test_http_providers_need_their_key_and_plan_with_the_real_cancel_time(monkeypatch):
    settings = Settings(providers=ProvidersSettings(mode="http"))
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ConfigError, match="OPENAI_API_KEY") as exc:
        http_setup(CAT, settings)
    # One key alone: the way to call that provider alone (the other's requests are then refused, not simulated).
    assert "SMARTBATCH_PROVIDERS__ENDPOINTS__ANTHROPIC__API=anthropic names its endpoint alone" in str(exc.value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fake")
    cat, keys = http_setup(CAT, settings)
    assert set(keys) == {"openai", "anthropic"} and "sk-test-fake" not in repr(keys)
    # A key no header can carry (a pasted line break): every call failed unsent and read as possibly billed.
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake\n")
    with pytest.raises(ConfigError, match="the API key in OPENAI_API_KEY holds") as exc:
        http_setup(CAT, settings)
    assert "sk-test" not in str(exc.value)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake")
    assert cat.provider("openai").batch_api.cancel_s == 600.0  # a real cancel takes up to 10 min
    assert cat.provider("google").batch_api.cancel_s == 0.0  # simulated: cancels at once
    assert CAT.provider("openai").batch_api.cancel_s == 0.0  # the packaged catalog is untouched
    with pytest.raises(ValidationError, match="base_url"):
        ProvidersSettings.model_validate({"endpoints": {"x": {"api": "openai", "api_key_env": "K", "base_url": "ftp://x"}}})


def test_a_missing_key_of_an_endpoint_no_shell_can_name_says_the_setting_a_shell_can_give(monkeypatch):
    """An endpoint named as docs/providers.md's example (``local-vllm``) was told to set
    SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL-VLLM__API_KEY_ENV, which no shell exports (a dash): a helper's tour. It is
    told the JSON form's field; a name a shell takes keeps its variable."""
    monkeypatch.setenv("OPENAI_API_KEY", "k")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "k")
    monkeypatch.delenv("VLLM_KEY", raising=False)
    for name, said in (("local-vllm", '"api_key_env": "..." in its entry of SMARTBATCH_PROVIDERS__ENDPOINTS (JSON)'),
                       ("local_vllm", "SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL_VLLM__API_KEY_ENV,")):
        cat = Catalog.model_validate({"schema_version": CAT.schema_version, "providers": {
            **{k: v.model_dump() for k, v in CAT.providers.items()},
            name: {"models": {"llama-3.1-8b": {"kind": "text", "input_per_mtok": 0.02, "output_per_mtok": 0.05}}}}})
        ends = {"openai": {}, "anthropic": {},
                name: {"api": "openai", "base_url": "http://127.0.0.1:8000/v1", "api_key_env": "VLLM_KEY"}}
        with pytest.raises(ConfigError) as exc:
            http_setup(cat, Settings.model_validate({"providers": {"mode": "http", "endpoints": ends}}))
        assert said in str(exc.value) and "LOCAL-VLLM" not in str(exc.value), str(exc.value)


def test_the_hedge_of_a_real_batch_leaves_room_for_its_cancel(monkeypatch):
    from policies import load_policy

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-fake")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test-fake")
    real, _ = http_setup(CAT, Settings(providers=ProvidersSettings(mode="http")))
    sim_p, real_p = load_policy("smart", CAT), load_policy("smart", real)
    spec = CAT.model("openai", "gpt-5-mini")
    lead_sim = sim_p._hedge_lead(sim_p._text_consts(CAT.provider("openai"), spec, "gpt-5-mini"), 256, 1)
    lead_real = real_p._hedge_lead(real_p._text_consts(real.provider("openai"), spec, "gpt-5-mini"), 256, 1)
    assert lead_real - lead_sim == pytest.approx(600.0)


def test_dry_run_prints_the_plan_and_sends_nothing(tmp_path):
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "200", "--seed", "3", "--out", str(trace)]).exit_code == 0
    with Emulator(CAT, latency_scale=0) as emu:
        r = runner.invoke(app, ["run", str(trace), "--providers", "http", "--dry-run",
                                "--base-url", f"openai={emu.base_url('openai')}",
                                "--base-url", f"anthropic={emu.anthropic_base_url('anthropic')}"],
                          env={"OPENAI_API_KEY": "", "ANTHROPIC_API_KEY": "", "COLUMNS": "200"})
        assert r.exit_code == 0, r.output
        assert emu.calls == []  # nothing was sent
    assert "dry run: 200 requests, nothing sent" in r.output
    assert "openai" in r.output and "http" in r.output and "simulated" in r.output
    assert "/v1/chat/completions" in r.output  # the sample body of the OpenAI route


def test_the_dry_run_plans_the_hedges_of_a_run_at_its_speedup():
    """``run --dry-run`` estimates the run it stands for: at ``--speedup`` the engine plans each hedge its
    real-time lag earlier (``with_hedge_lag``), and so does the plan."""
    from engine.app.live import dry_run
    from engine.app.provider_setup import with_hedge_lag
    from engine.core.tracegen import synth
    from engine.sim.simulator import simulate
    from policies import load_policy

    reqs = synth(300, seed=2, duration_s=3600.0)
    s = Settings()
    costs = {sp: dry_run(reqs, catalog=CAT, settings=s, speedup=sp)["cost_usd"] for sp in (0.0, 5000.0)}
    lagged = with_hedge_lag(CAT, s.hedge_lag_s, 5000.0)
    assert costs[0.0] == pytest.approx(simulate(reqs, load_policy("smart", CAT), catalog=CAT).total_cost, abs=1e-6)
    assert costs[5000.0] == pytest.approx(simulate(reqs, load_policy("smart", lagged), catalog=lagged).total_cost,
                                          abs=1e-6)
    assert costs[5000.0] != pytest.approx(costs[0.0], abs=1e-6)  # 2,500 s less room for batches: another plan


def test_run_refuses_a_bad_providers_flag(tmp_path):
    trace = tmp_path / "t.jsonl"
    trace.write_text(json.dumps({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5}) + "\n")
    r = runner.invoke(app, ["run", str(trace), "--providers", "live"])
    assert r.exit_code == 2 and "--providers 'live'" in r.output
    r = runner.invoke(app, ["run", str(trace), "--base-url", "nowhere"])
    assert r.exit_code == 2 and "NAME=URL" in r.output


def test_a_provider_named_with_capitals_is_told_the_json_form_no_variable_lowercases(monkeypatch):
    """A variable's name is read lower case (SMARTBATCH_PROVIDERS__ENDPOINTS__TOGETHER__API makes ``together``), so
    an overlay's provider ``Together`` was told to set the variables that make ``together``, which its requests never
    reach: a loop (a review, rvtour84). It is told the JSON form, as a dashed name is."""
    from engine.core._settings_providers import add_endpoint, endpoint_setting

    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__TOGETHER__API", "openai")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__TOGETHER__API_KEY_ENV", "K")
    assert "together" in load_settings().providers.endpoints and "Together" not in load_settings().providers.endpoints
    said = add_endpoint("Together")
    assert "__TOGETHER__" not in said and 'SMARTBATCH_PROVIDERS__ENDPOINTS=\'{"Together": {"api": "openai"' in said, said
    said = endpoint_setting("Together", "api_key_env")  # a key's refusal, which names providers.endpoints.Together
    assert said == '"api_key_env": "..." in its entry of SMARTBATCH_PROVIDERS__ENDPOINTS (JSON)', said
    assert endpoint_setting("together", "api") == "SMARTBATCH_PROVIDERS__ENDPOINTS__TOGETHER__API"
