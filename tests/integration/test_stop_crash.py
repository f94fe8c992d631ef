"""A dispatcher whose process dies in the engine's stop, while it cancels a provider batch under way
(``actors._stop_dispatchers._stop_restarted``, ``Recovery._recover_at_stop``).

Ray restarts it (``max_restarts=-1``), and the stop took its death for a kill by another driver's stop: nothing
to cancel. The new incarnation was never rewired (the stop had killed the hub, whose memory held its journal, and
unpublished the engine clock), so the batch ran on at the provider, billed, its spend counted by no ledger and its
members' claims held until ``reservation_ttl_s``. Now the stop asks it again once Ray has it back, with the clock
and a copy of the hub's journal taken before the hub went: it re-attaches to the batch and cancels it, and settles
its members at their bound. One Ray does not bring back within the stop's bound (load: stop 80's rehearsal) has
its batch cancelled and settled by the stop itself (``actors._stop_left``)."""

from __future__ import annotations

import threading
import time

import pytest

from engine.core.budgets import BudgetSettings, BudgetSpec


@pytest.mark.parametrize("journal", ["the hub's memory", "journal.dir"])
def test_a_dispatcher_that_dies_in_the_stops_cancel_is_asked_again_and_cancels_its_batch(journal, ray_session,
                                                                                         monkeypatch, tmp_path):
    """The journal in the hub's memory (the stop has killed the hub: the restarted dispatcher reads the copy the
    stop took) or in files (``journal.dir``: it reads them)."""
    import ray

    from engine import Engine
    from engine.app.live import point_at_emulator
    from engine.core.catalog import default_catalog
    from engine.core.cost import reserve_bound
    from engine.core.request import Request, validation_context
    from engine.core.settings import JournalSettings, Settings
    from engine.emulator import Emulator
    from tests.integration._catalogs import OPENAI_ONLY

    budgets = BudgetSettings(specs=(BudgetSpec(max_budget=10.0, budget_duration="1d"),))
    line = {"id": "s0", "model": "gpt-4o-mini", "prompt": "summarise part 0", "input_tokens": 20_000,
            "deadline_s": 86_400}
    bound = reserve_bound(Request.model_validate({**line, "arrival_s": 0.0}, context=validation_context(
        default_catalog())), OPENAI_ONLY, "batch_api")
    # Real time at the provider: the batch takes minutes there, so it is under way at the stop.
    with Emulator(default_catalog(), speedup=1.0, seed=0, cancel_s=1.0) as emu:
        kept = JournalSettings(dir=tmp_path / "journal") if journal == "journal.dir" else JournalSettings()
        settings = point_at_emulator(Settings(budgets=budgets, journal=kept), emu, providers=("openai",))
        monkeypatch.setenv(settings.providers.endpoints["openai"].api_key_env, "sk-fake-stop")
        polled, cancelling = threading.Event(), threading.Event()
        asked = emu.faults.next_fault

        def seen(provider, route, *a, **k):  # the emulator's requests, as they arrive
            if route == "batches.retrieve":  # followed: its handle is journaled
                polled.set()
            elif route == "batches.cancel":
                cancelling.set()
            return asked(provider, route, *a, **k)

        emu.faults.next_fault = seen
        # The stop's first cancel is held at the provider: the dispatcher dies while it waits for the answer.
        emu.faults.script("openai", "batches.cancel", [{"timeout_s": 120.0}])
        # (the smart policy without reuse: the test sends one request, and no cache actor is started for it)
        params = {"batch_gather_s": 0.0, "min_batch_saving_usd": 0.0, "reuse_exact": False, "reuse_in_flight": False,
                  "reuse_near": False}
        eng = Engine.start(settings, catalog=OPENAI_ONLY, speedup=100, policy_params=params, metrics_port=None)
        dispatcher = eng._h["dispatchers"]["openai"]
        try:
            fut = eng.submit(line)
            assert polled.wait(60), f"no batch followed at the emulator: {emu.counters()}"

            def crash() -> None:  # its process dies in ``stop_spending`` (Ray restarts it)
                if cancelling.wait(60):
                    ray.kill(dispatcher, no_restart=False)

            killer = threading.Thread(target=crash, daemon=True)
            killer.start()
            began = time.monotonic()
            eng.stop()
            took = time.monotonic() - began
            killer.join(5)
            rep = eng.report()
        finally:
            eng.stop()  # (stopped already: returns at once)
        assert cancelling.is_set(), "the stop sent no cancel"
        assert fut.result(timeout=5).status == "failed"
        # Cancelled by the dispatcher Ray restarted (before: no cancel ever answered, the batch ran on, billed).
        assert emu.count("batches.cancel", "openai", 200) == 1, emu.counters()
        assert emu.count("batches.create", "openai") == 1  # re-attached to, never created again
        (row,) = rep["budget"]["budgets"]
        # Counted at its bound, nothing held (before: $0 spent, the bound reserved until the claim expired).
        assert (row["spent_usd"], row["reserved_usd"]) == (pytest.approx(bound, abs=1e-6), 0.0), row
        said = rep["providers"]["openai"]
        assert (said["possibly_billed"], said["possibly_billed_usd"]) == (1, pytest.approx(bound, abs=1e-6)), said
        from actors._stop_dispatchers import RESTART_AT_STOP_S, STOP_CALL_S
        from actors._stop_left import LEFT_CANCEL_S

        # (Ray may not bring it back in time on a loaded machine: the stop then cancels the batch itself, within
        # its own bound, ``actors._stop_left``; every assertion above holds either way.)
        assert took < 2 * STOP_CALL_S + RESTART_AT_STOP_S + LEFT_CANCEL_S + 5.0, f"the stop took {took:.1f} s"
