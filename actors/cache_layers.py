"""The cache's storage layers: an in-process LRU, Redis, and a content-addressed blob store.

Lookups go memory -> Redis; an output larger than ``blob_min_kb`` is kept once in the blob store and the
layers hold its reference. Redis is an accelerator, never a dependency of a request: when it is unreachable
or slow the layer marks itself down, logs one line, and answers "miss" (reads) or buffers (writes) without
waiting, until a retry after ``redis_retry_s`` finds it back; then buffered writes are replayed.

A stored value is a versioned JSON document that names its own fingerprint. Anything else under our keys
(a corrupt value, another program's, an older schema) is ignored and counted, never served.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tempfile
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Hashable
from pathlib import Path
from typing import NamedTuple, Protocol

from engine.core._logkeys import get_logger, masked_url
from engine.core.files import write_atomic
from engine.core.result import Result
from engine.core.tool_calls import calls_bytes

__all__ = ["SCHEMA", "BlobStore", "CorruptValue", "Entry", "LocalBlobStore", "MemoryLRU", "RedisLayer",
           "decode", "encode"]

# 2 since stop 54: a near key holds the output cap, an exact key a line's indentation. An entry of 1 was served
# where it must not be (a capped answer to an uncapped ask, warmed from Redis: a review); in Redis under keys of
# its own version, it is never read again and expires. 3 since stop 57: an answer keeps its tool calls and how it
# ended; an entry of 2 lost both, and served a tool call's answer as an empty text.
SCHEMA = 3
_APP = "smartbatch.cache"
log = get_logger("smartbatch.cache")


class CorruptValue(ValueError):
    """A stored value that is not one of ours, or not for this key."""


class Entry(NamedTuple):
    """One generated result as the cache keeps it. ``near_key`` and ``text`` let a restarted cache rebuild
    its near-duplicate index from Redis; ``blob`` is set when the output lives in the blob store."""

    fp: str
    result: Result
    near_key: Hashable | None = None
    text: str = ""
    blob: str | None = None
    params: dict | None = None  # the request's parameters: part of its near-duplicate vector

    def size(self) -> int:
        return 400 + len(self.text) + len(self.result.output or "") + calls_bytes(self.result.tool_calls)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def encode(e: Entry) -> bytes:
    return json.dumps({"app": _APP, "v": SCHEMA, "fp": e.fp, "result": e.result.model_dump(mode="json"),
                       "near_key": e.near_key, "text": e.text, "blob": e.blob, "params": e.params},
                      separators=(",", ":")).encode()


def decode(raw: bytes, fp: str | None = None) -> Entry:
    """The entry stored in ``raw``; raises ``CorruptValue`` for anything that is not a current entry for
    ``fp`` (when given)."""
    try:
        d = json.loads(raw)
        if not isinstance(d, dict) or d.get("app") != _APP or d.get("v") != SCHEMA:
            raise CorruptValue("not a smartbatch cache entry of this schema version")
        if fp is not None and d.get("fp") != fp:
            raise CorruptValue("entry stored under another fingerprint")
        res = Result.model_validate(d["result"])
        nk = d.get("near_key")
        params = d.get("params")
        if params is not None and not isinstance(params, dict):
            raise CorruptValue("params must be an object")
        return Entry(d["fp"], res, _tuples(nk) if nk is not None else None, str(d.get("text", "")),
                     d.get("blob"), params)
    except CorruptValue:
        raise
    except Exception as exc:  # JSON, schema or type errors: all mean "not ours"
        raise CorruptValue(f"{type(exc).__name__}: {exc}") from exc


class MemoryLRU:
    """Least-recently-used entries, bounded by count and by bytes, each expiring ``ttl_s`` after it was
    stored (on the injected clock)."""

    def __init__(self, max_entries: int, max_bytes: int, now: Callable[[], float]):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._now = now
        self._d: OrderedDict[str, tuple[Entry, float, int]] = OrderedDict()
        self.bytes = 0
        self.evicted = 0
        self.expired = 0

    def __len__(self) -> int:
        return len(self._d)

    def __repr__(self) -> str:
        return f"MemoryLRU(entries={len(self._d)}, bytes={self.bytes}, evicted={self.evicted}, expired={self.expired})"

    def get(self, fp: str) -> Entry | None:
        hit = self._d.get(fp)
        if hit is None:
            return None
        if hit[1] <= self._now():
            self._drop(fp)
            self.expired += 1
            return None
        self._d.move_to_end(fp)
        return hit[0]

    def put(self, e: Entry, ttl_s: float) -> None:
        if e.fp in self._d:
            self._drop(e.fp)
        size = e.size()
        self._d[e.fp] = (e, self._now() + ttl_s, size)
        self.bytes += size
        while len(self._d) > self.max_entries or (self.bytes > self.max_bytes and len(self._d) > 1):
            self._drop(next(iter(self._d)))
            self.evicted += 1

    def _drop(self, fp: str) -> None:
        _, _, size = self._d.pop(fp)
        self.bytes -= size


class BlobStore(Protocol):
    """Content-addressed storage for large outputs: ``put`` returns a reference, ``get`` the bytes back."""

    def put(self, data: bytes) -> str: ...

    def get(self, ref: str) -> bytes | None: ...


class LocalBlobStore:
    """Blobs as files named by their SHA-256 under ``root`` (written to a temporary name, then renamed, so a
    reader never sees half a blob); the same content is stored once."""

    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.gettempdir()) / "smartbatch-blobs"

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.root)!r})"

    def _path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest

    def put(self, data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(digest)
        # Written unless a sound copy is there: a damaged file under the name would make every later hit of
        # this content a miss (generated and paid again) for as long as it stayed.
        if self.get(f"sha256:{digest}") is None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)
        return f"sha256:{digest}"

    def get(self, ref: str) -> bytes | None:
        if not ref.startswith("sha256:"):
            return None
        digest = ref[7:]
        try:
            data = self._path(digest).read_bytes()
        except OSError:
            return None
        # A blob that no longer matches its name was damaged on disk: a miss, never a wrong output.
        return data if hashlib.sha256(data).hexdigest() == digest else None


class RedisLayer:
    """Batched reads and writes of entries in Redis, namespaced ``{prefix}:v1:{scope}:{fp}``, each with a TTL.

    Every failure (refused, timed out, reset) marks the layer down for ``retry_s`` (on ``now``) and is
    counted; while down, reads miss at once and writes wait in a buffer bounded by count and by bytes, and
    ``probe`` (driven by the cache, waiting with ``sleep``) asks Redis once per ``retry_s`` whether it is back."""

    def __init__(self, url: str, *, prefix: str = "smartbatch", timeout_s: float = 0.25, retry_s: float = 5.0,
                 now: Callable[[], float] = time.monotonic, buffer_max: int = 10_000,
                 buffer_max_bytes: int | None = None, cluster: bool = False,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        from actors._redis_cluster import async_client

        self.url = url
        self.cluster = cluster
        self.prefix = prefix
        self.retry_s = retry_s
        self._now = now
        self.sleep = sleep  # waits ``now``'s seconds: a test injects one that moves its manual clock
        # No client-side retries: a retry would multiply a slow Redis's latency into every lookup. This
        # layer's own down/retry cycle is the policy.
        self.client = async_client(url, cluster=cluster, timeout_s=timeout_s, retries=False, name="cache")
        self.up = True
        self._retry_at = 0.0
        self._pending: deque[tuple[str, bytes, int, float]] = deque()  # (key, value, ttl_ms, when buffered)
        # Bounded by bytes too: a value holds its prompt's text, which has no size limit, so 10,000 writes of long
        # prompts held a gigabyte while Redis was down, outside ``memory_max_mb`` (a helper's hunt).
        self.buffer_max = buffer_max
        self.buffer_max_bytes = buffer_max_bytes
        self._pending_bytes = 0
        self.errors = 0
        self.reconnects = 0
        self.dropped_writes = 0
        self.refused_writes = 0  # writes the server answered with an error: dropped
        self._refusing = False

    def __repr__(self) -> str:
        # Masked: Ray quotes an actor's repr in the error of each of its failed calls (the cache's holds this).
        return (f"RedisLayer({masked_url(self.url)!r}, up={self.up}, errors={self.errors}, reconnects={self.reconnects}, "
                f"pending_writes={len(self._pending)}, refused_writes={self.refused_writes})")

    def key(self, scope: str, fp: str) -> str:
        return f"{self.prefix}:v{SCHEMA}:{scope}:{fp}"

    def _usable(self) -> bool:
        return self.up or self._now() >= self._retry_at

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.up:
            log.warning("Redis at %s unreachable (%s: %s): serving from memory, retrying every %g s",
                        self.url, type(exc).__name__, exc, self.retry_s)
        self.up = False
        self._retry_at = self._now() + self.retry_s

    def retry_in(self) -> float:
        """Seconds on ``now`` until a down layer may be tried again (0 when up or due)."""
        return 0.0 if self.up else max(self._retry_at - self._now(), 0.0)

    async def probe(self) -> None:
        """One PING when down and due: an idle cache learns Redis is back (the gauge, the replay, a late warm)
        without waiting for a miss to try it. A failed PING waits another interval; not counted in ``errors``,
        which count operations that failed, and the layer is already down."""
        if self.up or not self._usable():
            return
        try:
            await self.client.ping()
        except Exception:
            self._retry_at = self._now() + self.retry_s
            return
        await self._recovered()

    async def _recovered(self) -> None:
        if self.up:
            return
        self.up = True
        self.reconnects += 1
        log.warning("Redis at %s is back: %d buffered writes replayed", self.url, len(self._pending))
        pending, self._pending, self._pending_bytes = list(self._pending), deque(), 0
        # Each with the life it has left: replayed with its whole TTL, an entry outlived it by the outage.
        now = time.monotonic()
        left = [(k, v, ttl_ms - (now - at) * 1000.0) for k, v, ttl_ms, at in pending]
        await self.put_many([(k, v, int(ms)) for k, v, ms in left if ms >= 1.0])

    async def get_many(self, keys: list[str]) -> list[tuple[bytes | None, int]]:
        """(value or None, milliseconds its key has left, -1: no expiry) of each key, in one round trip: a
        value kept in memory after the read must not outlive its key."""
        if not keys or not self._usable():
            return [(None, -2)] * len(keys)
        try:
            vals, left = await self._read(keys)
        except Exception as exc:  # any failure of the cache's Redis is a miss, never a failed request
            self._failed(exc)
            return [(None, -2)] * len(keys)
        await self._recovered()
        # A key that expired between the two reads reads None, or -2 left.
        return [(v if ms != -2 else None, ms) for v, ms in zip(vals, left, strict=True)]

    async def _read(self, keys: list) -> tuple[list, list]:
        """(values, milliseconds left) of ``keys``, in one round trip per node. On a Redis Cluster a GET each: one
        MGET must name keys of one slot (a cache's keys are spread over the nodes, unlike the ledger's)."""
        pipe = self.client.pipeline(transaction=False)
        if self.cluster:
            for k in keys:
                pipe.get(k)
        else:
            pipe.mget(keys)
        for k in keys:
            pipe.pttl(k)
        out = await pipe.execute()
        return (out[:len(keys)], out[len(keys):]) if self.cluster else (out[0], out[1:])

    async def put_many(self, items: list[tuple[str, bytes, int]]) -> None:
        """``(key, value, ttl_ms)`` triples in one pipeline."""
        if not items:
            return
        if not self._usable():
            self._buffer(items)
            return
        try:
            pipe = self.client.pipeline(transaction=False)
            for k, v, ttl_ms in items:
                pipe.set(k, v, px=max(int(ttl_ms), 1))
            answers = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            self._failed(exc)
            self._buffer(items)
            return
        # A cluster's pipeline answers a node that timed out or is away with an error per command (a single
        # Redis's raises, above): Redis away, not a refusal; dropped as one, a paused node's writes were never
        # written (a review). Kept for the replay, as a whole Redis away has them.
        from redis.exceptions import ConnectionError as Unreachable
        from redis.exceptions import TimeoutError as Unanswered

        away = [(it, a) for it, a in zip(items, answers, strict=True) if isinstance(a, (Unreachable, Unanswered))]
        if away:
            self._failed(away[0][1])
            self._buffer([it for it, _ in away])
        # A write the server refused (full under ``noeviction``, a read-only replica) is dropped, not buffered,
        # and Redis stays up for reads: marked down, a full Redis was read about once per retry interval (each
        # read replayed the refused writes, refused again), and what it held was generated again (a hunt).
        refused = [a for a in answers if isinstance(a, Exception) and not isinstance(a, (Unreachable, Unanswered))]
        if refused and not self._refusing:
            log.warning("Redis at %s refuses writes (%s): results are not stored there, reads go on",
                        self.url, refused[0])
        elif not refused and self._refusing:
            log.warning("Redis at %s takes writes again", self.url)
        self._refusing = bool(refused)
        self.refused_writes += len(refused)
        self.dropped_writes += len(refused)  # never stored, as a write over the buffer's bounds
        if not away:
            await self._recovered()

    def _buffer(self, items: list[tuple[str, bytes, int]]) -> None:
        """Keep ``items`` for the replay; past either bound the oldest writes are dropped (counted)."""
        at = time.monotonic()
        for k, v, ttl_ms in items:
            self._pending.append((k, v, ttl_ms, at))
            self._pending_bytes += len(v)
        max_bytes = self.buffer_max_bytes
        while self._pending and (len(self._pending) > self.buffer_max
                                 or (max_bytes is not None and self._pending_bytes > max_bytes)):
            self._pending_bytes -= len(self._pending.popleft()[1])
            self.dropped_writes += 1

    async def scan_values(self, limit: int, batch: int = 1000) -> list[tuple[str, bytes, int]] | None:
        """Up to ``limit`` (key, value, milliseconds the key has left) under this prefix and schema, for warming
        up after a restart (-1: the key has no expiry); None when Redis is down or failed during the read, so
        the caller can tell "nothing stored" from "not read" and read again later."""
        out: list[tuple[str, bytes, int]] = []
        if not self._usable():
            return None
        try:
            keys: list[bytes] = []
            async for k in self.client.scan_iter(match=f"{self.prefix}:v{SCHEMA}:*", count=batch):
                keys.append(k)
                if len(keys) >= limit:
                    break
            for lo in range(0, len(keys), batch):
                part = keys[lo:lo + batch]
                vals, left = await self._read(part)
                # A key that expired between the two reads reads None, or -2 left.
                out.extend((k.decode(), v, ms) for k, v, ms in zip(part, vals, left, strict=True)
                           if v is not None and ms != -2)
        except Exception as exc:
            self._failed(exc)
            return None
        await self._recovered()
        return out

    async def close(self) -> None:
        """For good: a read or write after it is refused (a miss, a buffered write), never a connection opened again
        on the emptied pool and left open (``actors._redis_gate``)."""
        from actors._redis_gate import close_client

        await close_client(self.client)
