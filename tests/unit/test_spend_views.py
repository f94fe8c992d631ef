"""What a user watching spend against budgets while a bulk job runs was shown, and misled by (a helper's tour of a
driver script, `smartbatch serve` and the endpoint against the emulator, stop 64)."""

from __future__ import annotations

import asyncio
import re

from actors import BudgetController
from engine.core.budgets import BudgetSettings, BudgetSpec, Claim
from engine.core.clock import ManualClock


def _claim(rid: str, tenant: str, amount: float, priority: str = "normal") -> Claim:
    return Claim(rid, tenant, "anthropic", "claude-haiku-5-5", priority, amount)


def test_the_reports_reserved_total_counts_each_open_claim_once_however_many_budgets_cover_it():
    # A global budget and a tenant's both cover a request: the tour's report said reserved_usd 0.011783 beside a
    # global budget holding 0.00656, the sum of every budget's reservations (a claim counted once per budget),
    # where spent_usd beside it counts each request once.
    specs = (BudgetSpec(max_budget=2.0, budget_duration="1d"), BudgetSpec(tenant="acme", max_budget=0.3),
             BudgetSpec(model="claude-haiku-5-5", max_budget=1.0))

    async def go():
        ctl = BudgetController(BudgetSettings(specs=specs), None, ManualClock(0.0))
        verdicts = await ctl.reserve_many([_claim("a#0", "acme", 0.004), _claim("b#0", "beta", 0.002)])
        assert all(v.ok for v in verdicts)
        await ctl.settle_many([("b#0", 0.001)])
        return await ctl.report()

    rep = asyncio.run(go())
    held = {row["budget"]: row["reserved_usd"] for row in rep["budgets"]}
    assert held == {"global/1d": 0.004, "tenant=acme": 0.004, "model=claude-haiku-5-5": 0.004}
    assert rep["reserved_usd"] == 0.004  # the open claim, once (0.012 before: once per covering budget)
    assert rep["spent_usd"] == 0.001


def _req(rid: str, arrival_s: float, priority: str, max_output_tokens: int, output_tokens: int, deadline_s: float):
    from engine.core.catalog import default_catalog
    from engine.core.request import Request, validation_context
    from engine.core.settings import Settings

    # gpt-5 at $10 per million output tokens: a sync claim is about max_output_tokens x $0.00001.
    return Request.model_validate({"id": rid, "arrival_s": arrival_s, "model": "gpt-5", "input_tokens": 100,
                                   "output_tokens": output_tokens, "max_output_tokens": max_output_tokens,
                                   "priority": priority, "deadline_s": deadline_s},
                                  context=validation_context(default_catalog(), Settings()))


# A $1 budget; a long call holds $0.50 of it for minutes; a normal request of $0.50 with a minute to go fits on the
# spend alone (0.50 <= 95 %), so it waits for that claim to settle, and is rejected once a call can no longer make
# its deadline. Its reason named the budget alone: "budget global held it back until it could no longer finish by
# its deadline". The tour saw 35 of 73 rejections say only that, naming a budget with $1.73 of $2 left.
LONG = _req("long", 0.0, "normal", 50_000, 40_000, 3600.0)
HELD = _req("held", 1.0, "normal", 50_000, 100, 60.0)


def _says_what_held_it(why: str) -> None:
    assert why.startswith("budget global held it back until it could no longer finish by its deadline: ")
    assert re.search(r"budget global has \$0\.(49|50)\d+ left beyond what requests under way reserve", why)
    assert "this request reserves up to $0.50" in why
    assert "a lower max_tokens reserves less" in why and "later deadline" in why and "docs/budgets.md" in why


def test_in_the_simulator_a_request_held_to_its_deadline_is_told_what_held_it_and_the_ways_on():
    from engine.core.catalog import default_catalog
    from engine.core.settings import Settings, with_budget
    from engine.sim.simulator import simulate
    from policies import load_policy

    cat = default_catalog()
    res = simulate([LONG, HELD], load_policy("naive", cat), catalog=cat, settings=with_budget(Settings(), 1.0))
    assert res.summary()["rejected"] == {"budget_exhausted": 1}
    (why,) = res.extra["reject_why"].values()
    _says_what_held_it(why)


