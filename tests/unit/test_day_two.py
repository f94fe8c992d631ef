"""What a new user met on a second day with the README (a helper's tour, stop 75): flags together, a budget both
in the settings and on the command line, a dry run under a budget. Each test is one trip."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from engine.app.cli import app

runner = CliRunner()


def _trace(tmp_path, n: int = 3):
    p = tmp_path / "t.jsonl"
    p.write_text("".join(f'{{"id":"r{i}","arrival_s":{i},"tenant":"acme","model":"gpt-5-mini","prompt":"say {i}",'
                         f'"deadline_s":7200}}\n' for i in range(n)))
    return p


@pytest.mark.parametrize("flags, spec, says", [
    (["--budget", "1"], '[{"max_budget": 5}]', "budget_usd (--budget) covers 'global'"),
    (["--tenant-budget", "acme=1"], '[{"tenant": "acme", "max_budget": 5}]', "tenant 'acme' (--tenant-budget)"),
])
def test_a_budget_flag_that_covers_a_budget_of_the_settings_names_the_flag_and_the_variable(tmp_path, flags, spec,
                                                                                           says):
    """`SMARTBATCH_BUDGETS__SPECS='[{"max_budget": 5}]' smartbatch bench t.jsonl --budget 1` said "--budget-duration
    None: budgets.specs: two budgets cover ['global']; merge them into one": a flag not given, quoting None, and
    not where the other budget was."""
    r = runner.invoke(app, ["bench", str(_trace(tmp_path)), "--policies", "naive", *flags,
                            "--out", str(tmp_path / "o")], env={"SMARTBATCH_BUDGETS__SPECS": spec})
    assert r.exit_code == 2, r.output
    assert says in r.output and "SMARTBATCH_BUDGETS__SPECS" in r.output, r.output
    assert "--budget-duration" not in r.output and "None" not in r.output, r.output


def test_a_dry_run_under_a_budget_says_how_many_requests_the_budget_would_refuse_and_why(tmp_path):
    """`smartbatch run t.jsonl --dry-run --budget 0.05` printed "estimated $0.0000" and a row of zeros per provider:
    every request was refused by the budget (each reserves the model's maximum output), which the plan did not
    show, so it read as a run that costs nothing."""
    r = runner.invoke(app, ["run", str(_trace(tmp_path)), "--dry-run", "--budget", "0.05"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    head = next(line for line in r.output.splitlines() if "provider" in line and "requests" in line)
    row = next(line for line in r.output.splitlines() if line.lstrip("│ ").startswith("openai"))
    cols = [c.strip() for c in head.strip("│┃ ").replace("┃", "│").split("│")]
    got = dict(zip(cols, (c.strip() for c in row.strip("│ ").split("│"))))
    assert got["requests"] == "3" and got["refused"] == "3", r.output
    assert "3 requests the budgets would refuse (budget_exhausted 3)" in r.output, r.output
    assert "budget global has $0.050000 left" in r.output, r.output


def test_a_commands_error_in_a_log_or_a_pipe_is_its_one_error_line(tmp_path):
    """`smartbatch bench t.jsonl --policies nope 2> err.log` wrote an empty line, then the `error:` line: rich's
    progress bar, drawn on no terminal, ends with a newline. The README: every command error is one line."""
    r = runner.invoke(app, ["bench", str(_trace(tmp_path)), "--policies", "nope", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and r.output.startswith("error: unknown policy 'nope'"), repr(r.output)
    assert len(r.output.strip().splitlines()) == 1, r.output


def _asked_in_an_hourly_window(limit: float, spent: float, priority: str, claim_usd: float):
    """A claim of ``claim_usd`` at ``priority`` a minute into an hourly window of ``limit`` with ``spent`` settled:
    the ledger's verdict, its words, the book and the window's bounds."""
    import calendar

    from engine.core.budgets import BudgetSpec, Claim, Throttle, window_bounds
    from engine.core.ledger import BudgetBook

    start, end = window_bounds("1h", float(calendar.timegm((2026, 11, 29, 10, 0, 0))))
    book = BudgetBook([BudgetSpec(max_budget=limit, budget_duration="1h")], Throttle(pace=False))
    if spent:
        assert book.reserve_many([Claim("u", "acme", "openai", "gpt-5", "urgent", spent)], start + 60)[0].ok
        book.settle_many([("u", spent)])
    v = book.reserve_many([Claim("n", "acme", "openai", "gpt-5", priority, claim_usd)], start + 60)[0]
    return v, v.why(claim_usd), book, start, end


@pytest.mark.parametrize("limit, spent, claim_usd, priority, when", [
    (0.004, 0.0039, 0.001, "normal", "when the window resets"),
])
def test_a_request_a_spent_budget_defers_is_not_told_ways_that_would_not_pass_it(limit, spent, claim_usd, priority,
                                                                                 when):
    """`smartbatch budget set --max 0 --duration 1h`, then a call: its 429 said "... could go only at t=3600s, when
    the window resets, after its deadline: send it urgent (it may spend the whole limit), give it a later deadline,
    raise the budget, or raise that fraction": no fraction was named, an urgent request is refused alike (the money
    left is short of what it reserves), and no window's reset lets a request dearer than the limit pass. Only the
    ways that pass it are said."""
    v, why, *_ = _asked_in_an_hourly_window(limit, spent, priority, claim_usd)
    assert v.reason == "deferred" and when in why, why
    assert why.endswith(": give it a later deadline or raise the budget; a lower max_tokens reserves less "
                        "(docs/budgets.md)"), why
    assert "send it urgent" not in why and "raise that fraction" not in why, why


def test_trace_from_openai_batch_calls_the_bad_lines_of_a_batch_file_batch_file_lines(tmp_path):
    """`smartbatch trace from-openai-batch in.jsonl` said "2 invalid trace line(s)" of an OpenAI batch file, where
    `smartbatch batch in.jsonl` says "2 invalid batch file line(s)" of the same file."""
    import json

    src = tmp_path / "in.jsonl"
    line = {"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "gpt-nope", "messages": [{"role": "user", "content": "hi"}]}}
    src.write_text("\n".join([json.dumps(line), json.dumps({**line, "custom_id": "b"})]) + "\n")
    r = runner.invoke(app, ["trace", "from-openai-batch", str(src), "--out", str(tmp_path / "t.jsonl")])
    assert r.exit_code == 2 and "2 invalid batch file line(s)" in r.output and "trace line" not in r.output, r.output


def test_bench_over_seeds_under_a_budget_shows_what_each_policy_refused(tmp_path):
    """`bench --seeds 3 --budget 0.2 --policies naive,smart` printed naive "$0.0000" and smart "+$0.0057 vs naive",
    smart read as the dearer, with nothing saying that naive's budget refused every request (the single seed's
    table has its "rejected" column): the seeds' table and results.md now count each policy's refusals."""
    r = runner.invoke(app, ["bench", str(_trace(tmp_path, 6)), "--policies", "naive,smart", "--seeds", "2",
                            "--budget", "0.001", "--out", str(tmp_path / "o")], env={"COLUMNS": "250"})
    assert r.exit_code == 0, r.output
    head = next(line for line in r.output.splitlines() if "policy" in line)
    naive = next(line for line in r.output.splitlines() if line.lstrip("│ ").startswith("naive"))
    assert head.rstrip("┃ ").endswith("refused") and naive.rstrip("│ ").endswith("6.0"), r.output
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| refused |" in md and '"refused": requests the budgets refused' in md, md
    r = runner.invoke(app, ["bench", str(_trace(tmp_path, 6)), "--policies", "naive,smart", "--seeds", "2",
                            "--out", str(tmp_path / "p")], env={"COLUMNS": "250"})
    assert r.exit_code == 0 and "refused" not in r.output, r.output  # a run without budgets: as before


@pytest.mark.parametrize("args, says", [
    ([], "--speedup 100: provider openai is called at its own API"),  # run's default speedup
    (["--speedup", "10", "--base-url", "openai=http://127.0.0.1:9/openai/v1"], "provider anthropic is called"),
    (["--speedup", "10", "--base-url", "openai=https://llm.example.com/v1", "--base-url",
      "anthropic=http://127.0.0.1:9/anthropic"], "provider openai is called at https://llm.example.com/v1"),
])
def test_a_run_against_a_real_api_is_refused_at_a_speedup_other_than_1(tmp_path, monkeypatch, args, says):
    """The README's real-provider lines export SMARTBATCH_PROVIDERS__MODE=http; `smartbatch run trace.jsonl`
    without `--speedup 1` then ran the real APIs at run's default 100x (the help: "higher only against simulated
    or emulated providers"): deadlines, hedges and the flex tier's timeout 100 times short of the providers' own
    time, batches cancelled within a minute and flex calls given up as maybe billed. Refused before anything is
    anything is sent; `--dry-run` plans all the same and says the real run would stop on it, as it says of a
    missing key; `--speedup 1` or loopback servers (the emulator) go on."""
    import engine.app.driver as driver

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: pytest.fail("Ray was started for a run refused"))
    trace = _trace(tmp_path)
    r = runner.invoke(app, ["run", str(trace), "--providers", "http", *args, "--dry-run"], env={"COLUMNS": "300"})
    said = " ".join(r.output.split())
    assert r.exit_code == 0 and "the real run would stop at its start: --speedup" in said and says in said, r.output
    r = runner.invoke(app, ["run", str(trace), "--providers", "http", *args, "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and says in r.output and "give --speedup 1" in r.output, r.output
    for ok in (["--speedup", "1"], ["--base-url", "openai=http://127.0.0.1:9/openai/v1", "--base-url",
                                    "anthropic=http://127.0.0.1:9/anthropic"]):
        r = runner.invoke(app, ["run", str(trace), "--providers", "http", "--dry-run", *ok])
        assert r.exit_code == 0 and "would stop" not in r.output, r.output


@pytest.mark.parametrize("command", [["bench"], ["batch"], ["trace", "from-openai-batch"], ["trace", "from-mooncake"]])
def test_a_compressed_input_is_named_as_such_once_not_as_lines_that_are_not_utf8(tmp_path, command):
    """`smartbatch bench trace.jsonl.gz` (or `batch`, or a builder) said "trace.jsonl.gz:1: field 'line': not UTF-8
    text (byte 0x8b at column 2); save the file as UTF-8", and a line so for each line of the compressed bytes
    (with --skip-invalid, `batch` said "no line can be answered"): one error now names the file's format and the
    tool that opens it."""
    import gzip

    packed = tmp_path / "in.jsonl.gz"
    packed.write_bytes(gzip.compress(_trace(tmp_path, 50).read_bytes()))
    out = ["--out", str(tmp_path / ("o" if command == ["bench"] else "o.jsonl"))]
    skips = ([],) if command == ["trace", "from-mooncake"] else ([], ["--skip-invalid"])  # no such flag there
    for skip in skips:
        r = runner.invoke(app, [*command, str(packed), *out, *skip])
        assert r.exit_code == 2, r.output
        assert r.output.strip() == (f"error: {packed}: field 'file': gzip-compressed, not text: decompress it first "
                                    "(gunzip in.jsonl.gz) and give the file it writes"), r.output


def test_a_trace_read_from_a_pipe_is_read_as_before_the_compressed_file_check(tmp_path):
    """`smartbatch bench <(gunzip -c trace.jsonl.gz)`, the way on that the compressed-file error points to, said
    "/dev/fd/63: cannot read it: None": the check read the file's first bytes and seeked back, which a pipe
    cannot. A pipe is read as any file (a review of stop 75)."""
    import json
    import os
    import threading

    data = _trace(tmp_path, 50).read_bytes()
    r, w = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(w, data), os.close(w)))  # more than one read's worth
    writer.start()
    try:
        got = runner.invoke(app, ["bench", f"/dev/fd/{r}", "--policies", "naive", "--out", str(tmp_path / "o")])
    finally:
        writer.join()
        os.close(r)
    assert got.exit_code == 0, got.output
    assert json.loads((tmp_path / "o" / "results.json").read_text())["requests"] == 50, got.output


_LESS = ("; or reserve less: a lower max_tokens (max_output_tokens), or budgets.reserve_output: request, which "
         "reserves its output_tokens rather than the model's maximum")


@pytest.mark.parametrize("limit, spent, claim_usd, priority, ways", [
    # dearer than the whole limit: no window, so no later deadline, passes it
    (0.0, 0.0, 0.128, "normal", "more than the whole limit of $0.000000: it could go in no window: raise the "
                                "budget or give it a lower max_tokens, which reserves less"),
    (0.004, 0.0039, 0.128, "background", "it could go in no window: raise the budget or give it a lower "
                                       "max_tokens, which reserves less"),
    # dearer than background's share (0.8 of $0.004) unpaced: a reset gives it no more; urgent passes it now
    (0.004, 0.0, 0.0035, "background", "more than background work may reach in any window: send it urgent (it "
                                       "may spend the whole limit), raise that fraction (budgets.throttle.background)"
                                       ", or raise the budget" + _LESS),
    # the same, short of the money left: urgent work would be refused at once (it is never deferred)
    (0.004, 0.001, 0.0035, "background", "more than background work may reach in any window: raise that fraction "
                                         "(budgets.throttle.background) and give it a later deadline, or raise the "
                                         "budget" + _LESS),
])
def test_a_request_no_window_passes_at_its_priority_is_not_told_a_later_deadline_or_the_reset_passes_it(
        limit, spent, claim_usd, priority, ways):
    """A request dearer than the whole limit was told "it could go in no window: give it a later deadline or raise
    the budget"; one dearer than its priority's share (background may reach $0.0032 of $0.004) "could go only at
    t=3600s, when the window resets, ...: give it a later deadline": the reset gives it the same share, so neither
    passes it (a review of stop 75). The ledger's own answer at the reset is checked, not only the words."""
    from engine.core.budgets import Claim

    v, why, book, start, end = _asked_in_an_hourly_window(limit, spent, priority, claim_usd)
    assert v.reason == "deferred" and why.endswith(f"{ways} (docs/budgets.md)"), why
    assert "later deadline or" not in why and "when the window resets" not in why, why
    assert not book.reserve_many([Claim("m", "acme", "openai", "gpt-5", priority, claim_usd)], end + 1)[0].ok
    if "send it urgent" in why:
        assert book.reserve_many([Claim("x", "acme", "openai", "gpt-5", "urgent", claim_usd)], start + 60)[0].ok


