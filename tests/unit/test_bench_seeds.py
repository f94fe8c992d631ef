"""``bench --seeds``: every policy over several simulation seeds, summarised against the first one."""

import json
import math

import pytest
from typer.testing import CliRunner

from engine.app.bench import PolicySpec, places_for, run_bench
from engine.app.bench_seeds import run_seeds
from engine.app.cli import app
from engine.core.errors import SmartbatchError
from engine.core.tracegen import synth

SPECS = [PolicySpec(name="smart", policy="smart"), PolicySpec(name="naive", policy="naive"),
         PolicySpec(name="smart-long", policy="smart", params={"gather_p_loss": 0.2})]
SEEDS = [0, 1, 2]


@pytest.fixture(scope="module")
def trace():
    return synth(300, seed=5, duration_s=600.0)


@pytest.fixture(scope="module")
def doc(trace):
    return run_seeds(trace, SPECS, SEEDS, trace_name="t")


def test_the_summary_is_each_policys_mean_over_the_seeds_and_its_paired_difference_from_the_first(trace, doc):
    single = {seed: run_bench(trace, SPECS, trace_name="t", seed=seed) for seed in SEEDS}
    cost = {(s, r["policy"]): r["cost_usd"] for s, d in single.items() for r in d["results"]}
    assert [r["seed"] for r in doc["by_seed"]] == SEEDS
    assert doc["reference"] == "smart" and [s["policy"] for s in doc["summary"]] == ["smart", "naive", "smart-long"]
    # The seeds draw differently, or averaging them would mean nothing.
    assert len({cost[(s, "smart")] for s in SEEDS}) == len(SEEDS)
    for row in doc["summary"]:
        xs = [cost[(s, row["policy"])] for s in SEEDS]
        mean = sum(xs) / 3
        se = math.sqrt(sum((x - mean) ** 2 for x in xs) / 2 / 3)
        assert row["mean_cost_usd"] == pytest.approx(mean, abs=1e-9)
        assert row["se_cost_usd"] == pytest.approx(se, abs=1e-9)
        diffs = [cost[(s, row["policy"])] - cost[(s, "smart")] for s in SEEDS]
        assert row["mean_diff_vs_reference_usd"] == pytest.approx(sum(diffs) / 3, abs=1e-9)
        met = [next(r for r in single[s]["results"] if r["policy"] == row["policy"])["deadline_met_frac"]
               for s in SEEDS]
        assert row["min_deadline_met_frac"] == min(met)
        naive_met = [next(r for r in single[s]["results"] if r["policy"] == "naive")["deadline_met_frac"]
                     for s in SEEDS]
        assert row["seeds_below_naive"] == sum(m < n for m, n in zip(met, naive_met))
    ref = doc["summary"][0]
    assert ref["mean_diff_vs_reference_usd"] == 0 and ref["se_diff_vs_reference_usd"] == 0
    bounds = [single[s]["lower_bound_usd"] for s in SEEDS]
    assert doc["lower_bound_usd"] == pytest.approx(sum(bounds) / 3, abs=1e-9)


def test_runs_in_two_processes_give_the_same_document(trace, doc):
    done = []
    assert run_seeds(trace, SPECS, SEEDS, trace_name="t", jobs=2, on_progress=done.append) == doc
    assert done == SEEDS


def test_a_bad_policy_fails_before_any_run(trace):
    with pytest.raises(SmartbatchError, match="gather_p_loss"):
        run_seeds(trace, [SPECS[0], PolicySpec(name="x", policy="smart", params={"gather_p_loss": 7})], SEEDS,
                  trace_name="t", jobs=2)


def test_bench_with_seeds_writes_the_summary_and_refuses_zero_seeds(tmp_path):
    runner = CliRunner()
    trace = tmp_path / "t.jsonl"
    assert runner.invoke(app, ["trace", "synth", "--n", "200", "--seed", "3", "--out", str(trace)]).exit_code == 0
    out = tmp_path / "out"
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive,smart", "--seeds", "2", "--seed", "4",
                            "--out", str(out)])
    assert r.exit_code == 0, r.output
    doc = json.loads((out / "results.json").read_text())
    assert doc["seeds"] == [4, 5] and doc["reference"] == "naive"
    assert [s["policy"] for s in doc["summary"]] == ["naive", "smart"]
    md = (out / "results.md").read_text()
    assert "2 seeds: 4-5" in md and "| naive |" in md and "reference" in md
    # Seed by seed, each policy's cost as results.json has it; and the deadline baseline's column.
    by_seed = {run["seed"]: {r["policy"]: r for r in run["results"]} for run in doc["by_seed"]}
    for seed in (4, 5):
        row = next(line for line in md.splitlines() if line.startswith(f"| {seed} | "))
        nd = places_for(doc["naive_cost_usd"])
        assert row.split(" | ")[2].startswith(f"{by_seed[seed]['smart']['cost_usd']:.{nd}f} / "), row
    assert "seeds, fewer met than naive" in md and doc["summary"][0]["seeds_below_naive"] == 0
    assert "smart" in r.output and "±" in r.output
    r = runner.invoke(app, ["bench", str(trace), "--seeds", "0", "--out", str(out)])
    assert r.exit_code == 2 and "--seeds" in r.output


def test_the_seeds_run_at_the_traces_time_of_day(trace, monkeypatch):
    """A trace built from timestamps (``TraceRequests``) carries its time of day; each seed's run must see it,
    though the requests are copied into a list for the worker processes."""
    import engine.app.bench_seeds as bs
    from engine.core.trace import TraceRequests, with_day_origin

    seen = []
    real = bs.run_bench

    def spy(requests, specs, **kw):
        seen.append(with_day_origin(kw["settings"], requests).sim.day_origin_s)
        return real(requests, specs, **kw)
    monkeypatch.setattr(bs, "run_bench", spy)
    run_seeds(TraceRequests(trace, day_origin_s=86100.0), SPECS[:1], [0, 1], trace_name="t")
    assert seen == [86100.0, 86100.0]


def test_a_one_request_trace_is_said_as_one_request(tmp_path):
    # The tables and the builder's line said "1 requests".
    runner = CliRunner()
    trace, out = tmp_path / "one.jsonl", tmp_path / "out"
    r = runner.invoke(app, ["trace", "synth", "--n", "1", "--seed", "3", "--out", str(trace)])
    assert r.exit_code == 0 and "wrote 1 request to" in r.output, r.output
    r = runner.invoke(app, ["bench", str(trace), "--policies", "naive", "--seeds", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    said = " ".join(r.output.split()) + (out / "results.md").read_text()
    assert "1 request," in said and "1 requests" not in said, said
