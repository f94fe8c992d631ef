"""The asyncio face of ``Engine``: ``asubmit``, ``asubmit_many``, ``as_completed`` and the endpoint's Anthropic
``count_tokens``, ``video_content`` and ``video_progress`` (a mixin, so the driver module stays the threads-and-futures core)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import AsyncIterator, Awaitable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from actors.providers._anthropic_count import COUNT_TIMEOUT_S, CountAnswer
from actors.providers._video_content import CONTENT_TIMEOUT_S, ContentAnswer
from engine.app._actor_errors import raise_alone
from engine.app._driver_owners import body_of
from engine.app._driver_pull import FORGET_WAIT_S
from engine.app._driver_reject import (
    OnInvalid,
    check_on_invalid,
    count_refused,
    listed,
    reject_taken,
    validated,
    with_rejected,
)
from engine.core._within import within
from engine.core.errors import EngineStopped, ProviderError
from engine.core.request import Request
from engine.core.result import Result

if TYPE_CHECKING:
    from engine.app.driver import ResultFuture

__all__ = ["AsyncSubmit"]

COUNT_WAIT_S = COUNT_TIMEOUT_S + 15.0  # real seconds: the dispatcher's own timeout answers first, a 504
CONTENT_WAIT_S = CONTENT_TIMEOUT_S + 15.0  # as COUNT_WAIT_S
PROGRESS_WAIT_S = 2.0  # real seconds: a figure the dispatcher holds in memory; a retrieve never waits long for it


class AsyncSubmit:
    """Mixed into ``Engine``; uses its ``_as_request``, ``_admit``, ``_flush`` and lock."""

    async def asubmit(self, request: Request | Mapping) -> Result:
        """``submit`` for asyncio: queue one request and await its ``Result`` without blocking the event loop.
        Raises as ``submit`` does (``RequestError``, ``EngineStopped``, ``Overloaded``). Cancelling the awaiting
        task ends the wait, not the request: it still runs, and its future is ``submit`` of the same id (cancelled
        while it still waits for room in a full engine, it was never queued)."""
        await self.know_owners([body_of(request)])
        (fut,) = await self._asubmit_futures([request])
        return await _awaited(fut)

    async def asubmit_many(self, requests: Iterable[Request | Mapping], *,
                           on_invalid: OnInvalid = "raise") -> list[Result]:
        """``submit_many`` for asyncio: the ``Result`` of each request, in the order given. A bad request
        raises ``RequestError`` before any is queued; with ``on_invalid="reject"`` it is its own ``rejected``
        result (``error`` "invalid_request", ``reason`` naming the field and the fix) and the others are queued.
        Raises as ``asubmit_futures`` does (``Overloaded``: its ``futures``, of the parts let in, run on)."""
        futs = await self.asubmit_futures(listed(requests, "asubmit_many"), on_invalid=on_invalid)
        return list(await asyncio.gather(*(_awaited(f) for f in futs)))

    async def asubmit_futures(self, requests: Iterable[Request | Mapping], *,
                              on_invalid: OnInvalid = "raise") -> list[ResultFuture]:
        """``submit_many`` for asyncio, as futures: queue the requests and return their ``ResultFuture``s (for
        ``as_completed``) once queued. Where the engine is full it waits for room in a worker thread, never on
        the loop, as ``submit_many`` called from a coroutine would (it blocked the loop until room freed). It admits
        and raises as ``submit_many`` does: a call larger than the room is let in by parts (``Overloaded`` after a
        wait in vain, its ``admitted`` and ``futures`` those of the parts let in, which run on). Its task cancelled
        as it waits for room leaves at once, the rest not queued; parts already let in run on, and the same
        requests submitted again give back their futures."""
        check_on_invalid(on_invalid)
        requests = listed(requests, "asubmit_futures")
        await self.know_owners(body_of(r) for r in requests)  # an id another driver learnt (``_driver_owners``)
        if on_invalid == "raise":
            return await self._asubmit_futures(requests)
        now = self.clock.now()  # one arrival instant for them all: judged together (``GroupTable.join``)
        reqs, at, refused = validated(self._as_request, requests, now, on_invalid)
        with self._lock:
            reqs, at = reject_taken(reqs, at, self._futs, refused)
            count_refused(self, refused)
        return with_rejected(await self._aqueue(reqs) if reqs else [], at, refused)

    async def as_completed(self, futures: Iterable[concurrent.futures.Future | Awaitable[Result]], *,
                           timeout: float | None = None) -> AsyncIterator[Result]:
        """Yield each ``Result`` as its future completes (in completion order), given ``ResultFuture``s (or
        any ``concurrent.futures.Future`` or awaitable); the same future given twice yields once. Past
        ``timeout`` seconds in all, raises ``asyncio.TimeoutError`` as ``asyncio.as_completed`` does; the
        futures are never cancelled (leaving the loop early leaves every request running)."""
        loop = asyncio.get_running_loop()
        arrived: asyncio.Queue = asyncio.Queue()  # futures, in the order they finished

        # Runs in the thread that resolved f: a ResultFuture's, or the loop of an asyncio future, which may be
        # another loop's (a task made in another thread). Put there straight into the queue, from that loop's
        # thread, it woke nothing here: this loop slept on until some timer of its own, for good without one.
        def from_thread(f: Any) -> None:
            try:
                loop.call_soon_threadsafe(arrived.put_nowait, f)
            except RuntimeError:  # the loop has closed: nobody waits for this any more
                pass

        # A done callback rather than asyncio.wrap_future: cancelling a wrapped future cancels the
        # ResultFuture itself, and a cancelled ResultFuture would never release its max_pending slot.
        todo: dict[int, Any] = {}
        for f in futures:
            if not isinstance(f, concurrent.futures.Future):
                f = asyncio.ensure_future(f)
            todo.setdefault(id(f), f)
        for f in todo.values():
            f.add_done_callback(from_thread)
        deadline = None if timeout is None else loop.time() + timeout
        for k in range(len(todo)):
            if arrived.empty():
                left = None if deadline is None else max(deadline - loop.time(), 0.0)
                try:  # (within: wait_for swallowed the caller's cancel that came with a result, and it ran on)
                    f = await within(arrived.get(), left)
                except asyncio.TimeoutError:
                    raise asyncio.TimeoutError(f"{len(todo) - k} of {len(todo)} results were not ready within "
                                               f"timeout={timeout} s") from None
            else:  # finished already: yielded even past the deadline, as asyncio.as_completed does
                f = arrived.get_nowait()
            yield f.result()

    async def _asubmit_futures(self, requests: list[Request | Mapping]) -> list[ResultFuture]:
        # RequestError here, before any is queued; a position only among several (asubmit gives one)
        now = self.clock.now()  # one arrival instant for them all: judged together (``GroupTable.join``)
        return await self._aqueue([self._as_request(r, k if len(requests) > 1 else None, now)
                                   for k, r in enumerate(requests)])

    async def _aqueue(self, reqs: list[Request]) -> list[ResultFuture]:
        """Queue ``reqs``, validated already (each once: a bulk submission's checks are per request)."""
        refs = self._forgets_of(reqs)
        if refs:  # an id being forgotten: sent only once it is (``Pulling._forget``)
            await asyncio.to_thread(self._ray.wait, refs, num_returns=len(refs), timeout=FORGET_WAIT_S)
        futs = self._admit_nowait(reqs)
        if futs is None:  # no room: wait for it (up to submit_timeout_s) in a worker thread
            gave_up = threading.Event()
            try:
                futs = await asyncio.to_thread(self._admit_waiting, reqs, gave_up)
            except asyncio.CancelledError:
                # The worker's wait ends now, its requests not queued: the caller never had them accepted. It waited
                # on, and Ctrl-C reached the script only once it ended (asyncio.run joins its worker threads):
                # submit_timeout_s later, its requests queued after all, as the engine stopped (a helper's hunt).
                gave_up.set()
                with self._room:
                    self._room.notify_all()
                raise
        return futs

    def _admit_waiting(self, reqs: list[Request], gave_up: threading.Event) -> list[ResultFuture]:
        """``_admit_nowait`` that waits for room (a worker thread's call), unless ``gave_up`` is set meanwhile."""
        with self._lock:
            futs, _ = self._admit(reqs, gave_up)
        self._give_kept()
        self._flush()
        return futs

    def _admit_nowait(self, reqs: list[Request]) -> list[ResultFuture] | None:
        """Admit ``reqs`` as ``submit`` (one) or ``submit_many`` (several) do, or None where that would wait
        for room. The room check and the admission hold the lock together, so room cannot fill in between
        and ``_admit`` never waits here: an event loop may call this."""
        with self._lock:
            if self._running and self._overload == "block":
                fresh = {r.uid for r in reqs if r.uid not in self._futs  # what _admit would queue (a kept
                         and not (self._kept is not None and self._kept.holds(r))}  # answer takes no room)
                if fresh and len(fresh) > self._max_pending - self._pending:  # (let in by parts, waiting)
                    return None
            futs, new = self._admit(reqs)
            full = len(self._buffer) >= self._micro_batch
        self._give_kept()
        if len(reqs) != 1 or full:
            self._flush()
        elif new and reqs[0].priority == "urgent":
            self._wake.set()  # as submit does: the flusher sends an urgent burst in one batch
        return futs


    async def count_tokens(self, provider: str, body: Mapping[str, Any]) -> CountAnswer:
        """Anthropic's token count of the Messages ``body``, asked by ``provider``'s dispatcher with the key and
        client it holds (``actors._count_tokens``): ``(status, body, headers)`` as Anthropic answered, or the
        engine's refusal in its shape. A count is free: nothing is admitted, budgeted or journaled. Raises
        ``EngineStopped`` on a stopped engine, ``ProviderError`` when the dispatcher does not answer (lost, or
        past ``COUNT_WAIT_S``)."""
        return await self._ask_dispatcher(provider, "the count", COUNT_WAIT_S,
                                          lambda d: d.count_tokens.remote(dict(body)))

    async def video_content(self, provider: str, url: str, variant: str = "video") -> ContentAnswer:
        """The bytes of a video ``provider`` made (a result's ``output``, its address there), fetched by its
        dispatcher with the key and client it holds (``actors._video_content``): ``(status, bytes or OpenAI
        error body, content type)``. A read: nothing is admitted, budgeted or journaled. Raises as
        ``count_tokens`` does (``CONTENT_WAIT_S``)."""
        return await self._ask_dispatcher(provider, "the video's download", CONTENT_WAIT_S,
                                          lambda d: d.video_content.remote(url, variant))

    async def video_progress(self, provider: str, uids: Sequence[str]) -> dict[str, int]:
        """How far ``provider`` has made the videos of requests ``uids`` (``Request.uid``), 0-99, as its
        dispatcher's polls last read them (one call for them all; nothing asked of the provider): none for a
        video not being polled (queued in the engine, ended) or whose provider gives no figure (Veo, simulated).
        Raises as ``count_tokens`` does (``PROGRESS_WAIT_S``)."""
        return await self._ask_dispatcher(provider, "the videos' progress", PROGRESS_WAIT_S,
                                          lambda d: d.video_progress.remote(list(uids)))

    async def _ask_dispatcher(self, provider: str, what: str, wait_s: float, call: Any) -> Any:
        if self._gone is not None or not self._running:
            raise EngineStopped(self._gone or "this engine was stopped; start a new one, or connect to another")
        dispatcher = self._h["dispatchers"].get(provider)
        if dispatcher is None:
            raise ProviderError(f"provider {provider!r} has no dispatcher in this engine (its catalog has "
                                f"{sorted(self._h['dispatchers'])}); ask with a model of one of them")
        try:
            return await within(_as_future(call(dispatcher)), wait_s)  # (a cancel passed on, as above)
        except asyncio.TimeoutError:
            raise ProviderError(f"the dispatcher of {provider!r} did not answer {what} within {wait_s:g} "
                                "s (busy, or restarting); send it again") from None
        except self._ray.exceptions.RayError as exc:  # its type alone; and not its __context__ (rvkeys84)
            raise_alone(ProviderError(f"the dispatcher of {provider!r} could not answer {what} "
                                      f"({type(exc).__name__}); send it again"))


async def _as_future(ref: Any) -> Any:
    return await ref


def _awaited(fut: concurrent.futures.Future) -> Awaitable[Result]:
    """Await ``fut`` from asyncio. Shielded: cancelling the awaiting task must not cancel the ResultFuture
    (``wrap_future`` would), which would lose the result and never release its ``max_pending`` slot."""
    return asyncio.shield(asyncio.wrap_future(fut))
