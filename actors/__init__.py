"""The live engine's actors: plain asyncio classes (unit-testable without Ray), wired to Ray by
``actors.remote``. Floor 3: imports the core and policies, never the driver."""

from actors.budget import BudgetController
from actors.cache import ResultCache
from actors.dispatcher import Dispatcher
from actors.grouper import Grouper
from actors.hub import ResultHub
from actors.ingest import Ingest

__all__ = ["BudgetController", "Dispatcher", "Grouper", "Ingest", "ResultCache", "ResultHub"]
