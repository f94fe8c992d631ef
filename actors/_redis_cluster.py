"""Redis Cluster (cluster mode enabled: AWS ElastiCache and MemoryDB in cluster mode, Redis Enterprise's OSS
cluster API, a self-hosted cluster), for the ledger, the cache and the journal alike.

A cluster splits keys over its nodes by hash slot: a plain client sent to one node gets ``MOVED`` for the keys of
another, and a Lua script must touch keys of one slot only. So with ``redis_cluster`` set, the client is
``redis.asyncio.cluster.RedisCluster`` (it follows the slots), and a key space that a script changes atomically
(the budget ledger) or that one ``INFO run_id`` must watch (an engine's journal) lives under one hash tag, ``{...}``:
its keys are then in one slot, on one node. Without it, nothing changes: a single Redis keeps the key names it had
(an engine upgraded on its Redis finds its ledger and its journal where they were).

``check_cluster_modes`` runs at the engine's start: a setting that says otherwise than the Redis it names is a
``ConfigError`` naming the setting and the fix, never a run whose ledger refuses every call or whose cache and
journal fail one key in three (what a cluster node gave a plain client before)."""

from __future__ import annotations

from typing import Any

from engine.core.errors import ConfigError
from engine.core.settings import masked_url

__all__ = ["async_client", "check_cluster_modes", "cluster_errors", "cluster_mode", "config_get", "has_hash_tag",
           "is_cluster_client", "mode_mismatch", "namespace", "server_info", "serving_node", "slot_left",
           "tagless_prefix"]


def has_hash_tag(key: str) -> bool:
    """Whether Redis Cluster hashes ``key`` by a tag: the first ``{`` and the first ``}`` after it with at least one
    character between (Redis's own rule: ``a{}b{c}`` is hashed whole, its later ``{c}`` is no tag; taken for one, a
    ledger under that prefix had each key in a slot of its own, a review)."""
    i = key.find("{")
    return i >= 0 and key.find("}", i + 1) > i + 1


def namespace(prefix: str, cluster: bool) -> str:
    """The namespace of a key space that must live in one slot: ``{prefix}`` on a cluster, unless the prefix holds
    a hash tag already (then as given); the prefix itself on a single Redis, as before. ``ConfigError`` for a
    prefix no tag can hold (``tagless_prefix``)."""
    if not cluster or has_hash_tag(prefix):
        return prefix
    if tagless_prefix(prefix):
        raise ConfigError(_tagless(prefix, "redis_prefix"))
    return "{" + prefix + "}"


def tagless_prefix(prefix: str) -> bool:
    """Whether ``prefix`` holds no hash tag and starts with ``}``: ``{prefix}`` then opens with ``{}``, an empty tag,
    which Redis does not take for one (``}{`` gave ``{}{}``): each key hashed whole, each in a slot of its own, and
    every script of the ledger or the journal's watch refused while the start's checks passed (a review)."""
    return not has_hash_tag(prefix) and prefix.startswith("}")


def _tagless(prefix: str, setting: str) -> str:
    return (f"setting {setting}: {prefix!r} starts with '}}' and holds no hash tag of its own, so on a Redis Cluster "
            f"its keys' tag {{{prefix}}} is empty and each key lands in a slot of its own (every script refused); "
            "give a prefix that does not start with '}', or one that holds its tag, such as '{smartbatch}'")