def test_batch_and_serve_refuse_a_speedup_against_a_real_api_and_an_empty_name_before_anything_starts(
        tmp_path, monkeypatch):
    """`batch --providers http --speedup 10` was refused by the engine's start, after `prepare` had taken back an
    earlier run's journal (cancelling its batches under way at the provider, with --resume or --overwrite);
    `serve` said it, and `serve --name ""` its empty name, after a killed endpoint's rescue and a Ray started for
    nothing (a review of stop 75)."""
    import json
    import tempfile

    import engine.app.cli_batch as cli_batch
    import engine.app.cli_serve as cli_serve

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # serve's name claims
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setattr(cli_batch, "prepare", lambda *a, **k: pytest.fail("an earlier run's journal was taken "
                                                                          "back (its batches cancelled) first"))
    monkeypatch.setattr(cli_serve, "prepare_endpoint", lambda *a, **k: pytest.fail("an endpoint's rescue ran first"))
    monkeypatch.setattr(cli_serve, "init_ray", lambda *a, **k: pytest.fail("Ray was started for a refused serve"))
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "gpt-5-mini", "messages": [{"role": "user", "content": "hi"}]}}) + "\n")
    says = "--speedup 10: provider openai is called at its own API"
    r = runner.invoke(app, ["batch", str(src), "--providers", "http", "--speedup", "10", "--resume",
                            "--out", str(tmp_path / "o.jsonl")])
    assert r.exit_code == 2 and says in r.output and "give --speedup 1" in r.output, r.output
    r = runner.invoke(app, ["serve", "--providers", "http", "--speedup", "10"])
    assert r.exit_code == 2 and says in r.output, r.output
    r = runner.invoke(app, ["serve", "--name", " "])
    assert r.exit_code == 2 and r.output.startswith("error: --name ' ': give a non-empty name"), r.output