def test_in_the_grouper_a_request_held_to_its_deadline_is_told_what_held_it_and_the_ways_on():
    from actors import Grouper, ResultHub
    from actors._types import Job
    from engine.core.catalog import default_catalog
    from policies import load_policy
    from tests.unit.helpers import Recorder
    from tests.unit.test_urgent_budget import settle_tasks

    async def go():
        cat, spec, clock = default_catalog(), BudgetSpec(max_budget=1.0), ManualClock(1.0)
        budget = BudgetController(BudgetSettings(specs=(spec,)), None, ManualClock(0.0))
        await budget.reserve_many([Claim("long", "default", "openai", "gpt-5", "normal", 0.5)])
        hub = ResultHub()
        g = Grouper(load_policy("naive", cat), cat, clock, {"openai": Recorder()}, budget, hub, budget_specs=(spec,))
        await g.add([Job(0, HELD, "held")])
        await settle_tasks(g)
        assert set(g.waits.held) == {HELD.uid}
        clock.advance(HELD.deadline_s)
        g._retry_parked()
        await settle_tasks(g)
        assert not g.waits.held
        return hub

    hub = asyncio.run(go())
    (res,) = [r for r in hub._recent.values() if r.id == "held"]
    assert (res.status, res.error) == ("rejected", "budget_exhausted")
    _says_what_held_it(res.reason)


def test_a_request_held_by_pacing_or_behind_more_urgent_work_to_its_deadline_is_told_which():
    from engine.core.ledger import BudgetBook
    from engine.runtime.waiting import Held, held_too_long

    book = BudgetBook([BudgetSpec(max_budget=2.0, budget_duration="1d")])
    assert book.reserve_many([_claim("u#0", "acme", 0.25, "urgent")], 60.0)[0].ok
    book.settle_many([("u#0", 0.25)])
    (v,) = book.reserve_many([_claim("n#0", "acme", 0.01)], 60.0)  # normal work may reach ~10 % this early
    assert v.reason == "deferred" and v.paced
    why = held_too_long(Held("n", HELD, 61.0, v.budget, None, 1, v, 0.01))
    assert why.startswith("budget global/1d held it back until it could no longer finish by its deadline: ")
    assert "of which normal work may reach $0.19" in why and "budgets.throttle.pace" in why
    assert f"could go at t={v.retry_at:.0f}s" in why and "reserves up to $0.010000" in why
    behind = held_too_long(Held("n", HELD, 61.0, "global/1d", None, 1))
    assert "more urgent work that this budget holds back goes first" in behind and "docs/budgets.md" in behind


def test_the_budgets_are_on_the_metrics_page_from_the_start_with_their_soft_limits():
    # Gauges are sent when they move: a scrape of a fresh engine had no smartbatch_budget_* sample at all until
    # its first reservation, and a dashboard's "remaining" panel was blank. A soft limit was on no metric, so an
    # alert on it had to copy the number from the settings.
    from actors import ResultHub

    specs = (BudgetSpec(max_budget=2.0, soft_budget=1.0, budget_duration="1d"), BudgetSpec(tenant="beta", max_budget=0.05))

    async def go():
        hub, seen = ResultHub(), asyncio.Event()
        observe = hub.observe_budget

        async def observed(*args):
            await observe(*args)
            seen.set()

        hub.observe_budget = observed
        ctl = BudgetController(BudgetSettings(specs=specs), hub, ManualClock(0.0))
        await ctl.check_ledger()  # the engine's start awaits it
        await asyncio.wait_for(seen.wait(), 10)
        ctl._reported.cancel()  # it waits out its throttle before it looks again
        return hub.metrics.registry

    reg = asyncio.run(go())
    assert reg.get_sample_value("smartbatch_budget_limit_usd", {"budget": "global/1d"}) == 2.0
    assert reg.get_sample_value("smartbatch_budget_remaining_usd", {"budget": "tenant=beta"}) == 0.05
    assert reg.get_sample_value("smartbatch_budget_soft_limit_usd", {"budget": "global/1d"}) == 1.0
    assert reg.get_sample_value("smartbatch_budget_soft_limit_usd", {"budget": "tenant=beta"}) is None


