"""What a new user tripped on in a tour of the README and docs (a helper's tour, stop 61): each test is one trip."""

from __future__ import annotations

import pytest

from engine.core.errors import ConfigError
from engine.core.settings import Settings, load_settings


@pytest.mark.parametrize("var, value, says", [
    ("SMARTBATCH_BUDGET__SPECS", '[{"max_budget": 0.01}]', "SMARTBATCH_BUDGETS"),  # the budget was never set
    ("SMARTBATCH_PROVIDER__MODE", "http", "SMARTBATCH_PROVIDERS"),                 # calls stayed simulated
    ("SMARTBATCH_LOGLEVEL", "DEBUG", "SMARTBATCH_LOG_LEVEL"),
    ("smartbatch_budget__specs", '[{"max_budget": 0.01}]', "SMARTBATCH_BUDGETS"),
])
def test_a_misspelt_setting_group_or_name_is_an_error_naming_the_right_one(monkeypatch, var, value, says):
    monkeypatch.setenv(var, value)
    for build in (load_settings, Settings):
        with pytest.raises(ConfigError) as ei:
            build()
        msg = str(ei.value)
        assert var in msg and f"did you mean {says}" in msg and "\n" not in msg


@pytest.mark.parametrize("var", ["SMARTBATCH_HTTP_KEY", "SMARTBATCH_DATA_DIR", "SMARTBATCH_REALTIME",
                                 "SMARTBATCH_EMULATOR_KEY"])
def test_variables_of_the_smartbatch_family_that_are_no_settings_pass(monkeypatch, var):
    monkeypatch.setenv(var, "x")
    assert load_settings().budgets.specs == ()


def test_a_driver_script_gets_the_settings_error_in_one_line_naming_the_variable(monkeypatch):
    # Engine.start, simulate and lower_bound built Settings() themselves: a bad value came out as pydantic's
    # report of a dozen lines, naming the field and not the variable to fix.
    from engine import Engine, default_catalog, lower_bound, simulate
    from engine.core.tracegen import synth
    from policies import load_policy

    requests = synth(5, seed=0)
    monkeypatch.setenv("SMARTBATCH_SIM__SEED", "abc")
    calls = [Engine.start, lambda: simulate(requests, load_policy("naive", default_catalog()), seed=0),
             lambda: lower_bound(requests, seed=0)]
    for call in calls:
        with pytest.raises(ConfigError) as ei:
            call()
        assert "SMARTBATCH_SIM__SEED" in str(ei.value) and "\n" not in str(ei.value)


def test_the_default_endpoints_take_a_base_url_alone_from_the_environment(monkeypatch):
    # Pointing a driver script at the emulator: the base URL alone was refused ("api: Field required").
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__BASE_URL", "http://127.0.0.1:8765/openai/v1")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__ANTHROPIC__BASE_URL", "http://127.0.0.1:8765/anthropic")
    eps = load_settings().providers.endpoints
    assert (eps["openai"].api, eps["openai"].api_key_env) == ("openai", "OPENAI_API_KEY")
    assert (eps["anthropic"].api, eps["anthropic"].api_key_env) == ("anthropic", "ANTHROPIC_API_KEY")
    assert eps["openai"].base_url == "http://127.0.0.1:8765/openai/v1"


def test_a_missing_setting_names_the_variable_to_set(monkeypatch):
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL__BASE_URL", "http://127.0.0.1:8000/v1")
    with pytest.raises(ConfigError) as ei:
        load_settings()
    msg = str(ei.value)
    assert "set SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL__API" in msg
    assert "set SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL__API_KEY_ENV" in msg
    monkeypatch.delenv("SMARTBATCH_PROVIDERS__ENDPOINTS__LOCAL__BASE_URL")
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", '[{"tenant": "acme", "max_budgt": 5}]')
    with pytest.raises(ConfigError, match="add 'max_budget' to the JSON of SMARTBATCH_BUDGETS__SPECS"):
        load_settings()


