"""The live engine's flex tier end to end: smart sends gpt-5-mini text at OpenAI's flex tier, the dispatcher calls the
loopback emulator through the openai SDK with ``service_tier: "flex"``, and the bill from usage is the cost model's."""

import pytest

from engine.app.live import point_at_emulator
from engine.core.catalog import default_catalog
from engine.core.cost import price_usage
from engine.core.request import Request, validation_context
from engine.core.settings import Settings
from engine.emulator import Emulator
from tests.integration._catalogs import OPENAI_ONLY

CAT = default_catalog()
KEY = "sk-fake-flex-NEVERSHOWN"
BUDGETED = "budgeted"  # the tenant under a hard budget; the default tenant has none


def test_smart_sends_text_at_flex_billed_half_and_a_refused_call_goes_standard_once_with_or_without_a_budget(
        ray_session, monkeypatch):
    """Two checks on one engine and emulator (each had its own before stop 76: 6 actor processes more), one after
    the other, the first flex call of each refused.

    Without a budget (the default tenant): the refused call is answered at the standard tier, everything billed
    once, at the tier it was served at, at half the standard price at flex.

    Under a hard budget (tenant ``budgeted``): a flex call holds the flex price; the refused one goes back to its
    grouper, which reserves the standard price (releasing the flex claim) and sends it sync: answered, billed
    once, the budget holding exactly its bill and nothing left reserved."""
    from engine.core.settings import with_budget

    with Emulator(CAT, speedup=200.0, seed=0, cancel_s=1.0) as emu:
        settings = with_budget(point_at_emulator(Settings(), emu, providers=("openai",)), tenants={BUDGETED: 5.0})
        monkeypatch.setenv(settings.providers.endpoints["openai"].api_key_env, KEY)
        emu.faults.refuse_flex(1)  # the first flex call: 429 "Resource Unavailable", billed nothing
        from engine import Engine

        n = 4
        with Engine.start(settings, catalog=OPENAI_ONLY, speedup=200.0) as eng:
            futs = [eng.submit({"id": f"f{i}", "model": "gpt-5-mini", "prompt": f"say {i} twice",
                                "deadline_s": 7200}) for i in range(n)]
            results = [f.result(timeout=120) for f in futs]
            report = eng.report()
            bill = emu.bill()
            emu.faults.refuse_flex(1)  # the budgeted tenant's first flex call
            futs = [eng.submit({"id": f"b{i}", "tenant": BUDGETED, "model": "gpt-5-mini",
                                "prompt": f"say {i} twice", "deadline_s": 7200}) for i in range(n)]
            under = [f.result(timeout=120) for f in futs]
            report_under = eng.report()
        bill_under = emu.bill().items[len(bill.items):]  # the items billed since (the first part's all answered)
        emu_total = emu.bill().total_usd

    # Without a budget.
    assert [r.status for r in results] == ["ok"] * n, [r.error for r in results]  # nothing lost
    modes = sorted(r.mode for r in results)
    assert modes == ["flex"] * (n - 1) + ["sync"], modes  # the refused one answered at the standard tier
    # Billed once each, at the tier each was served at: the emulator's bill is the engine's, to the cent's millionth.
    assert sorted(i.mode for i in bill.items) == modes
    assert sum(r.cost_usd for r in results) == pytest.approx(bill.total_usd, abs=1e-12)
    for r in results:
        req = Request.model_validate({"id": r.id, "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "x"},
                                     context=validation_context(CAT))
        u = r.usage
        at = {m: price_usage(req, CAT, m, input_tokens=u["input_tokens"], output_tokens=u["output_tokens"],
                             cache_read=u["cache_read"], cache_write=u["cache_write"]).total for m in ("flex", "sync")}
        assert r.cost_usd == pytest.approx(at[r.mode], abs=1e-12)
        assert at["flex"] == pytest.approx(at["sync"] / 2, abs=1e-12)  # half the standard price
    prov = report["providers"]["openai"]
    assert prov["flex_refused"] == 1 and prov["possibly_billed"] == 0 and prov["paid_twice"] == 0
    assert not any(b["spent_usd"] or b["reserved_usd"] for b in report["budget"]["budgets"])  # none of its budget

    # Under a budget.
    assert [r.status for r in under] == ["ok"] * n, [r.error for r in under]
    assert sorted(r.mode for r in under) == ["flex"] * (n - 1) + ["sync"]
    assert sorted(i.mode for i in bill_under) == sorted(r.mode for r in under)  # billed once each
    budget = {b["budget"]: b for b in report_under["budget"]["budgets"]}[f"tenant={BUDGETED}"]
    assert budget["spent_usd"] == pytest.approx(sum(i.cost_usd for i in bill_under), abs=1e-6), budget
    assert budget["reserved_usd"] == pytest.approx(0.0, abs=1e-9), budget
    # The ledger's whole spend is the whole bill, both parts'.
    assert report_under["budget"]["spent_usd"] == pytest.approx(emu_total, abs=1e-6), report_under["budget"]
    assert report_under["budget"]["reserved_usd"] == pytest.approx(0.0, abs=1e-9), report_under["budget"]
    assert report_under["budget"]["overrun_usd"] == 0.0, report_under["budget"]
    under_prov = report_under["providers"]["openai"]
    assert under_prov["flex_refused"] - prov["flex_refused"] == 1
