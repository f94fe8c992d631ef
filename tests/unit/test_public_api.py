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