def test_a_misspelt_default_endpoints_variable_is_told_the_endpoint_it_may_mean(monkeypatch):
    # SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__BASE_URL was told to set ...OPNAI__API and ...OPNAI__API_KEY_ENV,
    # two more variables for the typo (a helper's tour of docs/providers.md); a new name is still told them.
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__BASE_URL", "http://127.0.0.1:8765/openai/v1")
    with pytest.raises(ConfigError) as ei:
        load_settings()
    msg = str(ei.value)
    assert "did you mean 'openai'?" in msg and "SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__" in msg, msg
    assert "from SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__BASE_URL" in msg and "set SMARTBATCH_" not in msg, msg
    monkeypatch.delenv("SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__BASE_URL")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__ANTROPIC__API", "anthropic")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__ENDPOINTS__ANTROPIC__API_KEY_ENV", "ANTHROPIC_API_KEY")
    assert "antropic" in load_settings().providers.endpoints  # given whole, a name of its own is taken as asked


def test_a_budget_rejection_says_what_the_request_reserves_and_how_to_reserve_less():
    # A $0.05 budget rejected a one-word gpt-5-mini request with "budget global has $0.050000 left": the
    # request reserved its model's whole output (128,000 tokens, $0.26), which the message did not say.
    from engine.core.budgets import BudgetSpec, Claim
    from engine.core.ledger import BudgetBook

    book = BudgetBook([BudgetSpec(max_budget=0.05)])
    (v,) = book.reserve_many([Claim("q1#0", "acme", "openai", "gpt-5-mini", "urgent", 0.256)], 0.0)
    assert v.reason == "budget_exhausted"
    why = v.why(0.256)
    assert "has $0.050000 left" in why and "reserves up to $0.256000" in why and "max_tokens" in why


@pytest.mark.parametrize(("reserve", "said", "unsaid"), [
    ("model_max", "the model's maximum", "output_tokens"),
    ("request", "its output_tokens", "the model's maximum"),
])
def test_a_budget_rejection_says_what_the_reservation_assumes_under_each_reserve_output(reserve, said, unsaid):
    # Under reserve_output: request the message said the model's maximum output was reserved, which it was not.
    from engine.core.budgets import BudgetSettings
    from engine.core.catalog import default_catalog
    from engine.core.request import Request
    from engine.core.settings import Settings, with_budget
    from engine.sim.simulator import simulate
    from policies import load_policy

    r = Request.model_validate({"id": "q1", "arrival_s": 0.0, "model": "gpt-5-mini", "input_tokens": 100,
                                "output_tokens": 20_000, "deadline_s": 60.0})
    s = with_budget(Settings(budgets=BudgetSettings(reserve_output=reserve)), 0.001)
    (why,) = simulate([r], load_policy("naive", default_catalog()), settings=s).extra["reject_why"].values()
    assert "reserves up to $" in why and said in why and unsaid not in why


def _variants(tmp_path, text):
    p = tmp_path / "variants.yaml"
    p.write_text(text)
    return p


def test_a_variants_file_with_a_misspelt_key_names_the_keys_a_variant_takes(tmp_path):
    from engine.app.bench import load_variants

    p = _variants(tmp_path, "variants:\n  - name: se\n    policy: smart\n    parms: {batch_gather_s: 0}\n")
    with pytest.raises(ConfigError, match=r"variants\[0\]\.parms: .*a variant takes name, policy and params"):
        load_variants(p)


def test_a_bad_variant_parameter_names_the_variant_the_near_name_and_the_value(tmp_path):
    # The error listed all 29 parameters of smart for a bad value too, and never said which variant it was.
    from engine.app.bench import load_variants, resolve_policies, run_bench
    from engine.core.tracegen import synth

    reqs = synth(5, seed=0)
    p = _variants(tmp_path, "variants:\n  - name: se\n    policy: smart\n    params: {batch_gather: 0}\n")
    with pytest.raises(ConfigError) as ei:
        run_bench(reqs, resolve_policies("naive,se", load_variants(p)), trace_name="t")
    msg = str(ei.value)
    assert msg.startswith("variant 'se' (policy smart)") and "did you mean 'batch_gather_s'" in msg
    p = _variants(tmp_path, "variants:\n  - name: se\n    policy: smart\n    params: {batch_gather_s: -5}\n")
    with pytest.raises(ConfigError) as ei:
        run_bench(reqs, resolve_policies("naive,se", load_variants(p)), trace_name="t")
    msg = str(ei.value)
    assert "variant 'se'" in msg and "batch_gather_s = -5" in msg and "warm_margin_s" not in msg


# A tour of stop 74 (a demanding new user): a driver's micro-batch of good and bad requests, the CLI.

