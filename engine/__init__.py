"""smartbatch core: request model, catalog, cost model, features, traces, simulator and lower bound.

Floors (imports only go down): core (this package minus ``simulator``/``lower_bound``/``bench``/``cli``) ->
``policies`` -> runtimes (``engine.sim.simulator``, ``actors``) -> driver API and CLI.
"""

from engine.core.budgets import BudgetSettings, BudgetSpec
from engine.core.catalog import Catalog, default_catalog, load_catalog
from engine.core.cost import Price, price_alone, price_batch
from engine.core.errors import (
    CatalogError,
    ConfigError,
    EngineStopped,
    Overloaded,
    PolicyError,
    ProviderError,
    RegistryError,
    RequestError,
    SmartbatchError,
    TraceError,
)
from engine.core.features import compat_key, featurize, fingerprint
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import Settings, with_budget
from engine.core.trace import Trace, load_trace, write_trace
from engine.sim.lower_bound import LowerBound, lower_bound
from engine.sim.simulator import SimResult, simulate

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


def __getattr__(name: str):
    # The driver starts Ray; importing it lazily keeps `import engine` light and the core free of Ray.
    if name in ("Engine", "ResultFuture"):
        from engine.app import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
