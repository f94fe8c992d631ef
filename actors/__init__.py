"""The live engine's actors: plain asyncio classes (unit-testable without Ray), wired to Ray by
``actors.remote``. Floor 3: imports the core and policies, never the driver."""

from engine.core.lazy import lazy_exports

# Where each actor class lives. Imported on first use (PEP 562): Ray's worker for one actor imports the
# package of its class, and loading every actor's module with it cost each of an engine's processes about
# 0.2 s of CPU at start (a hub needs 0.35 s of imports, all six 0.69 s).
_HOME = {
    "BudgetController": "actors.budget", "Dispatcher": "actors.dispatcher", "Grouper": "actors.grouper",
    "Ingest": "actors.ingest", "ResultCache": "actors.cache", "ResultHub": "actors.hub",
}

__all__ = ["BudgetController", "Dispatcher", "Grouper", "Ingest", "ResultCache", "ResultHub"]


__getattr__, __dir__ = lazy_exports(__name__, _HOME, __all__, globals())