def _validate(d: dict):
    from engine.core.catalog import default_catalog
    from engine.core.request import Request, validation_context

    return Request.model_validate({"arrival_s": 0, **d}, context=validation_context(default_catalog(), Settings()))


def test_an_empty_prompt_is_named_as_the_prompt_with_the_fix():
    # It was refused as field 'input_tokens' ("needs 'input_tokens' or a 'prompt'"), though a prompt was given.
    from engine.core.trace import _problems_of

    with pytest.raises(ValueError, match=r"prompt is empty; give the text to send") as ei:
        _validate({"id": "e", "model": "gpt-5.4-mini", "prompt": ""})
    assert [f for f, _ in _problems_of(ei.value, "the request")] == ["prompt"]
    with pytest.raises(ValueError, match=r"needs 'input_tokens' or a 'prompt'"):  # none given: as before
        _validate({"id": "n", "model": "gpt-5.4-mini"})


def test_a_policy_named_twice_in_policies_is_refused():
    # It ran twice and showed two rows of one policy (and, with --seeds, a paired difference from itself).
    from engine.app.bench import resolve_policies

    with pytest.raises(ConfigError, match=r"--policies names 'naive' twice; give each once"):
        resolve_policies("naive,smart, naive", {})
    assert [s.name for s in resolve_policies("naive,smart", {})] == ["naive", "smart"]


def test_the_warning_of_answers_billed_behind_a_refusal_is_red_not_its_markup(monkeypatch):
    # The CLI's console reads no markup (a tenant or an id may hold brackets), so the warning printed its tags,
    # "[red]2 request(s) billed ...[/red]", in the terminal's plain colour.
    from rich.console import Console

    import engine.app.cli_report as cli_report

    rec = Console(record=True, markup=False, force_terminal=True, color_system="standard", width=200)
    monkeypatch.setattr(cli_report, "console", rec)
    cli_report.print_providers({"engine_report": {"providers": {},
                                                  "billed_behind_refusal": {"requests": 2, "cost_usd": 0.375}}})
    out = rec.export_text(styles=True)
    assert "2 request(s) billed $0.375000 after their driver got a refusal" in out
    assert "[red]" not in out and "[/red]" not in out and "\x1b[31m" in out


def test_a_tenant_budget_for_a_tenant_whose_name_holds_an_equals_sign_is_taken():
    # A tenant may be named "team=a" (a request's tenant refuses only control characters), and the USD after the
    # last '=' has none: split at the first, "--tenant-budget team=a=5" was refused as no NAME=USD.
    from engine.app.cli import _budgets
    from engine.core.tracegen import synth

    reqs = [r.model_copy(update={"tenant": "team=a"}) for r in synth(3, seed=0)]
    settings = _budgets(Settings(), None, ["team=a=5"], None, reqs)
    (spec,) = settings.budgets.specs
    assert (spec.tenant, spec.max_budget) == ("team=a", 5.0)


