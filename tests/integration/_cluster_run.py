"""Run by test_cluster.py in its own process (a process holds one Ray connection): a simulated cluster with
one node per provider resource group, the engine on it, and a report of placement and cost as JSON."""

import json
import os
import sys

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from engine import Engine  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.tracegen import synth  # noqa: E402
from engine.sim.simulator import simulate  # noqa: E402
from policies import load_policy  # noqa: E402

GROUPS = [{"provider:openai": 1, "provider:anthropic": 1}, {"provider:google": 1}, {"provider:modal-h100": 1}]


def main() -> None:
    n = int(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, resources=res) for res in GROUPS]
    cluster.wait_for_nodes()
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        reqs = [r.model_copy(update={"deadline_s": min(r.deadline_s, 1800.0)})
                for r in synth(n, seed=4, duration_s=n)]
        params = {"reuse_near": False}
        sim = simulate(reqs, load_policy("smart", default_catalog(), params))
        with Engine.start(speedup=100, policy_params=params) as eng:
            results = [f.result(timeout=300) for f in eng.replay(reqs)]
            placed = {name: ray.get(h.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))
                      for name, h in eng._h["dispatchers"].items()}
        node_res = {nd.node_id: res for nd, res in zip(nodes, GROUPS)}
        print(json.dumps({
            "live_cost": sum(r.cost_usd for r in results),
            "sim_cost": sim.total_cost,
            "statuses": sorted({r.status for r in results}),
            "placement_ok": {name: f"provider:{name}" in node_res.get(node, {}) for name, node in placed.items()},
            "nodes": len(ray.nodes()),
        }))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main()
