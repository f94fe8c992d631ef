"""smartbatch core: request model, catalog, cost model, features, traces, simulator and lower bound.

Floors (imports only go down): core (this package minus ``simulator``/``lower_bound``/``bench``/``cli``) ->
``policies`` -> runtimes (``engine.simulator``, ``actors``) -> driver API and CLI.
"""

from engine.budgets import BudgetSettings, BudgetSpec
from engine.catalog import Catalog, default_catalog, load_catalog
from engine.cost import Price, price_alone, price_batch
from engine.errors import (
    CatalogError,
    ConfigError,
    PolicyError,
    ProviderError,
    RegistryError,
    SmartbatchError,
    TraceError,
)
from engine.features import compat_key, featurize, fingerprint
from engine.lower_bound import LowerBound, lower_bound
from engine.request import Request
from engine.result import Result
from engine.settings import Settings, with_budget
from engine.simulator import SimResult, simulate
from engine.trace import Trace, load_trace, write_trace

__all__ = [
    "BudgetSettings",
    "BudgetSpec",
    "Catalog",
    "CatalogError",
    "Engine",
    "ConfigError",
    "LowerBound",
    "PolicyError",
    "Price",
    "ProviderError",
    "RegistryError",
    "Request",
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
        from engine import driver

        return getattr(driver, name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
