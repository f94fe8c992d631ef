"""A hedged batch at a provider called over HTTP runs on while it cancels (up to the endpoint's ``cancel_s``),
and may finish meanwhile: the simulator models that as the emulator and the real providers do. Before, the
simulator cancelled every batch at once, whatever the catalog it planned with said: a batch that ended
within its cancel was billed sync rather than at the batch price, and the members of the others were back
``cancel_s`` earlier than any real provider gives them back (their sync fallbacks then met deadlines a live
run misses). Simulated providers still cancel at once."""

from __future__ import annotations

import pytest

from engine.app.provider_setup import http_setup
from engine.core.catalog import default_catalog
from engine.core.cost import price_alone
from engine.core.draws import Draws
from engine.core.request import Request
from engine.core.settings import ProviderEndpoint, ProvidersSettings, Settings
from engine.runtime.providers import SimProvider

CAT = default_catalog()
CANCEL_S = 600.0


def http(provider: str = "anthropic", cancel_s: float = CANCEL_S) -> Settings:
    ep = ProviderEndpoint(api=provider, api_key_env="SMARTBATCH_TEST_KEY", cancel_s=cancel_s)
    return Settings(providers=ProvidersSettings(mode="http", endpoints={provider: ep}))


def requests(n: int = 3) -> list[Request]:
    return [Request(id=f"r{k}", arrival_s=0.0, provider="anthropic", model="claude-sonnet-4-5", kind="text",
                    input_tokens=1000, output_tokens=200, deadline_s=86400.0) for k in range(n)]


def provider(settings: Settings, planned: bool = True) -> tuple[SimProvider, float]:
    """The provider, and when a batch submitted at 0 ends by the draws (the catalog's turnaround there).
    ``planned``: with the catalog the engine plans with (``http_setup``: the endpoints' cancels), else the plain one."""
    cat = http_setup(CAT, settings, need_keys=False)[0] if planned else CAT
    draws = Draws(3, settings.sim.max_attempts, 0, settings.sim.batch_slot_s)
    sim = SimProvider(cat.provider("anthropic"), cat, settings, draws)
    return sim, draws.turnaround("anthropic", cat.provider("anthropic").batch_api, 0.0)


def test_a_batch_that_ends_while_it_cancels_is_billed_at_the_batch_price_and_none_goes_sync():
    sim, done = provider(http())
    reqs = requests()
    out = sim.batch([0, 1, 2], reqs, 0.0, done - CANCEL_S / 2, [0, 0, 0])  # cancelled half a cancel before its end
    assert not out.hedged and out.at == pytest.approx(done)
    members = sim.end_batch(out)
    assert [m.ok for m in members] == [True] * 3
    assert [m.cost for m in members] == pytest.approx([price_alone(r, CAT, "batch_api").total for r in reqs])
    assert all(m.cost < price_alone(r, CAT, "sync").total for m, r in zip(members, reqs))


def test_a_batch_still_out_when_its_cancel_is_through_gives_its_members_back_then_billed_nothing():
    sim, done = provider(http())
    hedge_at = done - CANCEL_S - 100.0
    out = sim.batch([0, 1, 2], requests(), 0.0, hedge_at, [0, 0, 0])
    assert out.hedged and out.at == pytest.approx(hedge_at + CANCEL_S) and out.members == []


def test_a_simulated_provider_still_cancels_at_once():
    for settings in (Settings(), http("openai")):  # not called over HTTP, or another provider is
        sim, done = provider(settings)
        hedge_at = done - CANCEL_S / 2
        out = sim.batch([0, 1, 2], requests(), 0.0, hedge_at, [0, 0, 0])
        assert out.hedged and out.at == hedge_at


def test_the_cancel_is_the_one_the_policy_plans_with_not_the_settings():
    """A bench of the plain catalog under http settings (the demo's simulated rows, or `bench` with
    SMARTBATCH_PROVIDERS__MODE=http exported): its policies plan instant cancels, so its batches cancel at once.
    Read from the settings, the members came back 600 s after hedges planned for none: the demo's smart row met
    93 % of its deadlines."""
    sim, done = provider(http(), planned=False)
    hedge_at = done - CANCEL_S / 2
    out = sim.batch([0, 1, 2], requests(), 0.0, hedge_at, [0, 0, 0])
    assert out.hedged and out.at == hedge_at
