"""Closing a ``redis.asyncio`` client for good, with other tasks' commands out.

A client's ``aclose`` disconnects its connections, those in use too, and leaves the client usable: a command another
task had out when it ran, retried by the client, connected again; one started after it, or one whose connection was
being made as it ran, opened a connection. Nothing closes that connection any more: it is left for the collector,
whose ``unclosed Connection`` ResourceWarning, under ``filterwarnings = error``, failed whichever test was running
(CI at stops 55, 80 and 84). So each client of ``async_client`` carries a ``ClientGate``, in its connections' class
(a ``RedisCluster`` takes no attribute of ours): its close (``close_client``) waits, bounded, for the commands
counted out (``ClientGate.use``: the journal's), then refuses every connection after it, made or being made, at the
connection itself, so no call site of the client, a registered script's or a pipeline's, can open one."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

__all__ = ["CLOSE_WAIT_S", "ClientGate", "close_client", "gate", "gate_of"]

CLOSE_WAIT_S = 10.0  # real seconds a close waits for the commands counted out (a close, not a drain)


class ClientGate:
    """Closed or not, and the commands counted out now (``use``), of one client."""

    def __init__(self, name: str) -> None:
        self.name = name  # the owner's, for the refusal's message (never the URL: it may hold a password)
        self.closed = False  # no command counted out after it (``use``)
        self.shut = False  # no connection made after it: set as the close empties the pool, not before (a command
        # counted out before the close may still connect, or reconnect on a retry: its connection is emptied then)
        self.out = 0
        self._quiet: asyncio.Future | None = None
        self._until: float | None = None  # the loop's time the close's one bound ends (``begin``)

    def __repr__(self) -> str:
        return f"ClientGate({self.name!r}, closed={self.closed}, out={self.out})"

    def refuse(self, flag: str = "closed") -> None:
        """Raise redis-py's ``ConnectionError`` once ``flag`` is set: the caller's handling of Redis away answers it."""
        if getattr(self, flag):
            from redis.exceptions import ConnectionError as RedisConnectionError

            raise RedisConnectionError(f"{self.name}: its Redis client is closed")

    @contextlib.asynccontextmanager
    async def use(self) -> AsyncIterator[None]:
        """One command (or pipeline) counted out until it ends, so the close waits for it; refused once closed."""
        self.refuse()
        self.out += 1
        try:
            yield
        finally:
            self.out -= 1
            if not self.out and self._quiet is not None and not self._quiet.done():
                self._quiet.set_result(None)

    def begin(self, wait_s: float = CLOSE_WAIT_S) -> float:
        """Refuse commands from now on (``use``); the real seconds left of the close's one bound, ``wait_s`` from the
        first call: a close that waits in steps (the journal's: its tasks, then its commands, then ``close``) waits
        ``wait_s`` in all, where each step's own bound added up (20 s with a command held out, a review)."""
        self.closed = True
        now = asyncio.get_running_loop().time()
        if self._until is None:
            self._until = now + wait_s
        return max(0.0, self._until - now)

    async def drain(self, wait_s: float = CLOSE_WAIT_S) -> None:
        """Refuse commands from now on (``use``) and wait, within the close's bound (``begin``), for those counted
        out to end."""
        left = self.begin(wait_s)
        if self.out and left > 0:
            if self._quiet is None or self._quiet.done():
                self._quiet = asyncio.get_running_loop().create_future()
            await asyncio.wait({self._quiet}, timeout=left)

    async def close(self, client: Any, wait_s: float = CLOSE_WAIT_S) -> None:
        """``drain``, then close ``client`` (this gate's) for good."""
        await self.drain(wait_s)
        self.shut = True  # no await between this and the pool's disconnect: a connection made before it is closed by it
        await client.aclose()


def _gated(cls: type, gate_: ClientGate) -> type:
    class Gated(cls):  # type: ignore[misc, valid-type]
        async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
            gate_.refuse("shut")
            await super().connect_check_health(*args, **kwargs)
            if gate_.shut:  # made while the close disconnected the others: closed here, as they were
                await self.disconnect()
                gate_.refuse("shut")

    Gated.__name__ = Gated.__qualname__ = cls.__name__
    Gated.gate = gate_
    return Gated


def gate(client: Any, name: str) -> Any:
    """``client`` (a ``Redis`` or a ``RedisCluster``, no command sent yet) with a ``ClientGate`` in its connections."""
    from redis.asyncio.cluster import RedisCluster
    from redis.asyncio.connection import Connection

    g = ClientGate(name)
    if isinstance(client, RedisCluster):
        # One dict with the nodes manager's: the nodes it finds later make their connections of this class too.
        cls = _gated(client.connection_kwargs.get("connection_class", Connection), g)
        client.connection_kwargs["connection_class"] = cls
        for node in [*client.startup_nodes, *client.nodes_manager.startup_nodes.values()]:
            node.connection_class = cls
    else:
        client.connection_pool.connection_class = _gated(client.connection_pool.connection_class, g)
    return client


def gate_of(client: Any) -> ClientGate | None:
    """The gate ``gate`` put in ``client``; None for a client made otherwise."""
    from redis.asyncio.cluster import RedisCluster

    if isinstance(client, RedisCluster):
        return getattr(client.connection_kwargs.get("connection_class"), "gate", None)
    return getattr(getattr(getattr(client, "connection_pool", None), "connection_class", None), "gate", None)


async def close_client(client: Any, wait_s: float = CLOSE_WAIT_S) -> None:
    """Close ``client`` for good: through its gate when it has one (``gate``), else its ``aclose`` alone."""
    g = gate_of(client)
    if g is None:
        await client.aclose()
    else:
        await g.close(client, wait_s)