def async_client(url: str, *, cluster: bool, timeout_s: float, retries: bool = True, name: str = "redis") -> Any:
    """A ``redis.asyncio`` client of ``url``: ``RedisCluster`` when ``cluster``, else ``Redis``. ``retries=False``:
    no client-side retries, the caller's outage policy answers at once (a cluster client still follows ``MOVED``
    and ``ASK``, which are not failures). Closed with ``actors._redis_gate.close_client`` (its gate, named ``name``:
    no connection opens after the close)."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    from actors._redis_gate import gate

    kw: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
    if not retries:
        kw["retry"] = Retry(NoBackoff(), 0)
    if cluster:
        from redis.asyncio.cluster import RedisCluster

        # Unbounded, as a single Redis's pool is: by default it holds 100 connections a node and raises
        # MaxConnectionsError past them, at once, which the ledger (all on one node; its actor answers up to 1000
        # calls at once) and the cache read as Redis down (300 claims at once: 200 budget_unavailable, a review).
        return gate(RedisCluster.from_url(url, max_connections=2**31, **kw), name)
    return gate(aioredis.Redis.from_url(url, **kw), name)


def is_cluster_client(client: Any) -> bool:
    """Whether ``client`` is a cluster client (``async_client(..., cluster=True)``)."""
    from redis.asyncio.cluster import RedisCluster

    return isinstance(client, RedisCluster)


def cluster_errors() -> tuple[type[BaseException], ...]:
    """What a cluster client raises beside ``RedisError`` (no node answers, a slot no node serves)."""
    from redis.exceptions import RedisClusterException

    return (RedisClusterException,)


async def _node(client: Any, key: str) -> dict[str, Any]:
    """Keyword arguments sending a node-wide command (``INFO``, ``CONFIG GET``) to the node that serves ``key``: a
    cluster client sends them to every node, or any, by default. Its slots map is read at its first command (once:
    a no-op after), so it is read here first."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        await client.initialize()
        return {"target_nodes": client.get_node_from_key(key)}
    return {}


async def server_info(client: Any, key: str, section: str = "server") -> dict[str, Any]:
    """``INFO section`` of the Redis process that holds ``key`` (on a cluster, the node serving its slot now)."""
    return await client.info(section, **await _node(client, key))


async def serving_node(client: Any, key: str) -> str | None:
    """The name (``host:port``) of the cluster node that ``key``'s commands go to now; None on a single Redis."""
    if is_cluster_client(client):
        # A command on the key first: the client learns that a slot moved only from a MOVED, and the watch of an
        # engine with no call since its ledger's slot moved read the node it left, the same process each second,
        # while the node it went to restarted empty (a review: a waiting claim lost until the engine's next call).
        await client.exists(key)
    node = (await _node(client, key)).get("target_nodes")
    return None if node is None else node.name


async def slot_left(client: Any, node: str | None, run_id: str, key: str) -> bool:
    """Whether the cluster node named ``node`` still runs as process ``run_id``, a master holding no key of ``key``'s
    slot: the slot was moved off it (``redis-cli --cluster reshard``, whose MIGRATE moves each key whole), not lost
    with it; whether the node it went to kept them since is the caller's to check (it may have restarted). A restart
    has another run_id; a node failed over is demoted to a replica, or holds its keys still until it learns it was;
    one that does not answer (removed from the cluster) tells nothing: False for each."""
    if node is None or not is_cluster_client(client) or (target := client.get_node(node_name=node)) is None:
        return False
    try:
        server = await client.info("server", target_nodes=target)
        role = (await client.info("replication", target_nodes=target)).get("role")
        held = await client.execute_command("CLUSTER", "COUNTKEYSINSLOT", client.keyslot(key), target_nodes=target)
    except Exception:
        return False
    return str(server.get("run_id", "")) == run_id and role == "master" and int(held) == 0


async def config_get(client: Any, key: str, pattern: str) -> dict[str, Any]:
    """``CONFIG GET pattern`` of the Redis process that holds ``key``."""
    return await client.config_get(pattern, **await _node(client, key))


async def cluster_mode(client: Any) -> bool | None:
    """Whether the Redis a client of ``async_client`` speaks to runs in cluster mode; None when that cannot be told
    (no answer, ``INFO`` refused): the other checks say what they say of such a Redis."""
    from redis.asyncio.cluster import RedisCluster
    from redis.exceptions import RedisClusterException

    try:
        if isinstance(client, RedisCluster):
            await client.initialize()  # refuses a Redis not in cluster mode
            return True
        return bool(int((await client.info("cluster")).get("cluster_enabled", 0)))
    except RedisClusterException as exc:
        return False if "not enabled" in str(exc) else None
    except Exception:
        return None