def test_the_report_gives_spend_per_tenant_and_per_model_without_budgets_and_across_hub_shards():
    # Without budgets the engine's report gave spend per provider alone (the ledger's per-tenant rows need a
    # budget), so a job's spend per tenant or model could not be read, nor set beside the provider's bill.
    from actors import ResultHub
    from actors.hub import merge_reports
    from engine.core.result import Result

    def res(k, tenant, model, usd, provider="anthropic"):
        return Result(id=f"r{k}", status="ok", tenant=tenant, cost_usd=usd, mode="sync", provider=provider,
                      model=model, arrival_s=0.0, done_s=1.0)

    async def go():
        hubs = [ResultHub(), ResultHub()]
        await hubs[0].push([res(0, "acme", "claude-haiku-5-5", 0.001), res(1, "beta", "claude-haiku-5-5", 0.002)])
        await hubs[1].push([res(2, "acme", "gpt-5.4-mini", 0.004, "openai"),
                            Result(id="r3", status="rejected", tenant="beta", error="budget_exhausted")])
        return merge_reports([await h.report() for h in hubs])

    rep = asyncio.run(go())
    assert rep["by_tenant"] == {"acme": {"requests": 2, "cost_usd": 0.005}, "beta": {"requests": 2, "cost_usd": 0.002}}
    assert rep["by_model"] == {"anthropic/claude-haiku-5-5": {"requests": 2, "cost_usd": 0.003},
                               "openai/gpt-5.4-mini": {"requests": 1, "cost_usd": 0.004}}
    assert sum(v["cost_usd"] for v in rep["by_model"].values()) == rep["spend_usd"] == 0.007


class _Attached:
    """What ``Engine.connect`` gives back, with a report as a served engine's after a budgeted job."""

    stopped = False

    def report(self) -> dict:
        return {"requests": 5, "spend_usd": 0.0123, "list_price_usd": 0.02, "saving_usd": 0.0077,
                "saving_frac": 0.385, "by_status": {"ok": 4, "rejected": 1}, "rejected": {"budget_exhausted": 1},
                "by_model": {"anthropic/claude-haiku-5-5": {"requests": 3, "cost_usd": 0.0023},
                             "openai/gpt-5.4-mini": {"requests": 1, "cost_usd": 0.01}},
                "by_tenant": {"acme": {"requests": 4, "cost_usd": 0.0123}, "beta": {"requests": 1, "cost_usd": 0.0}},
                "budget": {"budgets": [
                    {"budget": "tenant=acme/1h", "window": "3600", "budget_duration": "1h", "max_budget": 0.3,
                     "soft_budget": 0.01, "spent_usd": 0.0123, "reserved_usd": 0.004, "remaining_usd": 0.2837,
                     "soft_exceeded": True}],
                    "refusals": {"wait": 3, "deferred": 0, "budget_exhausted": 1, "budget_unavailable": 0},
                    "rejected": {"budget_exhausted": 1}}}

    def now(self) -> float:
        return 4000.0

    def stop(self) -> None:
        _Attached.stopped = True


