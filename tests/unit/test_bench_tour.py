"""A new user's tour of `bench` (a helper's, stop 62): what a user comparing policies on recorded traces before
trusting one with money runs into, each pinned here. No Ray; every bench is a handful of requests."""

import json

import pytest
from typer.testing import CliRunner

from engine.app.cli import app
from engine.core.errors import TraceError
from engine.core.trace import load_trace

runner = CliRunner()
AZURE_CSV = ("TIMESTAMP,ContextTokens,GeneratedTokens\n"
             "2023-11-16 18:15:46.6805900,374,44\n2023-11-16 18:15:50.9951690,396,109\n")
MOONCAKE = '{"timestamp": 0, "input_length": 6758, "output_length": 500, "hash_ids": [0, 1, 2]}\n' * 3


def _error_lines(output: str) -> list[str]:
    lines = output.splitlines()
    return lines[next(k for k, line in enumerate(lines) if line.startswith("error:")):]


# --- a file that is not a trace at all: the headline says so and names the builder -----------------------------

@pytest.mark.parametrize("name,text,builder", [("code.csv", AZURE_CSV, "trace from-azure"),
                                               ("raw.jsonl", MOONCAKE, "trace from-mooncake")])
@pytest.mark.parametrize("skip", [False, True])
def test_a_recorded_source_file_given_as_a_trace_names_its_builder_first(tmp_path, name, text, builder, skip):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        load_trace(path, skip_invalid=skip)
    first = info.value.problems[0]
    # Before: every line's "not valid JSON" (or "'timestamp' is not a request field") came first, and with
    # --skip-invalid the one line that said why (no requests) was the 51st, hidden under "... and 31 more".
    assert first[1] == 0 and first[2] == "file", info.value.problems[:2]
    assert "no requests" in first[3] and builder in first[3], first[3]
    # Since stop 82 (a helper's tour) the headline is the whole message: the lines' problems followed it.
    assert str(info.value).startswith(f"{path}: field 'file'") and len(info.value.problems) == 1, str(info.value)