def _cluster_enabled(url: str) -> bool | None:
    """Whether the Redis at ``url`` runs in cluster mode; None when it does not answer (or refuses ``INFO``): the
    checks of each part say what they say of an unreachable Redis."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0) as client:
            return bool(int(client.info("cluster").get("cluster_enabled", 0)))
    except Exception:
        return None


def check_cluster_modes(settings: Any, only: tuple[str, ...] = ("budgets", "cache", "journal")) -> None:
    """Raise ``ConfigError`` when a Redis the engine uses runs in cluster mode and its ``redis_cluster`` setting is
    off, or the other way round. Each Redis set is asked once (``INFO cluster``); ``only``: the parts checked."""
    # Only the parts asked for are read: a rescue's settlement passes the budgets' settings alone.
    parts = []
    if "budgets" in only:
        parts.append(("budgets", settings.budgets.redis_url, settings.budgets.redis_cluster))
    if "cache" in only:
        parts.append(("cache", settings.cache.redis_url, settings.cache.redis_cluster))
    journal_url = settings.journal_redis_url() if "journal" in only else None
    if journal_url and settings.journal.dir is None:
        parts.append(("journal", journal_url, settings.journal_redis_cluster()))
    asked: dict[str, bool | None] = {}
    for part, url, said in parts:
        if not url or part not in only:
            continue
        where = f"{part}.redis_url" if part != "journal" else _journal_source(settings)
        if said and _database(url) not in (None, 0):  # redis-py's cluster client refuses it, in the actor
            raise ConfigError(
                f"setting {where}: {masked_url(url)} names database {_database(url)}, and a Redis Cluster has "
                f"database 0 only ({part}.redis_cluster is true); end the URL with /0, or give another prefix "
                f"({'cache' if part == 'journal' else part}.redis_prefix) to keep its keys apart")
        # The keys a script or the journal's watch needs in one slot go under the prefix's hash tag: one no tag can
        # hold failed every script while the checks below passed (the cache's own keys take no tag).
        setting = "budgets.redis_prefix" if part == "budgets" else "cache.redis_prefix"
        prefix = settings.budgets.redis_prefix if part == "budgets" else settings.cache.redis_prefix
        if said and part != "cache" and tagless_prefix(prefix):
            raise ConfigError(_tagless(prefix, setting))
        if url not in asked:
            asked[url] = _cluster_enabled(url)
        enabled = asked[url]
        if enabled is None or enabled == said:
            continue
        raise mode_mismatch(part, masked_url(url), enabled, where)


def mode_mismatch(part: str, url: str, enabled: bool, where: str = "") -> ConfigError:
    """The error of ``{part}.redis_cluster`` saying otherwise than the Redis at ``url`` (masked), which runs in
    cluster mode or not (``enabled``); ``where``: the setting holding the URL."""
    env, where = f"SMARTBATCH_{part.upper()}__REDIS_CLUSTER", where or f"{part}.redis_url"
    if enabled:
        return ConfigError(
            f"setting {part}.redis_cluster: the Redis at {url} ({where}) is a Redis Cluster node "
            "(cluster_enabled:1), where a plain client meets MOVED for most keys and a script for keys of several "
            f"slots is refused; set {env}=true ({part}.redis_cluster) to use it as a cluster (docs/budgets.md, "
            "Redis Cluster), or point it at a single Redis")
    return ConfigError(
        f"setting {part}.redis_cluster: it is true, but the Redis at {url} ({where}) is not in cluster mode "
        f"(cluster_enabled:0); unset {env} for a single Redis, or point {where} at a node of the cluster")


def _database(url: str) -> int | None:
    """The database number a Redis URL names (its path or ``?db=``), or None."""
    from urllib.parse import parse_qs, urlsplit

    parts = urlsplit(url)
    raw = parse_qs(parts.query).get("db", [parts.path.strip("/")])[0]
    return int(raw) if raw.isdigit() else None


def _journal_source(settings: Any) -> str:
    """The setting whose URL the journal uses."""
    if settings.journal.redis_url:
        return "journal.redis_url"
    return "budgets.redis_url" if settings.budgets.redis_url else "cache.redis_url"
