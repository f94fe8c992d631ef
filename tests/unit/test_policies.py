"""Every policy against every provider kind (one matrix), plus the registry and parameters."""

import pickle

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import MODES, mode_allowed
from engine.core.errors import ConfigError, RegistryError
from engine.core.grouping import RECOMMENDATIONS, Decision, Group, PrefixSightings, ReuseSettings
from engine.core.policy_api import Policy as PolicyProtocol
from engine.core.scheduling import Scheduling
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import simulate
from policies import Policy, available_policies, load_policy, register

from .helpers import KINDS, kind_trace

CAT = default_catalog()
POLICIES = ["naive", "cache-only", "fixed", "batch-all", "smart"]


def test_builtin_policies_are_registered():
    assert set(POLICIES) <= set(available_policies())


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_on_provider_kind(policy, kind):
    reqs = kind_trace(kind)
    res = simulate(reqs, load_policy(policy, CAT))
    assert (res.status != 0).all(), "every request resolves"
    prov = CAT.provider(reqs[0].provider)
    spec = CAT.model(reqs[0].provider, reqs[0].model)
    for m in set(res.mode[res.mode >= 0].tolist()):
        assert MODES[m] == "reuse" or mode_allowed(prov, spec, MODES[m])
    assert all(b.recommendation in RECOMMENDATIONS and b.reason for b in res.batches)
    naive = simulate(reqs, load_policy("naive", CAT))
    if policy == "smart":
        # smart never costs more than naive and meets at least as many deadlines
        assert res.total_cost <= naive.total_cost + 1e-9
        assert res.met.sum() >= naive.met.sum()
    if policy == "naive":
        assert (res.mode == 0).all() or spec.gpu_priced
        assert all(b.size == 1 for b in res.batches)
    if policy == "batch-all" and prov.supports_batch_api(spec.kind, spec):
        assert (res.mode == 1).sum() > 0.8 * len(reqs)


@pytest.mark.parametrize("kind", ["gpu-image", "gpu-video"])
def test_smart_amortises_gpu_warm_up(kind):
    reqs = kind_trace(kind, n=200)
    smart = simulate(reqs, load_policy("smart", CAT))
    naive = simulate(reqs, load_policy("naive", CAT))
    sizes = [b.size for b in smart.batches if b.mode == "gpu_batch"]
    assert max(sizes) == CAT.provider("modal-h100").gpu_batching.max_batch
    assert smart.total_cost < 0.7 * naive.total_cost
    assert any(b.recommendation == "process_as_batch" for b in smart.batches)


def test_smart_hedges_text_batches_and_explains():
    reqs = kind_trace("text-batch-api-explicit-cache", n=300)
    res = simulate(reqs, load_policy("smart", CAT))
    api = [b for b in res.batches if b.mode == "batch_api"]
    assert api and all("hedge at" in b.reason and "P(on time)" in b.reason for b in api)
    assert res.met.all()
    urgent_sync = [b for b in res.batches if b.mode == "sync"]
    assert all(b.recommendation == "process_individually" for b in urgent_sync)


def test_fixed_flushes_at_size_or_timeout():
    from engine.core.catalog import Catalog

    raw = CAT.model_dump()
    raw["providers"]["modal-h100"]["failure_rate"] = 0.0  # no retries, so every flush is a fresh one
    cat = Catalog.model_validate(raw)
    reqs = kind_trace("gpu-image", n=64, span_s=1.0)
    res = simulate(reqs, load_policy("fixed", cat, {"max_batch_size": 4, "batch_wait_timeout_s": 100}),
                   catalog=cat)
    assert [b.size for b in res.batches] == [4] * 16
    res = simulate(reqs[:3], load_policy("fixed", cat, {"max_batch_size": 4, "batch_wait_timeout_s": 2.0}),
                   catalog=cat)
    assert [b.size for b in res.batches] == [3] and res.batches[0].t == pytest.approx(reqs[0].arrival_s + 2.0)


def test_params_are_typed_and_errors_name_the_parameter():
    with pytest.raises(ConfigError, match=r"parameter max_batch_size = 0: .*greater than or equal to 1"):
        load_policy("fixed", CAT, {"max_batch_size": 0})
    with pytest.raises(ConfigError, match=r"no parameter 'max_batch'; did you mean 'max_batch_size'\? its parameters"):
        load_policy("fixed", CAT, {"max_batch": 3})


def test_registry_refuses_duplicates_and_unknown_names():
    class Dup(Policy):
        name = "naive"

    with pytest.raises(RegistryError, match="already registered"):
        register(Dup)
    with pytest.raises(RegistryError, match="unknown policy 'smrt'.*smart"):
        load_policy("smrt", CAT)


def test_policy_loads_from_import_path():
    p = load_policy("policies.smart:Smart", CAT, {"near_threshold": 0.97})
    assert p.name == "smart" and p.reuse.near_threshold == 0.97
    with pytest.raises(RegistryError, match="module.path:ClassName"):
        load_policy("policies.smart:Nope", CAT)
    with pytest.raises(RegistryError, match="not a class"):
        load_policy("engine.core.cost:price_alone", CAT)