def test_a_csv_of_unknown_columns_is_called_a_csv(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text("id,model,prompt\n1,gpt-5-mini,hello\n")
    with pytest.raises(TraceError) as info:
        load_trace(path)
    first = info.value.problems[0][3]
    assert "CSV" in first and "one JSON object per line" in first, first


def test_a_trace_with_one_good_line_still_lists_its_bad_lines_as_before(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi"}\nnot json\n')
    with pytest.raises(TraceError) as info:
        load_trace(path)
    assert [p[1] for p in info.value.problems] == [2]


def test_bench_of_an_azure_csv_says_so_in_its_first_lines(tmp_path):
    path = tmp_path / "code.csv"
    path.write_text(AZURE_CSV + "2023-11-16 18:15:51.1,10,10\n" * 40)
    r = runner.invoke(app, ["bench", str(path), "--policies", "naive", "--out", str(tmp_path / "o"),
                            "--skip-invalid"])
    assert r.exit_code == 2
    assert "smartbatch trace from-azure code.csv" in "\n".join(_error_lines(r.output)[:2]), r.output


# --- a variant's parameters have JSON types: "yes" is no boolean, "10" and true are no numbers -------------------

@pytest.mark.parametrize("params,field,said", [
    ({"reuse_exact": "yes"}, "reuse_exact", "true or false"),
    ({"reuse_near": 1}, "reuse_near", "true or false"),
    ({"batch_gather_s": "10"}, "batch_gather_s", "a number, not a string"),
    ({"min_on_time_p": True}, "min_on_time_p", "a number, not a boolean"),
    ({"gpu_max_wait_s": "30"}, "gpu_max_wait_s", "a number, not a string"),  # an optional number too
])
def test_a_variant_parameter_of_the_wrong_json_type_is_refused_naming_it(tmp_path, params, field, said):
    # Before, pydantic's lax mode took all of these: min_on_time_p: true ran smart at a probability of 1.0, and
    # results.json recorded the string or boolean as given.
    from engine.app.bench import PolicySpec, load_spec
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_spec(PolicySpec(name="v", policy="smart", params=params), default_catalog())
    text = str(info.value)
    assert f"parameter {field} = " in text and said in text and "Value error" not in text, text


def test_variant_parameters_of_the_right_types_still_load():
    from engine.app.bench import PolicySpec, load_spec
    from engine.core.catalog import default_catalog

    pol = load_spec(PolicySpec(name="v", policy="smart", params={
        "batch_gather_s": 0, "min_on_time_p": 0.5, "reuse_near": False, "gpu_max_wait_s": None,
        "near_guards": ["numbers"], "scheduling": {"order": "fifo"}}), default_catalog())
    assert pol.params.batch_gather_s == 0.0 and pol.params.near_guards == ("numbers",)
    fixed = load_spec(PolicySpec(name="f", policy="fixed", params={"max_batch_size": 8}), default_catalog())
    assert fixed.params.max_batch_size == 8


def test_a_number_in_exponent_notation_in_a_variants_file_is_a_number(tmp_path):
    # YAML 1.1 (PyYAML) reads 1e-4 as the string '1e-4': pydantic's lax mode took it as 0.0001, the JSON-type check
    # refused it, telling the user who wrote it bare to "write it bare, unquoted" (a review).
    from engine.app.bench import load_spec, load_variants
    from engine.core.catalog import default_catalog

    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  - {name: v, policy: smart, params: {min_batch_saving_usd: 1e-4, "
                    "batch_gather_s: 36E2, min_on_time_p: .5e-1, name_like: '1e-4'}}\n")
    spec = load_variants(path)["v"]
    assert spec.params["min_batch_saving_usd"] == 0.0001 and spec.params["batch_gather_s"] == 3600.0
    assert spec.params["min_on_time_p"] == 0.05 and spec.params["name_like"] == "1e-4"  # quoted: still a string
    spec = spec.model_copy(update={"params": {k: v for k, v in spec.params.items() if k != "name_like"}})
    assert load_spec(spec, default_catalog()).params.min_batch_saving_usd == 0.0001


def test_a_bad_variant_not_asked_for_is_refused_too_naming_it(tmp_path):
    """A variants file's bad entry failed only a bench that asked for it (a helper's tour): every variant of a
    registered policy is built once, and a module:Class variant (the user's code) is left for its run."""
    path = tmp_path / "v.yaml"
    path.write_text("variants:\n  - {name: good, policy: smart, params: {batch_gather_s: 60}}\n"
                    "  - {name: typo, policy: smart, params: {batch_gather: 60}}\n"
                    "  - {name: mine, policy: 'my_pkg.nowhere:Policy'}\n")
    trace = tmp_path / "t.jsonl"
    trace.write_text(GOOD)
    res = CliRunner().invoke(app, ["bench", str(trace), "--variants", str(path), "--policies", "naive,good",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code != 0 and "variant 'typo'" in res.output and "batch_gather" in res.output, res.output
    path.write_text("variants:\n  - {name: good, policy: smart, params: {batch_gather_s: 60}}\n"
                    "  - {name: mine, policy: 'my_pkg.nowhere:Policy'}\n")
    res = CliRunner().invoke(app, ["bench", str(trace), "--variants", str(path), "--policies", "naive,good",
                                   "--out", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output


# --- results record what they were made from: the lines skipped, the catalog and its overlay --------------------

GOOD = '{"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi", "input_tokens": 1000}\n'
OVERLAY = "providers:\n  openai:\n    models:\n      gpt-5-mini: {input_per_mtok: 0.20}\n"


@pytest.mark.parametrize("seeds", ["1", "2"])
def test_results_name_the_skipped_lines_and_the_catalog_overlay(tmp_path, seeds):
    trace, overlay, out = tmp_path / "t.jsonl", tmp_path / "prices.yaml", tmp_path / "o"
    trace.write_text(GOOD + '{"id": "b", "arrival_s": 1, "model": "gpt-6", "prompt": "x"}\n')
    overlay.write_text(OVERLAY)
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(out), "--skip-invalid",
                            "--catalog-overlay", str(overlay), "--seeds", seeds])
    assert r.exit_code == 0, r.output
    # Before, neither file said a line was left out, nor which prices made the figures: a report read later
    # (or beside another run's) could not tell, and the skipped lines past the first five were named nowhere.
    src = json.loads((out / "results.json").read_text())["source"]
    assert src["trace_file"] == str(trace) and src["skipped_lines"] == 1
    assert src["invalid_lines"] == [{"line": 2, "field": "model", "message": src["invalid_lines"][0]["message"]}]
    assert "gpt-6" in src["invalid_lines"][0]["message"]
    assert src["catalog"] == "packaged" and src["catalog_overlay"] == str(overlay)
    md = (out / "results.md").read_text()
    assert "1 invalid line(s) skipped" in md and "prices.yaml" in md, md


def test_run_records_the_skipped_lines_and_the_catalog_overlay_as_bench_does(tmp_path, monkeypatch):
    """`run` wrote no ``source`` (the tour's leftover): its results could not say which lines it left out nor which
    prices made them. The live engine stands in here for the simulator's run of the same policy."""
    import engine.app.cli as cli
    from engine.app.bench import run_bench

    def live(reqs, name, policy, speedup, address, seed, settings, cat, *, spec, shards, results):
        return run_bench(reqs, [spec], trace_name=name, catalog=cat, settings=settings, seed=seed)

    monkeypatch.setattr(cli, "_live", live)
    trace, overlay, out = tmp_path / "t.jsonl", tmp_path / "prices.yaml", tmp_path / "o"
    trace.write_text(GOOD + '{"id": "b", "arrival_s": 1, "model": "gpt-6", "prompt": "x"}\n')
    overlay.write_text(OVERLAY)
    r = runner.invoke(app, ["run", str(trace), "--policy", "naive", "--out", str(out), "--skip-invalid",
                            "--catalog-overlay", str(overlay)])
    assert r.exit_code == 0, r.output
    src = json.loads((out / "results.json").read_text())["source"]
    assert src["trace_file"] == str(trace) and src["skipped_lines"] == 1 and src["catalog_overlay"] == str(overlay)
    assert "1 invalid line(s) skipped" in (out / "results.md").read_text()


def test_a_plain_bench_keeps_its_results_md_and_records_the_packaged_catalog(tmp_path):
    trace, out = tmp_path / "t.jsonl", tmp_path / "o"
    trace.write_text(GOOD)
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--out", str(out)])
    assert r.exit_code == 0, r.output
    src = json.loads((out / "results.json").read_text())["source"]
    assert src == {"trace_file": str(trace), "skipped_lines": 0, "invalid_lines": [], "catalog": "packaged",
                   "catalog_overlay": None}
    assert "skipped" not in (out / "results.md").read_text() and "Catalog" not in (out / "results.md").read_text()


# --- the plot: no negative latencies, and its dollar figures as results.md prints them ---------------------------

def _small_doc() -> dict:
    from engine.app.bench import resolve_policies, run_bench
    from engine.core.trace import parse_trace_lines

    lines = [json.dumps({"id": f"r{k}", "arrival_s": 10 * k, "model": "gpt-5-mini", "prompt": f"task {k}",
                         "priority": "urgent" if k % 3 == 0 else "background"}) for k in range(12)]
    return run_bench(parse_trace_lines(lines).requests, resolve_policies("naive,batch-all,smart", {}),
                     trace_name="small")


def test_the_latency_panel_starts_at_zero_and_the_legend_has_results_md_figures(tmp_path):
    from engine.app._bench_output import _markdown, _plot

    doc = _small_doc()
    fig = _plot(doc, tmp_path / "plot.png")
    met_ax, lat_ax = fig.axes
    # Before: a symlog axis with ticks at -10 and -1 seconds, half of the panel for latencies that cannot be.
    assert lat_ax.get_xlim()[0] == 0, lat_ax.get_xlim()
    assert all(t.get_position()[0] >= 0 for t in lat_ax.get_xticklabels() if t.get_text())
    # Before: "naive $0.00" and "lower bound $0.00" in the legend of a trace results.md priced at $0.0051.
    legend = [t.get_text() for t in met_ax.get_legend().get_texts()]
    md = _markdown(doc)
    for text in legend:
        figure = text.rsplit("$", 1)[1]
        assert f"${figure}" in md, (legend, md.splitlines()[2])


def test_labels_stacked_over_the_dearest_point_stay_inside_the_panel(tmp_path):
    from engine.app._bench_output import _plot

    doc = _small_doc()
    for r in doc["results"]:  # three policies at naive's point, as naive, cache-only and fixed are on real traces
        r["cost_usd"], r["deadline_met_frac"], r["latency_s"] = doc["results"][0]["naive_cost_usd"], 1.0, {"p50": 2}
    fig = _plot(doc, tmp_path / "plot.png")
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        top = ax.get_window_extent(renderer).y1
        for label in ax.texts:  # before: they climbed over the frame into the panel's title
            assert label.get_window_extent(renderer).y1 <= top, label.get_text()


# --- --seeds: the deadline column says what it counts -----------------------------------------------------------

def test_the_seeds_deadline_column_says_it_counts_seeds_with_fewer_deadlines_met_than_naive():
    from engine.app.bench_seeds import seed_cells, seeds_markdown

    row = {"cost_usd": 1.0, "capture_of_achievable": 0.5, "capture_of_online": 0.5, "deadline_met_frac": 1.0}
    runs = [{"seed": s, "lower_bound_usd": 0.5, "online_bound_usd": 0.6, "naive_cost_usd": 2.0,
             "results": [dict(row, policy="naive", cost_usd=2.0, capture_of_achievable=0.0),
                         dict(row, policy="smart")]} for s in (0, 1)]
    summary = [{"policy": p, "mean_cost_usd": c, "se_cost_usd": 0.0, "mean_capture_of_achievable": k,
                "se_capture_of_achievable": 0.0, "seeds_with_capture": 2, "mean_capture_of_online": k,
                "min_deadline_met_frac": 1.0, "mean_deadline_met_frac": 1.0, "mean_diff_vs_reference_usd": c - 2.0,
                "se_diff_vs_reference_usd": 0.0, "seeds_below_naive": 0}
               for p, c, k in (("naive", 2.0, 0.0), ("smart", 1.0, 0.5))]
    doc = {"trace": "t", "requests": 2, "seeds": [0, 1], "reference": "naive", "lower_bound_usd": 0.5,
           "online_bound_usd": 0.6, "naive_cost_usd": 2.0, "summary": summary, "by_seed": runs}
    head, _ = seed_cells(doc)
    # Before: "seeds below naive", beside a cost column, read as "seeds that cost less than naive": smart,
    # cheaper than naive on every seed, showed 0 there.
    assert head[-1] == "seeds, fewer met than naive", head
    assert '"seeds, fewer met than naive" counts the seeds on which a policy met fewer deadlines than naive' \
        in seeds_markdown(doc)


# --- a value of the wrong JSON type is named in JSON's words, not Python's -------------------------------------

@pytest.mark.parametrize("field,value,said", [
    ("prefix_blocks", "1,2", "must be a JSON list, e.g. [0, 1, 2], not a string ('1,2')"),
    ("prefix_blocks", 5, "must be a JSON list, e.g. [0, 1, 2], not a number (5)"),
    ("params", "x", "must be a JSON object, e.g. {\"size\": \"1024x1024\"}, not a string ('x')"),
    ("id", 20, "must be a string, not a number (20); write it in quotes"),
    ("tenant", ["a"], 'must be a string, not a list (["a"]); write it in quotes'),
])
def test_a_field_of_the_wrong_json_type_is_named_in_json_terms(field, value, said):
    from engine.core.trace import parse_trace_lines

    line = {"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "x", field: value}
    with pytest.raises(TraceError) as info:
        parse_trace_lines([json.dumps(line)])
    (_, _, got_field, msg), = info.value.problems
    # Before: "Input should be a valid tuple" (a JSON file has no tuples), "... a valid dictionary".
    assert got_field == field and said in msg, msg


# --- an online bound below the offline one is explained where it is shown -------------------------------------

def test_results_md_explains_an_online_bound_below_this_seeds_offline_bound():
    from engine.app._bench_output import _markdown

    doc = _small_doc()
    doc["online_bound_usd"] = doc["lower_bound_usd"] * 0.9  # as a 5-line trace with one urgent Claude call gave
    # Before: "Lower bound: $0.0439 (online: $0.0437)" and a capture of online below the capture of achievable,
    # while docs/lower-bound.md called the online bound the offline one without hindsight.
    line = _markdown(doc).splitlines()[2]
    assert "below this seed's offline bound" in line and "an expectation" in line, line
    doc["online_bound_usd"] = doc["lower_bound_usd"] * 1.1
    assert "below this seed's" not in _markdown(doc)


# --- trace from-azure given JSON lines says which builder (or none) the file is for ------------------------------

@pytest.mark.parametrize("text,said", [
    (MOONCAKE, "smartbatch trace from-mooncake"),
    (GOOD, "already a trace"),
])
def test_from_azure_of_json_lines_names_the_right_command(tmp_path, text, said):
    from engine.core.tracegen import from_azure

    path = tmp_path / "x.jsonl"
    path.write_text(text)
    with pytest.raises(TraceError) as info:
        from_azure(path)
    (_, _, field, msg), = info.value.problems
    # Before: "missing column(s) [...], got ['{"timestamp": 0', ' "input_length": 6758', ...]": the JSON cut at
    # its commas, read as a CSV header.
    assert field == "file" and said in msg and "input_length\": 6758'" not in msg, msg


@pytest.mark.parametrize("params,said", [
    ({"turnaround": {"enabled": "no"}}, "turnaround.enabled must be true or false"),
    ({"scheduling": {"promote_s": True}}, "scheduling.promote_s must be a number, not a boolean"),
])
def test_a_nested_parameter_of_the_wrong_json_type_is_refused_too(params, said):
    from engine.app.bench import PolicySpec, load_spec
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError, match=said):  # before: "no" turned learning off, true promoted at 1 s
        load_spec(PolicySpec(name="v", policy="smart", params=params), default_catalog())


def test_a_misspelt_nested_key_is_matched_among_that_setting_s_own_keys():
    from engine.app.bench import PolicySpec, load_spec
    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        load_spec(PolicySpec(name="v", policy="smart", params={"turnaround": {"epoch": 300}}), default_catalog())
    text = str(info.value)
    # Before: "did you mean 'turnaround'? its parameters: band_p, batch_gather_s, ..." (smart's 29, not its keys)
    assert "did you mean 'epoch_s'?" in text and "turnaround's keys: " in text and "band_p" not in text, text


def test_an_id_used_again_under_another_tenant_is_refused_saying_ids_are_unique_across_tenants(tmp_path):
    """The engine keys a request by (tenant, id), a trace by id alone: a trace's second tenant reusing an id was
    refused as a plain duplicate, which read as wrong to a user who knows the engine's rule (the tour's leftover)."""
    path = tmp_path / "t.jsonl"
    path.write_text(GOOD + GOOD.replace('"id": "a"', '"id": "a", "tenant": "t2"') + GOOD)
    tr = load_trace(path, skip_invalid=True)
    assert [r.id for r in tr.requests] == ["a"] and tr.skipped == 2
    across, again = (p[3] for p in tr.problems)
    assert "under tenant 'default' there: a trace's ids are unique across tenants too" in across
    assert "unique across tenants" not in again and "duplicate id 'a' (first on line 1)" in again


# --- results.md gives the latency column's unit -------------------------------------------------------------------

def test_results_md_names_the_unit_of_its_latency_column():
    from engine.app._bench_output import _markdown

    header = next(line for line in _markdown(_small_doc()).splitlines() if line.startswith("| policy"))
    # Before: "latency p50 / p99 (urgent; normal; background)" over cells such as "2,562 / 4,760": seconds, unsaid
    # (the plot says seconds; a new user's tour, stop 79).
    assert "latency p50 / p99 s (urgent; normal; background)" in header, header
