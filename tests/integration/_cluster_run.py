"""Run by test_parity.py in its own process (a process holds one Ray connection): a simulated cluster with
one node per provider resource group, the engine on it sharded (ingest, cache, hub and groupers, argv[1] of
each), the exact-parity trace (_parity.py) through it and through the simulator, and a report of placement,
of the work each shard did and of the differences, as JSON."""

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from _parity import (  # noqa: E402
    MIN_GAP_S,
    PARITY_POLICY,
    SPEEDUP,
    closest_call,
    coverage,
    differences,
    parity_catalog,
    wave_trace,
)
from ray.cluster_utils import Cluster  # noqa: E402

from engine import Engine  # noqa: E402
from engine.core.cost import MODES  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

GROUPS = [{"provider:openai": 1, "provider:anthropic": 1}, {"provider:google": 1}, {"provider:modal-h100": 1}]
# Half the one-node test's speed: four raylets and two shards of each kind share 2 cores, and a stall of
# MIN_GAP_S / SPEEDUP (100 ms at 10x) changed which GPU batch a wave's requests joined once in five clean-clone
# CI runs; at 5x the trace's decisions are 200 ms clear of its arrivals.
CLUSTER_SPEEDUP = SPEEDUP / 2
# A shorter wave trace than the default (its last result at 257 engine seconds, not 529: the run took two minutes
# of the suite's ten at 5x). It keeps the premise, with more room (arrivals 2.2 s clear of a decision, not 1.5 s),
# and uses every lane, every kind of reuse and 9 hedged batches; no decision in it depends on an in-flight
# release time or on prompt-cache warmth (the simulator decides alike with either turned off).
CLUSTER_TRACE = {"n": 120, "seed": 89, "span_s": 100.0, "max_deadline_s": 250.0}


def main() -> None:
    shards = int(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources=res) for res in GROUPS]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        reqs = wave_trace(**CLUSTER_TRACE)
        cat = parity_catalog()
        sim = simulate(reqs, load_policy("smart", cat, PARITY_POLICY), catalog=cat)
        modes, hits, hedged = coverage(sim)
        # Every lane, every kind of reuse and a hedged batch; decisions clear of arrivals by MIN_GAP_S.
        premise = bool(all(modes.get(m) for m in MODES) and all(hits.get(h) for h in (1, 2, 3)) and hedged > 0
                       and closest_call(sim) >= MIN_GAP_S)
        with Engine.start(catalog=cat, policy_params=PARITY_POLICY, speedup=CLUSTER_SPEEDUP, num_shards=shards,
                          metrics_port=None) as eng:
            live = {r.id: r for r in (f.result(timeout=300) for f in eng.replay(reqs))}
            where = lambda h: ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))  # noqa: E731
            placed = {name: where(h) for name, h in eng._h["dispatchers"].items()}
            grouper_nodes = {where(h) for h in eng._h["groupers"]}
            ask = lambda h, f: ray.get(h.__ray_call__.remote(f))  # noqa: E731
            work = {  # what each shard did: requests admitted, looked up, results counted
                "ingest": [ask(h, lambda self: self.next_seq) for h in eng._h["ingests"]],
                "cache": [ask(h, lambda self: sum(self.stats.values())) for h in eng._h["caches"]],
                "hub": [ask(h, lambda self: self._stats["requests"]) for h in eng._h["hubs"]],
                "grouper": [ask(h, lambda self: self.dispatched) for h in eng._h["groupers"]],
            }
            report = eng.report()
        node_res = {nd.node_id: res for nd, res in zip(nodes, GROUPS)}
        print(json.dumps({
            "premise": premise,
            "coverage": [modes, hits, hedged, float(closest_call(sim))],
            "differences": [list(map(str, d)) for d in differences(sim, live)],
            "live_cost": sum(r.cost_usd for r in live.values()),
            "sim_cost": sim.total_cost,
            "placement_ok": {name: f"provider:{name}" in node_res.get(node, {}) for name, node in placed.items()},
            "grouper_nodes": len(grouper_nodes),
            "work": work,
            "report_requests": report["requests"],
            "report_spend": report["spend_usd"],
            "nodes": len(ray.nodes()),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