class DuckPolicy:
    """A policy that does not subclass ``policies.Policy``: the protocol is what counts."""

    name = "duck"

    def __init__(self, catalog, params=None):
        self.catalog = catalog

    reuse = ReuseSettings()
    scheduling = Scheduling()

    def group_key(self, req, compat, now):
        return ("sync", req.id)

    def decide(self, group, now):
        return Decision("dispatch", mode="sync", reason="duck")


class NoDecide:
    name = "nodecide"
    reuse = ReuseSettings()
    scheduling = Scheduling()

    def __init__(self, catalog, params=None):
        pass

    def group_key(self, req, compat, now):
        return req.id


class BadDecide(DuckPolicy):
    def decide(self, group):  # the time is missing
        return Decision("dispatch", mode="sync")


def test_a_policy_loaded_by_path_is_checked_against_the_protocol_when_built():
    p = load_policy(f"{__name__}:DuckPolicy", CAT)
    assert isinstance(p, PolicyProtocol)
    res = simulate(kind_trace("text-batch-api-auto-cache", n=20), p)
    assert (res.status != 0).all() and (res.mode[res.mode >= 0] == MODES.index("sync")).all()
    with pytest.raises(RegistryError, match="missing decide"):
        load_policy(f"{__name__}:NoDecide", CAT)
    with pytest.raises(RegistryError, match=r"decide must take 2 arguments \(group, now\)"):
        load_policy(f"{__name__}:BadDecide", CAT)


@pytest.mark.parametrize("policy", POLICIES)
def test_decide_is_pure_on_every_lane(policy):
    """Deciding leaves the policy as it was, and the same group at the same time gets the same decision,
    on every lane (sync, batch API, GPU, hosted media); what changes with the traffic (prompt-prefix
    sightings) is the runtime's, recorded from ``Decision.prefix``."""
    p = load_policy(policy, CAT)
    table = GroupTable(p, CAT)
    lanes = set()
    for kind in sorted(KINDS):
        for r in kind_trace(kind, n=12):
            key = p.group_key(r, (r.model,), r.arrival_s)
            g = table.groups.get(key)
            if g is None:
                prov = CAT.provider(r.provider)
                g = table.groups[key] = Group(key, prov, prov.models[r.model], sightings=table.sightings)
            g.add(r)
            lanes.add(key[0] if isinstance(key, tuple) else "sync")
            for now in (r.arrival_s, r.arrival_s + 60.0, r.deadline_at - 1.0):
                before = pickle.dumps(vars(p))
                first = p.decide(g, now)
                assert p.decide(g, now) == first, (kind, now)
                assert pickle.dumps(vars(p)) == before, f"{policy}.decide changed the policy ({kind})"
    assert len(lanes) >= (3 if policy == "smart" else 1), lanes


def test_prefix_sightings_are_the_runtimes_and_bounded():
    p = load_policy("smart", CAT)
    table = GroupTable(p, CAT)
    r = kind_trace("text-batch-api-explicit-cache", n=40)
    urgent = [x.model_copy(update={"priority": "urgent", "deadline_s": 30.0, "input_tokens": 4000,
                                   "prefix_blocks": (7, 8, 9, 10)}) for x in r[:2]]
    first, _ = table.add(urgent[0], (), 0.0)
    second, _ = table.add(urgent[1], (), 10.0)
    assert first[0].decision.mode == "sync" and not first[0].decision.cache_write
    # The same prefix sent 10 s ago (within the cache's TTL): this time it is marked for a write.
    assert second[0].decision.cache_write and first[0].decision.prefix == second[0].decision.prefix
    assert len(table.sightings) == 1
    small = PrefixSightings(capacity=3)
    for k in range(5):
        small.see(k, float(k))
    assert len(small) == 3 and small.last(0) is None and small.last(4) == 4.0


def test_decisions_are_pure_functions_of_group_and_time():
    from engine.core.grouping import Group, LaneRates

    reqs = [r.model_copy(update={"arrival_s": 10.0, "priority": "normal", "deadline_s": 3600.0})
            for r in kind_trace("gpu-image", n=3)]
    prov = CAT.provider("modal-h100")
    p = load_policy("smart", CAT)
    rates = LaneRates()
    for t in range(10):  # a lane with steady company: the policy gathers
        rates.see(("gpu", ()), float(t))
    g = Group(("gpu", ()), prov, prov.models["flux-1-dev"], rates=rates)
    for r in reqs:
        g.add(r)
    assert p.decide(g, reqs[-1].arrival_s) == p.decide(g, reqs[-1].arrival_s)
    d = p.decide(g, 10.0)
    assert d.action == "wait" and 10.0 < d.wake_at < 3610.0
    wakes = 0
    while d.action == "wait":  # it judges the promise of company again at each wake, and stops
        assert p.decide(g, d.wake_at) == p.decide(g, d.wake_at)
        d, wakes = p.decide(g, d.wake_at), wakes + 1
    assert d.action == "dispatch" and 1 <= wakes <= 6
