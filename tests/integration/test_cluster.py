import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_engine_on_a_simulated_multi_node_cluster():
    """Head plus one node per provider resource group: every dispatcher runs on a node with its provider's
    resource, and the results match the simulator as they do on one node (cost within 2 %)."""
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONPATH=str(HERE.parents[1]))
    proc = subprocess.run([sys.executable, str(HERE / "_cluster_run.py"), "300"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["nodes"] == 4
    assert all(out["placement_ok"].values()) and len(out["placement_ok"]) == 4, out["placement_ok"]
    assert set(out["statuses"]) <= {"ok", "reused"}
    assert out["live_cost"] == pytest.approx(out["sim_cost"], rel=0.02)