def test_smartbatch_status_shows_a_served_engines_spend_per_model_and_tenant_and_its_budgets(monkeypatch):
    # The tour found no command to read a served engine's spend: `smartbatch --help` lists none, and a user of
    # `serve` had to write a driver script or read the metrics page.
    import json

    from typer.testing import CliRunner

    from engine.app import driver as driver_mod
    from engine.app.cli import app

    seen = []
    monkeypatch.setattr(driver_mod.Engine, "connect",
                        classmethod(lambda cls, name, **k: seen.append((name, k)) or _Attached()))
    r = CliRunner().invoke(app, ["status", "--name", "prod"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert seen == [("prod", {"address": "auto", "flag": "--address"})] and _Attached.stopped  # a session, ended
    assert "spend $0.0123 (USD" in out and "openai/gpt-5.4-mini" in out and "acme" in out
    assert "tenant=acme/1h" in out and "$0.30" in out and "$0.004" in out and "$0.2837" in out
    assert "(passed)" in out and "t=3,600s" in out and "t=7,200s" in out and "now t=4,000s" in out
    assert "rejected by the budgets: budget_exhausted 1" in out
    r = CliRunner().invoke(app, ["status", "--name", "prod", "--json"])
    assert json.loads(r.output)["budget"]["budgets"][0]["spent_usd"] == 0.0123


def test_smartbatch_status_of_no_such_engine_is_one_error_naming_it(monkeypatch):
    from typer.testing import CliRunner

    from engine.app import driver as driver_mod
    from engine.app.cli import app
    from engine.core.errors import ConfigError

    def none(cls, name, **_k):
        raise ConfigError(f"no engine named {name!r} runs on this Ray cluster (running: none)")

    monkeypatch.setattr(driver_mod.Engine, "connect", classmethod(none))
    r = CliRunner().invoke(app, ["status", "--name", "nope"])
    assert r.exit_code == 2 and "error: no engine named 'nope'" in r.output


def test_a_budget_passing_its_soft_limit_is_said_once_per_window_in_the_log(caplog, monkeypatch):
    # soft_budget is "an alert above this spend", yet nothing said it: soft_exceeded turned true in a report
    # nobody was reading. The budget actor's WARNING reaches every driver's logging (docs/service.md, "Logs").
    import logging

    from actors import ResultHub, _budget_report

    monkeypatch.setattr(_budget_report, "METRICS_EVERY_S", 0.0)  # each change reported, none throttled
    spec = BudgetSpec(max_budget=1.0, soft_budget=0.01, budget_duration="1h")

    async def go():
        clock = ManualClock(0.0)
        ctl = BudgetController(BudgetSettings(specs=(spec,)), ResultHub(), clock)
        for k, usd in enumerate((0.004, 0.008, 0.003)):  # passes 0.01 at the second
            await ctl.reserve_many([_claim(f"c{k}#0", "acme", 0.05)])
            await ctl.settle_many([(f"c{k}#0", usd)])
            await ctl._reported
        clock.advance(3600.0)  # the next window: said again once it passes too
        await ctl.reserve_many([_claim("d#0", "acme", 0.05)])
        await ctl.settle_many([("d#0", 0.02)])
        await ctl._reported

    with caplog.at_level(logging.WARNING, logger="smartbatch.budget"):
        asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if "soft limit" in r.getMessage()]
    assert len(said) == 2, said
    assert "budget global/1h passed its soft limit: $0.012000 spent of $0.010000 soft" in said[0]
    assert "$1.000000 hard" in said[0] and "t=0s" in said[0] and "t=3,600s" in said[1]


def test_a_window_is_labelled_on_the_calendar_at_real_speed_and_in_engine_seconds_under_a_speed_up():
    from engine.core.budgets import window_label

    assert window_label(1796486400.0) == "2026-12-05 16:00 UTC"
    assert window_label(3600.0) == "t=3,600s" and window_label(float("inf")) == "never"


def test_a_budget_on_a_model_or_provider_the_catalog_lacks_is_refused_naming_the_field_and_the_fix():
    # A misspelt model in SMARTBATCH_BUDGETS__SPECS started as if capped: its budget covered no request, and the
    # model's spend ran on with no limit, the report listing the budget at $0 spent (the tour's dry run took it).
    import pytest

    from engine.core.catalog import default_catalog
    from engine.core.errors import ConfigError
    from engine.core.settings import Settings
    from engine.sim.simulator import simulate
    from policies import load_policy

    cat = default_catalog()
    for spec, field, said in (({"model": "gpt-5.4-mnii"}, "budgets.specs.1.model", "did you mean 'gpt-5.4-mini'"),
                              ({"provider": "opneai"}, "budgets.specs.1.provider", "unknown provider 'opneai'"),
                              ({"provider": "anthropic", "model": "gpt-5.4-mini"}, "budgets.specs.1.model",
                               "provider 'anthropic' has no model 'gpt-5.4-mini'")):
        budgets = BudgetSettings(specs=(BudgetSpec(max_budget=5.0), BudgetSpec(max_budget=1.0, **spec)))
        with pytest.raises(ConfigError) as err:
            simulate([HELD], load_policy("naive", cat), catalog=cat,
                     settings=Settings().model_copy(update={"budgets": budgets}))
        msg = str(err.value)
        assert field in msg and said in msg and "covers no request" in msg and "SMARTBATCH_BUDGETS__SPECS" in msg
    fine = BudgetSettings(specs=(BudgetSpec(model="gpt-5.4-mini", max_budget=1.0),
                                 BudgetSpec(provider="anthropic", tenant="anyone", max_budget=1.0)))
    simulate([HELD], load_policy("naive", cat), catalog=cat, settings=Settings().model_copy(update={"budgets": fine}))


def reporting_hub():
    """A result hub and a queue of the budget rows each of its ``observe_budget`` calls took, in order."""
    from actors import ResultHub

    hub, seen = ResultHub(), asyncio.Queue()
    observe = hub.observe_budget

    async def observed(rows, refusals):
        await observe(rows, refusals)
        seen.put_nowait(rows)

    hub.observe_budget = observed
    return hub, seen


class _RealTime(ManualClock):
    """Moved by hand, and its seconds are real ones (a ManualClock's wait no time)."""

    def real_delay(self, virtual_s: float) -> float:
        return max(virtual_s, 0.0)


def test_the_budget_gauges_follow_a_window_that_resets_with_no_work_coming(monkeypatch):
    # Gauges were sent when the ledger moved: with no work after a window's spend, the metrics page showed the
    # ended window's spend and remaining for hours (the tour's 1h tenant budget: $0.104 spent, $0.196 left, four
    # windows after the one it was spent in, where the current window had $0.30 left).
    from actors import _budget_report
    from actors._budget_report import next_window_end

    monkeypatch.setattr(_budget_report, "METRICS_EVERY_S", 0.0)  # each change reported, none throttled

    spec = BudgetSpec(tenant="acme", max_budget=0.3, budget_duration="1h")
    assert next_window_end([spec, BudgetSpec(max_budget=1.0)], 100.0) == 3600.0
    assert next_window_end([BudgetSpec(max_budget=1.0)], 100.0) is None  # no window ends: nothing to wait for

    async def go():
        hub, seen = reporting_hub()
        clock = _RealTime(3000.0)
        ctl = BudgetController(BudgetSettings(specs=(spec,)), hub, clock)
        await ctl.reserve_many([_claim("a#0", "acme", 0.2)])
        await ctl.settle_many([("a#0", 0.1)])
        while (rows := await seen.get())[0]["spent_usd"] != 0.1:
            pass
        at, timer = ctl._window_timer
        assert at == 3600.0  # armed for the window's end, on the engine clock
        timer.cancel()
        clock.advance(600.0)
        ctl._window_ended()  # what the timer calls: the window ended, and no work came
        while (rows := await seen.get())[0]["window"] != "3600":
            pass
        assert ctl._window_timer[0] == 7200.0  # and the next end armed
        ctl._window_timer[1].cancel()
        return rows

    (row,) = asyncio.run(go())
    assert (row["window"], row["spent_usd"], row["remaining_usd"]) == ("3600", 0.0, 0.3)
