import engine
import policies


def test_engine_public_surface_is_pinned():
    assert sorted(engine.__all__) == sorted([
        "BudgetSettings", "BudgetSpec", "Catalog", "CatalogError", "ConfigError", "Engine", "LowerBound", "PolicyError", "Price", "ProviderError",
        "RegistryError", "Request", "Result", "ResultFuture", "Settings", "SimResult", "SmartbatchError", "Trace", "TraceError",
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


def test_core_and_policies_never_import_ray():
    # Floor 4 (driver, CLI) may; everything below it must not.
    upper = {"driver.py", "_supervise.py", "cli.py", "live.py"}  # live.py replays through the driver (floor 4)
    import ast
    from pathlib import Path

    root = Path(engine.__file__).parent.parent
    for pkg in ("engine", "policies"):
        for f in (root / pkg).rglob("*.py"):
            if f.name in upper:
                continue
            tree = ast.parse(f.read_text())
            for node in ast.walk(tree):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module]
                for n in names:
                    assert not n.startswith(("ray", "actors")), f"{f} imports {n}"
