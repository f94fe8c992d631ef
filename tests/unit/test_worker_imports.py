"""What an engine actor's process imports at start. Ray loads the class of every peer's handle an actor is given,
so each worker imports nearly every actor module; numpy (about 90 ms of CPU a process) and usearch load only
where a vector, a draw or a histogram is made (docs/testing.md, stop 83's import83)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from engine.core.draws import hour_of_day

ROOT = Path(__file__).resolve().parents[2]


def test_actor_modules_load_no_numpy_at_import():
    code = ("import sys\n"
            "import actors.budget, actors.cache, actors.dispatcher, actors.grouper, actors.hub, actors.ingest\n"
            "import engine.runtime.reuse as reuse\n"
            "loaded = [m for m in ('numpy', 'usearch') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            # usearch's class is still there when asked for, and what a test patches is what the index reads
            "assert reuse._Hnsw is not None and reuse._graph_class() is reuse._Hnsw\n"
            "reuse._Hnsw = None\n"
            "assert reuse._graph_class() is None\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("t", [0, 7199, 3600.5, np.float64(86399.0), np.float32(5400.0), np.int64(90000)])
def test_hour_of_day_of_a_number_is_an_int(t):
    h = hour_of_day(t, 1800.0)
    assert type(h) is int and h == int((1800.0 + float(t)) // 3600 % 24)


def test_hour_of_day_of_an_array_is_an_int_array():
    h = hour_of_day(np.array([0.0, 3600.0, 86400.0 + 7200.0]))
    assert h.dtype == np.int64 and h.tolist() == [0, 1, 2]
