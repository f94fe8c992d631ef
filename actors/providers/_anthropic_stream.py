"""A sync Claude call, streamed (``messages.stream``, as the ``anthropic`` SDK advises for long answers) and read
into the Message a non-streaming call returns, so everything after it (cost, results, cache, the endpoint's
answers) reads what it read before.

Why: a whole answer sends nothing until it is done, so one that takes longer than ``timeout_s`` to write (a
runaway answer toward 64,000 tokens below ~107 tokens/s) was cut after it was billed, counted possibly billed and
sent again, up to ``max_attempts``: paid more than once where the provider does not honour the key. Streamed, the
call waits ``timeout_s`` at most between two events, and an answer whose events keep coming is read to its end.

Its whole time is bounded too (``stream_bound``): the wait for its first event and the cap's tokens at
``FLOOR_TOKENS_S``, so a server that keeps sending events (pings) forever, or a byte inside each wait, cannot hold
the call, its request and its claim for good. A stream cut after it began, by that bound, by a wait between
events, by a dropped connection, by an error event or by its end before ``message_stop``, was sent and may have
been billed: ``Unreadable``, counted possibly billed and made again under its Idempotency-Key, as a whole answer
cut on the way is.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from actors.providers._http import Unreadable, create_call, sdk_kwargs
from actors.providers._wire import error_text
from engine.core._within import within

__all__ = ["FLOOR_TOKENS_S", "Broken", "stream_bound", "streamed_call", "whole_call"]

# The slowest output rate a stream is waited for, tokens a second: a tenth of the slowest Claude model's (the
# catalog's 0.015 s a token, ~67/s). Past it the call is cut (possibly billed, made again under its key): a bound
# that cut a live answer would pay it again where the provider does not honour the key, so it is far from one.
FLOOR_TOKENS_S = 10.0


class Broken(Unreadable):
    """A stream that began (it may be billed) and did not come whole."""


def stream_bound(body: dict[str, Any], timeout_s: float) -> float:
    """The whole call's real seconds: ``timeout_s`` for its first event and its cap's tokens at
    ``FLOOR_TOKENS_S``; no less than a whole answer's bound, twice ``timeout_s`` (``HttpBase._call_bound``)."""
    cap = body.get("max_tokens")
    cap = cap if isinstance(cap, int) and not isinstance(cap, bool) and cap > 0 else 0
    return max(2 * timeout_s, timeout_s + cap / FLOOR_TOKENS_S)


async def streamed_call(api: Any, sdk: Any, body: dict[str, Any], key: str, gap_s: float,
                        total_s: float) -> tuple[dict[str, Any], str | None, bool]:
    """``body`` sent by ``api.stream`` under ``key``: (the Message as a non-streaming call's JSON, its request id,
    whether the provider replayed an earlier answer under the key). ``gap_s``: the longest wait for an event;
    ``total_s``: the whole call's (``stream_bound``). Raises ``Broken`` for a stream that began and did not come
    whole, and the SDK's own errors for a call refused or cut before its answer began (``HttpBase._error``)."""
    began = False

    async def read() -> tuple[dict[str, Any], str | None, bool]:
        nonlocal began
        # The fields ``create`` names, as a whole answer's call sent them: the rest go as they are in extra_body
        # (``stream`` names one more, ``output_format``, which it takes for a type to parse by, not a field).
        kwargs = sdk_kwargs(api.create, {k: v for k, v in body.items() if k != "stream"})
        async with api.stream(**kwargs, extra_headers={"Idempotency-Key": key}) as stream:
            began = True
            replayed = str(stream.response.headers.get("idempotent-replayed", "")).lower() == "true"
            if "json" in stream.response.headers.get("content-type", ""):
                # A whole Message, not events: a server that does not stream (a proxy that drops ``stream``), or
                # one that replays under the key the whole answer a call before stop 80 was given. Read as events
                # (none), it was a stream ended early, possibly billed and made again, each time (a review).
                whole = sdk.types.Message.construct(**json.loads(await stream.response.aread()))
                return whole.model_dump(mode="json", exclude_none=True), stream.request_id, replayed
            events, done = stream.__aiter__(), False
            while not done:
                try:
                    # Between events, not between bytes (the SDK's read timeout): a byte inside each wait held
                    # the call for the body's length times it.
                    event = await within(events.__anext__(), gap_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    raise Broken(f"no event of the stream within {gap_s:g} s") from None
                done = event.type == "message_stop"
            if not done:
                raise Broken("the stream ended before message_stop")
            msg = stream.current_message_snapshot
            if msg.stop_reason is None:  # its output tokens are message_start's (1), not the answer's: priced low
                raise Broken("the stream came to message_stop without its message_delta (stop reason, output tokens)")
            return msg.model_dump(mode="json", exclude_none=True), stream.request_id, replayed

    try:
        return await within(read(), total_s)
    except asyncio.TimeoutError:  # sent, so possibly billed, whether or not its answer began
        raise Broken(f"no whole answer within {total_s:g} s (timeout_s for its first event and its max_tokens at "
                     f"{FLOOR_TOKENS_S:g} tokens/s)") from None
    except sdk.APIError as exc:
        if not began:  # the call's own error answer (a 429, a 529, a 400), or none: as a whole answer's
            raise
        # A stream that began, then dropped, timed out between reads or said an error (an ``overloaded_error``
        # midway): it ran, and may be billed, whatever the SDK calls it.
        raise Broken(f"the stream broke: {type(exc).__name__}: {error_text(exc)}") from None
    except Broken:
        raise
    except Exception as exc:
        if not began:  # the SDK refusing the body before it went (a TypeError: ``AnthropicProvider.call``'s 400)
            raise
        # Events of another shape or order than documented, whatever the SDK's reader raises at them (a delta's
        # index past its blocks: IndexError; a null partial_json: TypeError; a message_start without usage:
        # AttributeError): the call ran and may be billed. Named one by one, the rest were counted free, as a
        # bad body (TypeError) or an engine error settled at $0 (a review).
        raise Broken(f"the stream could not be read: {type(exc).__name__}: {exc}") from None


async def whole_call(api: Any, body: dict[str, Any], key: str, timeout: Any,
                     total_s: float) -> tuple[dict[str, Any], str | None, bool]:
    """``body`` sent whole (``create``, no ``stream``) under ``key``, read as ``streamed_call`` reads a stream: the
    answer to a key first used by a whole call (an engine before stop 80, whose call is made again after the
    upgrade), which a provider that keeps keys replays only to the body it was first sent, ``stream`` and all.
    ``timeout``: the client's, given per call (the SDK refuses a whole call at its default one whose
    ``max_tokens`` may take over 10 minutes); ``total_s``: the whole call's bound (``HttpBase._call_bound``)."""
    whole = {k: v for k, v in body.items() if k != "stream"}  # a stream's body, as streamed_call sends it
    msg, replayed = await create_call(api.create, api.with_raw_response.create, whole, key, timeout=timeout,
                                      total_s=total_s)
    return msg.model_dump(mode="json", exclude_none=True), getattr(msg, "_request_id", None), replayed
