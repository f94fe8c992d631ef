"""The start's check of a budget ledger on Redis (``BudgetController.check_ledger``): a budget that cannot be
enforced stops the engine's start with a ``ConfigError`` naming ``budgets.redis_url`` and the fix."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actors._redis_cluster import cluster_mode, config_get, mode_mismatch
from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError

__all__ = ["check_redis_ledger"]

log = get_logger("smartbatch.budget")


async def check_redis_ledger(book: Any, url: str, names: str, errors: tuple[type[BaseException], ...],
                             describe: Callable[[BaseException], str]) -> None:
    """Raise ``ConfigError`` when the Redis of ``book`` (``RedisBudgetBook``, at ``url``, password masked) does not
    answer, refuses the ledger's scripts or their writes (a replica, a full Redis), or may evict its keys;
    ``names``: the budgets it holds; ``errors``: what a failed call raises; ``describe``: an error, masked."""
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import ResponseError

    cluster = isinstance(book.client, RedisCluster)
    if await cluster_mode(book.client) not in (cluster, None):  # a cluster node's MOVED read as "no writes taken"
        raise mode_mismatch("budgets", url, not cluster) from None
    try:
        await book.probe()  # reachable, authorised, scripting allowed, and its writes taken
        evicts = await book.eviction()
    except errors as exc:
        if isinstance(exc, ResponseError):  # it answered, and refused (read-only, out of memory, no rights)
            raise ConfigError(
                f"setting budgets.redis_url: the budget ledger's Redis at {url} refuses the ledger's "
                f"writes ({describe(exc)}), so budgets {names} cannot be enforced; point "
                "SMARTBATCH_BUDGETS__REDIS_URL at a primary (not a replica) with room to write, or unset it "
                "to keep the budgets in this engine alone") from None
        raise ConfigError(
            f"setting budgets.redis_url: the budget ledger's Redis at {url} did not answer "
            f"({describe(exc)}), so budgets {names} cannot be enforced; start Redis there, point "
            "SMARTBATCH_BUDGETS__REDIS_URL at a running one, or unset it to keep the budgets in this "
            "engine alone") from None
    if evicts:
        raise ConfigError(
            f"setting budgets.redis_url: the budget ledger's Redis at {url} may evict keys ({evicts}), "
            f"and with them the spend of budgets {names}, which would then be passed unsaid; point "
            "SMARTBATCH_BUDGETS__REDIS_URL at a Redis with maxmemory-policy noeviction, or run this one so "
            "(CONFIG SET maxmemory-policy noeviction)")
    if kept := await _keeps_nothing(book.client, book.route[0]):
        # Not refused (a test's or a dev's Redis), but said: a restart of it forgets the budgets' spend older than
        # what each engine resends (two hours), and every budget is then passable by that much (a helper's hunt).
        log.warning("budget ledger: the Redis at %s (budgets.redis_url) keeps nothing on disk (%s): a restart of it forgets the spend "
                    "of budgets %s older than two hours, and they can then be passed by that much; turn persistence "
                    "on (CONFIG SET appendonly yes, and CONFIG REWRITE) (docs/budgets.md, Redis faults)", url, kept,
                    names)


async def _keeps_nothing(client: Any, key: str) -> str | None:
    """How a Redis keeps nothing on disk (no RDB save point and no AOF), or None; None too when its configuration
    cannot be read (managed services keep their own)."""
    from redis.exceptions import ResponseError

    try:
        cfg = await config_get(client, key, "save")  # of the node holding the ledger, on a cluster
        cfg.update(await config_get(client, key, "appendonly"))
    except ResponseError:
        return None
    save, aof = str(cfg.get("save", "")).strip(), str(cfg.get("appendonly", "")).strip()
    return None if save or aof == "yes" else 'save "", appendonly no'
