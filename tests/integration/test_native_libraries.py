"""The near-duplicate libraries (the WordLlama tokenizer, the usearch index) are native code loaded into the
same process as Ray. A driver script that simulates first (loading them) and starts the engine after must
still get a working Ray: usearch 2.26 made the next ``ray.init`` abort the process (std::regex_error in Ray's
GCS client), so the version is pinned below it and this test starts Ray in a fresh process that loaded them
first."""

import os
import subprocess
import sys

CODE = """
import numpy as np
from engine.core import embedding
from engine.runtime import reuse
assert reuse._Hnsw is not None, "usearch is not installed"
embedding.load_embedder()
index = reuse._Hnsw(ndim=8, dtype="i8")
index.add(np.arange(3), np.eye(3, 8, dtype=np.float32))
import ray
ray.init(address="local", include_dashboard=False, num_cpus=1, log_to_driver=False, configure_logging=False)
print("ray up:", ray.get(ray.put(41)) + 1)
ray.shutdown()
"""


def test_ray_starts_in_a_process_that_loaded_the_near_duplicate_libraries_first():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    r = subprocess.run([sys.executable, "-c", CODE], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0 and "ray up: 42" in r.stdout, r.stderr[-3000:]