def test_an_engine_checked_at_the_emulator_by_the_sdk_variables_sends_its_actors_there(monkeypatch):
    """OPENAI_BASE_URL and ANTHROPIC_BASE_URL naming the emulator passed the speed-up check in the driver, but the
    actors' SDKs read their own process's variables: on a Ray started elsewhere (`run --address auto` beside
    `smartbatch serve`, a cluster) they have none, and the providers' own APIs were called at 100x with the
    driver's keys (a review of stop 75; a scratch check: a task on a Ray started without OPENAI_BASE_URL saw None
    where its driver had it). The engine's start takes them into the endpoints its actors get."""
    import actors.remote
    import engine.app.driver as driver
    from engine.app.driver import Engine

    urls = {"openai": "http://127.0.0.1:9/openai/v1", "anthropic": "http://127.0.0.1:9/anthropic"}
    monkeypatch.setenv("OPENAI_BASE_URL", urls["openai"])
    monkeypatch.setenv("ANTHROPIC_BASE_URL", urls["anthropic"])
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-ant-test")
    monkeypatch.setenv("SMARTBATCH_PROVIDERS__MODE", "http")
    monkeypatch.setattr(driver, "init_ray", lambda *a, **k: False)  # a Ray this process is attached to

    class Started(Exception):
        pass

    got = {}

    def start_actors(pol, catalog, settings, *a, **k):
        got["endpoints"] = settings.providers.endpoints
        raise Started

    monkeypatch.setattr(actors.remote, "start_actors", start_actors)
    with pytest.raises(Started):
        Engine.start(speedup=100.0)
    assert {n: got["endpoints"][n].base_url for n in urls} == urls
