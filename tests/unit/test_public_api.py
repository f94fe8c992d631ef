import logging
from pathlib import Path

import engine
import policies


def test_engine_public_surface_is_pinned():
    assert sorted(engine.__all__) == sorted([
        "BudgetSettings", "BudgetSpec", "Catalog", "CatalogError", "ConfigError", "Engine", "EngineStopped", "LowerBound",
        "Overloaded", "PolicyError", "Price", "ProviderError", "RegistryError", "Request", "RequestError", "Result",
        "ResultFuture", "Settings", "SimResult", "SmartbatchError", "Trace", "TraceError",
        "compat_key", "default_catalog", "featurize", "fingerprint", "load_catalog", "load_trace",
        "lower_bound", "price_alone", "price_batch", "simulate", "with_budget", "write_trace",
    ])
    for name in engine.__all__:
        if name not in ("Engine", "ResultFuture"):  # lazy: importing it starts nothing, but pulls in Ray
            assert hasattr(engine, name), name


def test_policies_public_surface_is_pinned():
    assert sorted(policies.__all__) == sorted([
        "BatchAll", "CacheOnly", "Fixed", "Naive", "Policy", "PolicyParams", "Smart", "SmartParams",
        "available_policies", "load_policy", "register",
    ])


def _lint(config: Path) -> int:
    from importlinter.cli import lint_imports

    # import-linter configures logging with dictConfig, which disables every logger that exists already: the
    # later tests that read the engine's log lines (caplog) would see none of them. Give them back.
    loggers = [lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)]
    disabled = {lg: lg.disabled for lg in loggers}
    root = (logging.root.level, list(logging.root.handlers))
    try:
        return lint_imports(config_filename=str(config), no_cache=True, no_logo=True)
    finally:
        for lg, was in disabled.items():
            lg.disabled = was
        logging.root.setLevel(root[0])
        logging.root.handlers[:] = root[1]


ROOT = Path(engine.__file__).parent.parent


def test_the_layers_hold(capsys):
    """import-linter, with the contracts in pyproject.toml: core < policies < runtime kernel < simulator,
    actors and emulator (independent of each other) < driver and CLI; nothing below the driver imports Ray."""
    assert _lint(ROOT / "pyproject.toml") == 0, capsys.readouterr().out[-3000:]


def test_the_layer_check_fails_when_a_layer_is_crossed(tmp_path, capsys):
    # The same tool with the floors upside down must report a broken contract: the check is not vacuous.
    cfg = tmp_path / ".importlinter"
    cfg.write_text("[importlinter]\nroot_packages =\n    engine\n\n[importlinter:contract:upside-down]\n"
                   "name = upside down\ntype = layers\nlayers =\n    engine.core\n    engine.app\n")
    assert _lint(cfg) == 1
    assert "BROKEN" in capsys.readouterr().out


def test_no_module_is_over_400_lines():
    long = {str(f.relative_to(ROOT)): n for pkg in ("engine", "actors", "policies")
            for f in (ROOT / pkg).rglob("*.py") if (n := len(f.read_text().splitlines())) > 400}
    assert not long, f"split these modules (at most 400 lines each): {long}"


def test_an_actors_process_loads_only_its_own_module_and_the_package_still_names_every_actor():
    """A Ray worker of one actor imports its class's module, and so the package; the package loads the other
    actors' modules only when one is asked for (about 0.2 s of CPU in each of an engine's processes)."""
    import subprocess
    import sys

    code = ("import sys, actors.hub\n"
            "others = [m for m in ('actors.budget', 'actors.cache', 'actors.dispatcher', 'actors.grouper',"
            " 'actors.ingest') if m in sys.modules]\n"
            "assert not others, others\n"
            "from actors import Dispatcher, ResultHub\n"
            "assert Dispatcher.__module__ == 'actors.dispatcher' and ResultHub.__module__ == 'actors.hub'\n"
            "import actors\n"
            "assert set(actors.__all__) <= set(dir(actors))\n"
            "try:\n    actors.Nothing\nexcept AttributeError as e:\n    assert 'Nothing' in str(e)\n"
            "else:\n    raise SystemExit('no AttributeError')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