def test_replay_checks_every_request_before_it_sends_any_and_takes_dicts(monkeypatch):
    # A bad request late in a replay raised when its arrival came, the earlier ones sent and the rest never; a
    # dict (what submit takes) raised AttributeError: 'dict' object has no attribute 'arrival_s'.
    from engine.core.errors import RequestError
    from engine.core.request import Request
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    good = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hi"},
                                  context=e._ctx)
    late = good.model_copy(update={"id": "late", "arrival_s": 5.0, "model": "no-such-model"})
    with pytest.raises(RequestError, match=r"request 'late' \(at 1 of the requests given.*field 'model'"):
        e.replay([good, late], on_submit=lambda n: e.clock.advance(10.0))
    assert e._futs == {}  # none sent
    futs = e.replay([{"id": "d1", "model": "gpt-5.4-mini", "prompt": "hi"},
                     {"id": "d0", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hello"}])
    assert [f._req.id for f in futs] == ["d1", "d0"] and len(e._futs) == 2


def test_budgets_of_tenants_whose_names_hold_a_budget_names_separators_are_kept_apart():
    # Tenant "a/1d" (never resets) and tenant "a" per 1d were both named "tenant=a/1d": one ledger window (and one
    # Redis key), so "a/1d" was held back by what "a" spent, and the settings refused the pair as one budget.
    from engine.core.budgets import BudgetSpec, Claim
    from engine.core.ledger import BudgetBook

    pairs = [(BudgetSpec(tenant="a/1d", max_budget=1.0), BudgetSpec(tenant="a", budget_duration="1d", max_budget=1.0)),
             (BudgetSpec(tenant="a,provider=openai", max_budget=1.0),
              BudgetSpec(tenant="a", provider="openai", max_budget=1.0)),
             (BudgetSpec(tenant=" acme", max_budget=1.0), BudgetSpec(tenant="acme", max_budget=1.0))]
    for x, y in pairs:
        assert x.name != y.name and x.key(0.0) != y.key(0.0), (x.name, y.name)
        Settings(budgets={"specs": [x.model_dump(), y.model_dump()]})  # two budgets, not "two cover one"
        book = BudgetBook([x, y])
        (v,) = book.reserve_many([Claim("r1", y.tenant, "openai", "gpt-5", "urgent", 0.8)], 0.0)
        assert v.ok
        (v,) = book.reserve_many([Claim("r2", x.tenant, "openai", "gpt-5", "urgent", 0.5)], 0.0)
        assert v.ok, (x.name, v)
    assert BudgetSpec(tenant="tenant-a", budget_duration="1d", max_budget=1).name == "tenant=tenant-a/1d"  # as before
    assert BudgetSpec(tenant="a/1d", max_budget=1).name == "tenant='a/1d'"


@pytest.mark.parametrize("flag", ["--catalog", "--catalog-overlay"])
def test_a_catalog_that_is_not_yaml_is_one_error_line_naming_the_place(tmp_path, flag):
    # A trace given as --catalog printed PyYAML's pointer, four lines of it, where every command error is one
    # line (as a broken variants file's already was).
    from typer.testing import CliRunner

    from engine.app.cli import app

    runner = CliRunner()
    trace = tmp_path / "t.jsonl"
    runner.invoke(app, ["trace", "synth", "--n", "5", "--out", str(trace)])
    r = runner.invoke(app, ["bench", str(trace), flag, str(trace), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and f"catalog {trace}:2:1: not valid YAML (expected '<document start>'" in r.output
    assert len(r.output.strip().splitlines()) == 1, r.output


def test_a_lone_surrogate_deep_in_a_body_is_named_by_its_path_and_itself():
    # "body is not valid Unicode (a lone surrogate such as \ud800)": which of fifty messages, and which character
    # (it was \udcff), the user had to find alone. The field stays the key the request gave it under.
    from engine.core.trace import _problems_of

    msgs = [{"role": "user", "content": "fine"}] * 3 + [{"role": "user", "content": [{"type": "text",
                                                                                       "text": "ab\udcffc"}]}]
    with pytest.raises(ValueError) as ei:
        _validate({"id": "s", "model": "gpt-5.4-mini", "body": {"messages": msgs}})
    ((field, msg),) = _problems_of(ei.value, "the request")
    assert field == "body"
    assert "body.messages[3].content[0].text is not valid Unicode (a lone surrogate, '\\udcff' at character 2)" in msg
    with pytest.raises(ValueError, match=r"prompt is not valid Unicode \(a lone surrogate, '\\ud800' at character 0\)"):
        _validate({"id": "s", "model": "gpt-5.4-mini", "prompt": "\ud800"})


@pytest.mark.parametrize("fields, said", [
    ({"priority": True}, "got true; give one of these"),
    ({"priority": None}, "got null; give one of these"),
    ({"reuse": False}, "got false; give one of these"),
    ({"tenant": None}, "must be a string, not null; write it in quotes"),
    ({"deadline_s": True}, "must be a number, not a boolean (true)"),
    # and in a list or an object (a review of stop 74: "[True, None]", "got [False]")
    ({"tenant": [True, None]}, "must be a string, not a list ([true, null])"),
    ({"priority": [False]}, "got [false]; give one of these"),
    ({"tenant": {"é": None}}, 'not an object ({"é": null})'),
])
def test_a_json_value_is_quoted_in_json_words_not_pythons(fields, said):
    # docs/traces.md: "Other JSON types are named in JSON's words"; a trace line's true and null were quoted back as
    # True and None, which the file does not hold.
    from engine.core.trace import _problems_of

    with pytest.raises(ValueError) as ei:
        _validate({"id": "j", "model": "gpt-5.4-mini", "prompt": "x", **fields})
    ((_, msg),) = _problems_of(ei.value, "the line")
    assert said in msg, msg


@pytest.mark.parametrize("params", [[], "", 0, False])
def test_params_that_are_empty_but_no_object_are_refused_as_a_non_empty_one_is(params):
    # "params": "x" was refused ("must be a JSON object"), while "", [], 0 and false read as no params at all.
    from engine.core.trace import _problems_of

    with pytest.raises(ValueError) as ei:
        _validate({"id": "p", "model": "gpt-image-1", "prompt": "a cat", "params": params})
    ((field, msg),) = _problems_of(ei.value, "the line")
    assert field == "params" and msg.startswith('must be a JSON object, e.g. {"size": "1024x1024"}, not '), msg
    assert _validate({"id": "p", "model": "gpt-image-1", "prompt": "a cat", "params": None}).params == {
        "size": "1024x1024"}  # null: not set, as before


def test_replay_refuses_an_id_given_twice_with_other_content_before_it_sends_any(monkeypatch):
    # A review of stop 74: replay checked each request alone before sending, so an id given again with other
    # content (in the list, or to this driver before) still raised when its arrival came, the first already sent.
    from engine.core.errors import RequestError
    from tests.unit.test_driver_tour import _bulk_engine

    e = _bulk_engine(monkeypatch)
    a = {"id": "x", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "hi"}
    with pytest.raises(RequestError, match=r"request 'x' \(at 1 of the requests given.*field 'id'.*other content"):
        e.replay([a, {**a, "arrival_s": 5.0, "prompt": "other"}], on_submit=lambda n: e.clock.advance(10.0))
    assert e._futs == {}  # none sent
    (f,) = e.replay([a])
    with pytest.raises(RequestError, match=r"already submitted id 'x' with other content"):
        e.replay([{"id": "y", "model": "gpt-5.4-mini", "prompt": "hi"}, {**a, "prompt": "other"}])
    assert list(e._futs) == [f._req.uid]  # y not sent either
    again = e.replay([{**a, "arrival_s": 3.0}, a], on_submit=lambda n: e.clock.advance(10.0))
    assert again == [f, f]  # the same content under its id: the same request, at any arrival


def test_the_path_of_a_lone_surrogate_is_made_only_for_the_one_found_and_can_be_printed():
    # A review of stop 74: each item pushed carried its path, made before any string was looked at; a key of
    # 20,000 characters over 5,000 numbers (a 30 KB body) made 100 MB of paths (160 KB: 2 GB and 1.4 s). A key
    # with a lone surrogate went into the message as it was, which no terminal or log could then encode.
    import tracemalloc

    from engine.core._checks import FieldProblem, check_text

    body = {"k" * 20_000: [0] * 5_000, "tools": [{"x": "fine"}] * 1_000}
    tracemalloc.start()
    try:
        check_text(body, "body")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, peak
    with pytest.raises(FieldProblem) as ei:
        check_text({"a": [{"b\udcff": "c\ud800"}]}, "body")
    assert str(ei.value).encode("utf-8")  # printable
    assert str(ei.value).startswith("body.a[0].b\\udcff is not valid Unicode (a lone surrogate, '\\ud800' at")
    with pytest.raises(FieldProblem, match=r"^body.a \(a key\) is not valid Unicode"):
        check_text({"a": {"\udcff": 1}}, "body")
    with pytest.raises(FieldProblem, match=r"^body\.x{37}\.\.\.\[1\] is not valid Unicode"):
        check_text({"x" * 500: ["ok", "\udcff"]}, "body")


@pytest.mark.parametrize("policy, said", [("naive,naive", "--policy 'naive,naive': run takes one policy"),
                                          ("naive,smart", "--policy 'naive,smart': run takes one policy"),
                                          (" , ", "--policy is empty; give e.g. --policy smart")])
def test_run_names_its_own_flag_for_a_policy_given_twice_or_none(tmp_path, policy, said):
    # A review of stop 74: run --policy naive,naive said "--policies names 'naive' twice; give each once", a flag
    # run has not, and the fix it gave (each once) still two policies where run takes one.
    from typer.testing import CliRunner

    from engine.app.cli import app

    trace = tmp_path / "t.jsonl"
    trace.write_text('{"id": "a", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "hi"}\n')
    r = CliRunner().invoke(app, ["run", str(trace), "--policy", policy, "--dry-run"])
    assert r.exit_code != 0 and said in " ".join(r.output.split()), r.output


@pytest.mark.parametrize("kw, field, says", [
    ({"deadline_s": -5}, "deadline_s", "omit it for the default"),
    ({"arrival_s": None}, "arrival_s", "is required; add it to the request"),
    ({"model": "gpt-5.4-mni"}, "model", "did you mean 'gpt-5.4-mini'"),
    ({"temprature": 0.2}, "temprature", "remove it or fix its spelling"),
])
def test_a_request_built_directly_says_what_submit_says(kw, field, says):
    # Request(**kw) raised pydantic's raw report ("1 validation error for Request ... [type=value_error, ...]",
    # a model's problem under no field at all) where submit() of the same dict names the field and the fix.
    d = {"id": "q1", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "Hi", "deadline_s": 600, **kw}
    d = {k: v for k, v in d.items() if v is not None}
    from engine import Request, RequestError

    with pytest.raises(RequestError) as ei:
        Request(**d)
    assert (ei.value.request_id, ei.value.field) == ("q1", field)
    msg = str(ei.value)
    assert msg.startswith(f"request 'q1': field '{field}': ") and says in msg, msg
    assert "validation error" not in msg and "[type=" not in msg and "\n" not in msg, msg
    with pytest.raises(ValueError):  # pydantic's error was one: a driver's ``except ValueError`` still catches it
        Request(**d)


def test_a_good_request_built_directly_or_validated_is_the_same_and_validate_keeps_its_error():
    from pydantic import ValidationError

    from engine import Request
    from engine.core.request import validation_context

    d = {"id": "q1", "arrival_s": 0.0, "model": "gpt-5.4-mini", "prompt": "Hi", "deadline_s": 600}
    assert Request(**d) == Request.model_validate(d)
    # model_validate (the trace reader's, the driver's, the endpoint's way in) keeps pydantic's error and its
    # list of every problem, and its context: a request of a catalog overlay's model is checked against it.
    with pytest.raises(ValidationError):
        Request.model_validate({**d, "deadline_s": -5}, context=validation_context())


def test_run_takes_reserve_output_as_bench_does_and_a_dry_run_reserves_by_it(tmp_path):
    # run had no --reserve-output (bench has): "No such option", and a tight budget refused every request
    # that reserved the model's maximum output, with no way to reserve its output_tokens from the command line.
    import typer
    from typer.testing import CliRunner

    from engine.app.cli import app

    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(f'{{"id": "r{i}", "arrival_s": 0, "model": "gpt-5.4-mini", "prompt": "Hi {i}", '
                             f'"output_tokens": 10}}\n' for i in range(3)))
    run = ["run", str(trace), "--dry-run", "--budget", "0.1"]
    refused = CliRunner().invoke(app, run)
    assert refused.exit_code == 0 and "3 requests the budgets would refuse" in refused.output, refused.output
    taken = CliRunner().invoke(app, [*run, "--reserve-output", "request"])
    assert taken.exit_code == 0 and "would refuse" not in taken.output, taken.output
    bad = CliRunner().invoke(app, [*run, "--reserve-output", "output"])
    assert bad.exit_code != 0 and "--reserve-output 'output': use model_max or request" in bad.output, bad.output
    commands = typer.main.get_command(app).commands
    helps = {n: next(p.help for p in commands[n].params if p.name == "reserve_output") for n in ("run", "bench")}
    assert helps["run"] == helps["bench"] and "model_max" in helps["run"]


def test_a_request_built_directly_of_a_model_the_packaged_catalog_lacks_says_how_to_check_it_against_an_overlay():
    # Request(**kw) reads the packaged catalog alone; the refusal of a model of the user's overlay told them to set
    # SMARTBATCH_CATALOG_OVERLAY, which it never reads (a review of stop 77).
    from engine import Request, RequestError

    with pytest.raises(RequestError) as ei:
        Request(id="q1", arrival_s=0, model="my-ft", prompt="Hi")
    said = str(ei.value)
    assert ei.value.field == "model" and "Request(**fields) checks the packaged catalog alone" in said, said
    assert "Request.model_validate(fields, context=validation_context(catalog))" in said and "submit" in said, said
