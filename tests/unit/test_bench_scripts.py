"""The scripts of `benchmarks/` that docs/benchmarks.md runs still run, and print what they say (a helper's tour of
the page, stop 85). No Ray, no real data."""

import ast
import importlib
import importlib.util
import random
from pathlib import Path

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import MODES
from engine.core.request import Request
from engine.sim.simulator import simulate
from policies import load_policy

ROOT = Path(__file__).resolve().parents[2]


def _breakdown(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its neighbour `_real`
    spec = importlib.util.spec_from_file_location("_breakdown_under_test", ROOT / "benchmarks" / "breakdown.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_modes_of_a_priority_add_up_to_its_requests_flex_included(monkeypatch):
    """On Mooncake seed 0 the urgent line read ``n= 1200 ... modes {'sync': 611, 'batch_api': 72}``: 517 requests
    sent at OpenAI's flex tier were left out, since the count ran over the first four modes only."""
    cat = default_catalog()
    oa = cat.providers["openai"]
    cat = cat.model_copy(update={"providers": {**cat.providers, "openai": oa.model_copy(
        update={"flex": oa.flex.model_copy(update={"unavailable_rate": 0.0})})}})
    reqs = [Request.model_validate({"id": f"r{i}", "arrival_s": 10.0 * i, "model": "gpt-5-mini", "input_tokens": 3000,
                                    "output_tokens": 400, "deadline_s": 600.0, "prompt": f"ask {i}"})
            for i in range(40)]
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    counts = _breakdown(monkeypatch).mode_counts(res.mode)
    assert counts.get("flex", 0) > 0 and sum(counts.values()) == len(reqs), counts


def _engine_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from engine|policies|actors... import name`` in a script."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                and node.module.split(".")[0] in ("engine", "policies", "actors"):
            out += [(node.module, a.name) for a in node.names]
    return out


def test_every_name_a_benchmark_script_imports_from_the_package_exists():
    """`bench_real.py`, the page's first command, stopped at its imports (``cannot import name '_markdown' from
    'engine.app.bench'``) since bench.py's split moved the table's writer to ``engine/app/_bench_output.py``: no
    test runs the scripts, which need the real data and minutes."""
    missing = []
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        for module, name in _engine_imports(script):
            mod = importlib.import_module(module)
            if not hasattr(mod, name) and not (hasattr(mod, "__path__")
                                               and importlib.util.find_spec(f"{module}.{name}") is not None):
                missing.append(f"{script.name}: from {module} import {name}")
    assert len(list((ROOT / "benchmarks").glob("*.py"))) > 20 and not missing, missing


def test_real_data_missing_says_which_flag_or_setting_names_its_directory(monkeypatch, tmp_path):
    """`breakdown.py mooncake --data /nonexistent` (and the other scripts that read a trace by name) ended in a
    traceback whose last line said "pass an existing, readable file": no flag of theirs takes a file."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    real = importlib.import_module("_real")
    for name in real.FILES:
        with pytest.raises(SystemExit) as info:
            real.load_real(name, tmp_path / "nowhere")
        said = str(info.value.code)
        assert str(tmp_path / "nowhere" / real.FILES[name]) in said, said
        assert "--data" in said and "SMARTBATCH_DATA_DIR" in said, said


def _conversations(seed: int = 0) -> list[Request]:
    """Anthropic conversations whose turns part from their earlier turns' blocks after a random count, some with
    a partial last block, due in 10 minutes to a day: sync calls and batches that read one another's entries."""
    rnd = random.Random(seed)
    out = []
    for c in range(8):
        base = [0, 1000 * (c + 1), 1000 * (c + 1) + 1]
        for t in range(1, 7):
            blocks = base[:rnd.randint(1, len(base))] + [1000 * (c + 1) + 10 * t + j for j in range(rnd.randint(1, 3))]
            out.append(Request.model_validate({
                "id": f"c{c}t{t}", "arrival_s": 200.0 * t + 11.0 * c + 50 * rnd.random(), "provider": "anthropic",
                "model": "claude-sonnet-4-5", "input_tokens": 512 * len(blocks) + rnd.choice([0, 100, 400]),
                "output_tokens": 200, "deadline_s": rnd.choice([600.0, 3600.0, 86400.0]), "priority": "background",
                "prefix_blocks": blocks}))
            if rnd.random() < 0.7:
                base = blocks
    return out


def test_the_one_hour_cache_probe_with_no_member_continuing_bills_what_the_simulator_bills(monkeypatch):
    """`bench_ttl1h_batches.py` prices Anthropic's batches itself. It kept the simulator's rule of before stop 84 (a
    leading run of warm blocks read, every block kept warm), so with no member at the hour's terms it billed under
    the simulator, and the hour's writes looked like a saving that was that rule's (docs/benchmarks.md, "Stop 85")."""
    from engine.runtime.providers import SimProvider

    monkeypatch.setattr(SimProvider, "end_batch", SimProvider.end_batch)  # restored after the probe's patch
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("_ttl1h_under_test", ROOT / "benchmarks" / "bench_ttl1h_batches.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    cat = default_catalog()
    reqs = _conversations()
    plain = simulate(reqs, load_policy("smart", cat), seed=0)
    assert {"batch_api", "sync"} <= {MODES[m] for m in plain.mode}  # the premise: both read the entries left
    probe.patch(set(), whole=False)
    patched = simulate(reqs, load_policy("smart", cat), seed=0)
    assert list(patched.cost) == pytest.approx(list(plain.cost), abs=1e-12), (patched.total_cost, plain.total_cost)
