"""What the budget ledger's slot guard (``actors._budget_scripts.SLOT_STILL``) costs each script on a Redis Cluster:
the node's own time per call (``INFO commandstats``) of a script that bumps a key, bare, behind the guard, and behind
the guard of before (``CLUSTER KEYSLOT`` and ``CLUSTER NODES`` read in the script), on local clusters of 3 to 100
masters whose slots are cut into 3 to 16384 ranges (``CLUSTER NODES`` grows with both). The figures in
docs/budgets.md (Redis Cluster).

    PYTHONPATH=. .venv/bin/python benchmarks/bench_ledger_slot_guard.py [--calls 20000]

Starts its own ``redis-server`` processes on 127.0.0.1 (killed at the end). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import redis

from actors._budget_scripts import SLOT_STILL
from tests.integration._cluster_redis import READY_S, LocalCluster, _free_ports

# The guard of before (stop 78's first take), kept here to compare with.
NODES_GUARD = """
if redis.replicate_commands then redis.replicate_commands() end
do
  local slot = redis.pcall('CLUSTER', 'KEYSLOT', KEYS[1])
  local nodes = type(slot) == 'number' and redis.pcall('CLUSTER', 'NODES')
  if type(nodes) == 'string' and string.find(nodes, '[' .. slot .. '-', 1, true) then
    return redis.error_reply('TRYAGAIN slot ' .. slot .. ' of the budget ledger is moving between nodes')
  end
end
"""
BODY = "return redis.call('INCR', KEYS[1])"
KEY = "{bench-ledger}:exp"


def per_call_us(c: redis.Redis, script: str, calls: int) -> float:
    """The node's own time per call of ``script``, sent ``calls`` times in pipelines of 1000."""
    sha = c.script_load(script)
    c.config_resetstat()
    for start in range(0, calls, 1000):
        p = c.pipeline(transaction=False)
        for _ in range(min(1000, calls - start)):
            p.evalsha(sha, 1, KEY)
        p.execute()
    return float(c.info("commandstats")["cmdstat_evalsha"]["usec_per_call"])


def cluster(n: int, stride: int, tmp: str) -> tuple[LocalCluster, list[redis.Redis]]:
    """``n`` masters, slot s served by node (s // stride) % n: 16384 / stride ranges."""
    cl = LocalCluster(tmp)
    cl.ports = _free_ports(n)
    for p in cl.ports:
        cl.procs.append(cl._spawn(p))
    cs = [redis.Redis(port=p, socket_timeout=5.0) for p in cl.ports]
    for c in cs[1:]:
        c.execute_command("CLUSTER", "MEET", "127.0.0.1", cl.ports[0])
    for i, c in enumerate(cs):
        c.execute_command("CLUSTER", "ADDSLOTS", *(s for s in range(16384) if (s // stride) % n == i))
    end = time.monotonic() + READY_S * 3
    while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in cs):
        if time.monotonic() > end:
            raise RuntimeError(f"the cluster of {n} nodes did not agree")
        time.sleep(0.2)  # polling the nodes' own state, bounded
    return cl, cs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=20000)
    calls = ap.parse_args().calls
    print(f"{'masters':>7} {'ranges':>6} {'NODES bytes':>11} {'bare us':>8} {'guard us':>8} {'NODES guard us':>14}")
    for n, stride in ((3, 5462), (3, 16), (30, 64), (100, 16), (3, 1)):
        cl, cs = cluster(n, stride, tempfile.mkdtemp(prefix="bench-slot-guard-"))
        try:
            owner = cs[(cs[0].execute_command("CLUSTER", "KEYSLOT", KEY) // stride) % n]
            size = len(owner.execute_command("CLUSTER", "NODES"))
            got = [per_call_us(owner, s + BODY, calls) for s in ("", SLOT_STILL, NODES_GUARD)]
            print(f"{n:>7} {-(-16384 // stride):>6} {size:>11} {got[0]:>8.2f} {got[1]:>8.2f} {got[2]:>14.2f}")
        finally:
            for c in cs:
                c.close()
            for p in cl.procs:
                p.kill()
                p.wait()


if __name__ == "__main__":
    main()
