"""The claims of a run cut off by a crash, settled in a Redis budget ledger at what its provider batches, read by
a resume (``engine.app._batch_rescue``), finished (billed).

A killed run never settles the claims of the members its batches were still running: in Redis, each then
expired unspent after ``reservation_ttl_s`` (its room released, its spend counted nowhere), while the resume,
counting nothing under Redis so as not to count twice, left the ledger short of the bill. Settled by claim id,
each counts once: a claim the killed run settled already has no record left (nothing counted again), an open
one is settled (its room given back), one swept at its expiry within a day still counts its spend (the ledger's
``SETTLE``). An in-process ledger starts at 0 with each run: the resume charges what it read instead
(``charges``)."""

from __future__ import annotations

import asyncio

__all__ = ["settle_claims"]


async def settle_claims(settings, claims: dict[str, float]) -> None:
    """Settle each journaled claim id at ``claims[id]`` (USD) in ``settings.budgets``' Redis ledger; nothing
    without one. Raises ``ConfigError`` naming ``budgets.redis_url`` when Redis does not take them."""
    b = settings.budgets
    if not b.redis_url or not claims:
        return
    from actors._redis_cluster import async_client, check_cluster_modes, namespace
    from actors.budget_redis import RedisBudgetBook
    from engine.core.errors import ConfigError
    from engine.core.settings import masked_url

    # Before the first script: a cluster node read as a single Redis (or the other way round) answered MOVED, said
    # as "run again once it answers", which it never did; a script it did run met keys of other nodes midway, after
    # its first writes, counted again by that run again (a review). The engine's start checks it after this.
    await asyncio.to_thread(check_cluster_modes, settings, only=("budgets",))
    t = max(b.redis_timeout_s, 5.0)  # one call, at the start of a run: a slow answer is waited for, not given up
    client = async_client(b.redis_url, cluster=b.redis_cluster, timeout_s=t)
    try:
        book = RedisBudgetBook(client, list(b.specs), b.throttle, prefix=namespace(b.redis_prefix, b.redis_cluster),
                               reservation_ttl_s=b.reservation_ttl_s)
        await book.settle_many(sorted(claims.items()))
    except Exception as exc:
        raise ConfigError(f"the budget ledger at budgets.redis_url = {masked_url(b.redis_url)!r} did not take the "
                          f"settlement of {len(claims):,} claim(s) of the earlier run ({type(exc).__name__}: "
                          f"{str(exc)[:200]}): run again once it answers (each claim counts once)") from None
    finally:
        await client.aclose()
