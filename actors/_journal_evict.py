"""The start's check that the journal's Redis keeps its records (no evicting ``maxmemory-policy``): on a Redis
Cluster, read on the node that serves the journal's slot."""

from __future__ import annotations

from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError

__all__ = ["check_keeps_records"]

log = get_logger("smartbatch.journal")


def check_keeps_records(settings, journal: str | None = None):
    """``settings`` with a journal that keeps its records. A Redis with a memory limit and any
    ``maxmemory-policy`` but ``noeviction`` (a Redis run as a cache) may drop them, unsaid, and a restart would
    then pay again for the calls and batches they named (a helper's fault hunt): one named for the journal (or
    the budgets) is refused with ``ConfigError``; the cache's, which the journal only falls back to, is left to
    the cache and the journal kept in the hub's memory, with a warning. A Redis that does not answer, or does
    not let its configuration be read (managed services), is let be: the journal is an aid, never a gate. On a
    Redis Cluster the node read is the one serving the slot of ``journal`` (the run's journal name), every
    master's without it: the URL's node was read, and a journal on an evicting node passed."""
    url = settings.journal_redis_url()
    if not url:
        return settings
    try:
        policy, limit = _eviction_of(url, settings, journal)
    except Exception:
        return settings
    if not limit or policy in ("", "noeviction"):  # no limit: nothing is ever evicted, whatever the policy
        return settings
    why = (f"the journal's Redis may evict keys (maxmemory {limit}, maxmemory-policy {policy}), and with them the "
           "records of calls and batches under way, which a restart would then pay for again")
    if not settings.journal.redis_url and not settings.budgets.redis_url:
        log.warning("smartbatch: %s; the journal is kept in the result hub's memory instead (set "
                    "SMARTBATCH_JOURNAL__REDIS_URL to a Redis with maxmemory-policy noeviction to keep it there)",
                    why.replace("the journal's Redis", "the cache's Redis (cache.redis_url)"))
        return settings.model_copy(update={"journal": settings.journal.model_copy(update={"in_memory": True})})
    setting = "journal.redis_url" if settings.journal.redis_url else "budgets.redis_url"
    raise ConfigError(f"setting {setting}: {why}; point SMARTBATCH_JOURNAL__REDIS_URL at a Redis with "
                      "maxmemory-policy noeviction, or run this one so (CONFIG SET maxmemory-policy noeviction)")


def _eviction_of(url: str, settings, journal: str | None) -> tuple[str, int]:
    """(``maxmemory-policy``, ``maxmemory``) of the Redis holding the journal ``journal`` at ``url``: on a cluster,
    the node serving its slot (without a name, the first master found that may evict)."""
    import redis

    kw = {"socket_timeout": 2.0, "socket_connect_timeout": 2.0}
    if not settings.journal_redis_cluster():
        with redis.Redis.from_url(url, **kw) as client:
            cfg = client.config_get("maxmemory*")
        return str(cfg.get("maxmemory-policy", "")), int(cfg.get("maxmemory", 0) or 0)
    from redis.cluster import RedisCluster

    from actors._redis_cluster import namespace

    with RedisCluster.from_url(url, **kw) as client:
        if journal is None:
            nodes = client.get_primaries()
        else:  # the key its spaces hash by (``RedisJournal._base``)
            nodes = [client.get_node_from_key(namespace(f"{settings.cache.redis_prefix}:journal:{journal}", True)
                                              + ":")]
        found = [client.config_get("maxmemory*", target_nodes=node) for node in nodes]
    evicting = [c for c in found if int(c.get("maxmemory", 0) or 0) and c.get("maxmemory-policy") != "noeviction"]
    cfg = (evicting or found)[0]
    return str(cfg.get("maxmemory-policy", "")), int(cfg.get("maxmemory", 0) or 0)
