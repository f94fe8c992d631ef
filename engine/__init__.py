"""smartbatch core: request model, catalog, cost model, features, traces, simulator and lower bound.

Floors (imports only go down): core (this package minus ``simulator``/``lower_bound``/``bench``/``cli``) ->
``policies`` -> runtimes (``engine.sim.simulator``, ``actors``) -> driver API and CLI.
"""

from engine.core.lazy import lazy_exports

# Where each public name lives. Imported on first use (PEP 562), so a process that needs only part of the
# engine loads only that part: every engine actor imports ``engine.core`` modules, and loading the simulator,
# the lower bound and the trace reader with them cost each actor's process about 0.17 s of CPU at start.
_HOME = {
    "BudgetSettings": "engine.core.budgets", "BudgetSpec": "engine.core.budgets",
    "Catalog": "engine.core.catalog", "default_catalog": "engine.core.catalog", "load_catalog": "engine.core.catalog",
    "Price": "engine.core.cost", "price_alone": "engine.core.cost", "price_batch": "engine.core.cost",
    **dict.fromkeys(["CatalogError", "ConfigError", "EngineStopped", "Overloaded", "PolicyError", "ProviderError",
                     "RegistryError", "RequestError", "SmartbatchError", "TraceError"], "engine.core.errors"),
    "compat_key": "engine.core.features", "featurize": "engine.core.features", "fingerprint": "engine.core.features",
    "Request": "engine.core.request", "Result": "engine.core.result",
    "Settings": "engine.core.settings", "with_budget": "engine.core.settings",
    "Trace": "engine.core.trace", "load_trace": "engine.core.trace", "write_trace": "engine.core.trace",
    "LowerBound": "engine.sim.lower_bound", "lower_bound": "engine.sim.lower_bound",
    "SimResult": "engine.sim.simulator", "simulate": "engine.sim.simulator",
    # The driver starts Ray: importing it only when asked keeps the core free of Ray.
    "Engine": "engine.app.driver", "ResultFuture": "engine.app.driver",
}

__all__ = [
    "BudgetSettings",
    "BudgetSpec",
    "Catalog",
    "CatalogError",
    "Engine",
    "ConfigError",
    "EngineStopped",
    "LowerBound",
    "Overloaded",
    "PolicyError",
    "Price",
    "ProviderError",
    "RegistryError",
    "Request",
    "RequestError",
    "Result",
    "ResultFuture",
    "Settings",
    "SimResult",
    "SmartbatchError",
    "Trace",
    "TraceError",
    "compat_key",
    "default_catalog",
    "featurize",
    "fingerprint",
    "load_catalog",
    "load_trace",
    "lower_bound",
    "price_alone",
    "price_batch",
    "simulate",
    "with_budget",
    "write_trace",
]


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__, globals())
