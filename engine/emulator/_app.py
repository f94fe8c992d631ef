"""The request pipeline, independent of sockets: route, authenticate, inject faults, honour Idempotency-Key,
run the handler, record the call. ``App.handle`` maps (method, path, headers, body) to one ``Reply``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter, deque
from typing import Any, NamedTuple
from urllib.parse import parse_qsl

from engine.core.errors import ConfigError
from engine.emulator import _anthropic, _gemini_batch, _openai, _openai_batch, _veo, _videos
from engine.emulator._core import KEEP_ANSWERS_S, Core
from engine.emulator._faults import FaultPlan, FaultSpec
from engine.emulator._gemini import gemini_error
from engine.emulator._routing import Ctx, Route
from engine.emulator._wire import ApiError, Dropped, Family, Reply, error_reply, json_reply

__all__ = ["ROUTE_NAMES", "App", "Call"]

_ROUTES: list[Route] = [*_openai.ROUTES, *_openai_batch.ROUTES, *_videos.ROUTES, *_veo.ROUTES, *_gemini_batch.ROUTES,
                      *_anthropic.ROUTES]
ROUTE_NAMES: tuple[str, ...] = tuple(r.name for r in _ROUTES)
_DROP = Reply(0, {}, b"", drop=True)


def _go_duration(s: float) -> str:
    """Seconds as OpenAI writes a rate limit's reset (``6m0s``, ``1.5s``, ``20ms``)."""
    if s < 1:
        return f"{round(s * 1000)}ms"
    m, rest = divmod(s, 60.0)
    return f"{int(m)}m{rest:g}s" if m else f"{rest:g}s"


class Call(NamedTuple):
    """One received request (never its credentials)."""

    provider: str
    route: str  # a route name such as "chat.completions", or "?" when no route matched
    method: str
    status: int  # 0: the connection was dropped without an answer
    at: float  # emulator time


class _Pending:
    __slots__ = ("answered_at", "body_hash", "done", "reply")

    def __init__(self, body_hash: bytes):
        self.body_hash, self.done, self.reply, self.answered_at = body_hash, threading.Event(), None, 0.0


class App:
    def __init__(self, core: Core, faults: FaultPlan, origin: str = ""):
        self.core, self.faults, self.origin = core, faults, origin
        # Whether an Idempotency-Key is honoured (the same answer again, billed once). OpenAI and Anthropic do not
        # document the header: ``Emulator(honour_keys=False)`` plays them as they are documented.
        self.honour_keys = True
        self._lock = threading.Lock()
        # The latest ``keep_records`` calls themselves, and every call's count: a long run kept every record.
        self._calls: deque[Call] = deque(maxlen=core.keep_records)
        self._tally: Counter[tuple[str, str, str, int]] = Counter()  # (provider, route, method, status)
        self._idem: dict[tuple[str, str, str], _Pending] = {}
        self._answered: deque[tuple[tuple[str, str, str], _Pending]] = deque()  # kept answers, oldest first

    # -- bookkeeping ---------------------------------------------------------------------------------------
    def calls(self) -> list[Call]:
        with self._lock:
            return list(self._calls)

    def tally(self) -> Counter[tuple[str, str, str, int]]:
        """Every call received, kept or not, by (provider, route, method, status)."""
        with self._lock:
            return Counter(self._tally)

    def reset(self) -> None:
        with self._lock:
            self._calls.clear()
            self._tally.clear()
            self._idem.clear()
            self._answered.clear()

    def _record(self, provider: str, route: str, method: str, reply: Reply) -> Reply:
        call = Call(provider, route, method, 0 if reply.drop else reply.status, self.core.now())
        with self._lock:
            dropping = len(self._calls) == self._calls.maxlen
            self._calls.append(call)
            self._tally[call[:4]] += 1
        if dropping:
            self.core.dropped("call records (calls, GET /_emulator/calls)")
        return reply

    # -- the pipeline --------------------------------------------------------------------------------------
    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Reply:
        path, _, query = path.partition("?")
        if path.startswith("/_emulator/"):
            return self._control(method, path, body)
        provider, _, rest = path.lstrip("/").partition("/")
        rest = "/" + rest
        family: Family = ("anthropic" if rest.startswith("/v1/messages") else
                          "google" if rest.startswith("/v1beta/") else "openai")
        rid = self.core.new_id("req_")
        if provider not in self.core.catalog.providers:
            err = ApiError(404, f"unknown provider {provider!r} in the path; serve one of "
                           f"{sorted(self.core.catalog.providers)} as /<provider>/v1/...")
            return self._record(provider, "?", method, error_reply(family, err, rid))
        found = self._match(method, rest)
        if found is None:
            err = ApiError(404, f"no route {method} {rest} (the emulator serves {sorted(set(ROUTE_NAMES))})")
            return self._record(provider, "?", method,
                                self._as_provider(provider, family, error_reply(family, err, rid)))
        r, params = found
        query_params = dict(parse_qsl(query))
        params = {**query_params, **params}  # a list's cursor and limit, e.g. ?after=...&limit=100
        if not self._authorized(r.family, headers, query_params):
            where = {"openai": "an 'Authorization: Bearer <key>'", "anthropic": "",
                     "google": "an 'x-goog-api-key: <key>'"}[r.family]
            # Anthropic's own words for a call without x-api-key, whatever else it carries (a Bearer header too).
            err = (ApiError(401, "x-api-key header is required") if r.family == "anthropic" else
                   ApiError(401, f"missing API key: send {where} header", code="invalid_api_key"))
            return self._record(provider, r.name, method,
                                self._as_provider(provider, r.family, error_reply(r.family, err, rid)))
        ctx = Ctx(self.core, self.faults, provider, r.name, params, headers, body, rid, r.family, self.origin)
        return self._record(provider, r.name, method, self._as_provider(provider, r.family, self._serve(r, ctx)))

    def _serve(self, r: Route, ctx: Ctx) -> Reply:
        fault = self.faults.next_fault(ctx.provider, r.name, r.generating,
                                       529 if r.family == "anthropic" else 500)
        if fault is not None:
            return self._fault(fault, ctx, r)
        return self._answer(r, ctx)

    def _answer(self, r: Route, ctx: Ctx) -> Reply:
        key = ctx.headers.get("idempotency-key")
        if r.idempotent and key and self.honour_keys:
            return self._idempotent((ctx.provider, r.name, key), r, ctx)
        return self._run(r, ctx)

    def _run(self, r: Route, ctx: Ctx) -> Reply:
        try:
            return r.handler(ctx)
        except ApiError as err:
            return error_reply(ctx.family, err, ctx.request_id)
        except Dropped:
            return _DROP
        except Exception as exc:  # a bug of the emulator: answer it plainly rather than cut the connection
            err = ApiError(500, f"emulator internal error in {r.name}: {type(exc).__name__}: {exc}")
            return error_reply(ctx.family, err, ctx.request_id)

    def _as_provider(self, provider: str, family: Family, reply: Reply) -> Reply:
        """``reply`` in the error shape of the provider's compatibility layer (Google's for ``compat: gemini``);
        Google's own routes (family google) answer in their own shape already."""
        if (reply.drop or reply.status < 400 or family == "google"
                or self.core.catalog.providers[provider].compat != "gemini"):
            return reply
        return gemini_error(reply)

    def _fault(self, fault: FaultSpec, ctx: Ctx, r: Route) -> Reply:
        if fault.cut_body:  # run (and billed, and kept under its key), its answer cut short on the way
            reply = self._answer(r, ctx)
            if reply.parts:  # a stream broken midway: its connection closed after half its events
                return reply._replace(cut_at=len(reply.body) // 2)
            return reply._replace(body=reply.body[:len(reply.body) // 2])
        if fault.cut_connection:  # run (and billed, and kept under its key), the connection closed unanswered
            self._answer(r, ctx)
            return _DROP
        if fault.trickle_s:  # answered as usual, slowly (``_Handler``)
            return self._answer(r, ctx)._replace(trickle_s=fault.trickle_s)
        # Held in real seconds: the point is to outlast a client's (real) timeout.
        if fault.timeout_s and self.core.stopping.wait(fault.timeout_s):
            return _DROP
        if fault.status is None:
            return _DROP
        retry = fault.retry_after_s
        if fault.status == 429 and retry is None and fault.code in (None, "rate_limit_exceeded"):
            retry = self.faults.retry_after_s  # a rate limit's 429 always says when to come back, as both do
        message = fault.message or {429: "Rate limit reached (injected fault).",
                                    529: "Overloaded (injected fault)."}.get(
                                        fault.status, "The server had an error while processing your request "
                                                      "(injected fault).")
        if fault.code is not None or fault.type is not None:  # a refusal of the account (no credit)
            message = fault.message or ("Your credit balance is too low; add credits in Plans & Billing (injected)."
                                        if ctx.family == "anthropic" else
                                        "You exceeded your current quota; check your plan and billing (injected).")
        code = fault.code or {429: "rate_limit_exceeded"}.get(fault.status,
                                                              "server_error" if fault.status >= 500 else None)
        if retry is not None and ctx.family == "openai" and not self.faults.retry_after_header:
            reply = error_reply(ctx.family, ApiError(fault.status, message, code=code), ctx.request_id)
            return reply._replace(headers={**reply.headers, "x-ratelimit-remaining-requests": "0",
                                           "x-ratelimit-reset-requests": _go_duration(retry),
                                           "x-ratelimit-remaining-tokens": "1000",
                                           "x-ratelimit-reset-tokens": "0s"})
        return error_reply(ctx.family, ApiError(fault.status, message, code=code, retry_after_s=retry,
                                                kind=fault.type), ctx.request_id)

    def _idempotent(self, key: tuple[str, str, str], r: Route, ctx: Ctx) -> Reply:
        """The same key again gets the same answer and bills nothing more; an answer in flight is waited for.
        Only successes are kept, so a retry after an error is served afresh."""
        body_hash = _body_digest(ctx)
        while True:
            with self._lock:
                pending = self._idem.get(key)
                if pending is None:
                    pending = self._idem[key] = _Pending(body_hash)
                    break
            pending.done.wait()
            if pending.reply is not None:
                if pending.body_hash != body_hash:
                    err = ApiError(409, "Idempotency-Key was already used with a different request body; use a "
                                   "new key for a new request", code="idempotency_key_reused")
                    return error_reply(ctx.family, err, ctx.request_id)
                # A stream's replay is sent at once: its answer was made (and billed) by the first call.
                return pending.reply._replace(headers={**pending.reply.headers, "idempotent-replayed": "true"},
                                              parts=((len(pending.reply.body), 0.0),) if pending.reply.parts else ())
        reply = self._run(r, ctx)
        forgot = False
        with self._lock:
            if 200 <= reply.status < 300 and not reply.drop:
                pending.reply, pending.answered_at = reply, self.core.now()
                self._answered.append((key, pending))
                # Past the newest keep_records, an answer goes once it is KEEP_ANSWERS_S old (emulator time), as a
                # key expires by age: gone by count alone, the answer of a call cut off on the wire was forgotten
                # before its retry came, after keep_records others; the retry ran and billed again, while an
                # engine told the server honours keys (honours_idempotency_key) counted the call once (a review).
                horizon = pending.answered_at - KEEP_ANSWERS_S
                while len(self._answered) > self.core.keep_records and self._answered[0][1].answered_at <= horizon:
                    old_key, old = self._answered.popleft()
                    forgot = True
                    if self._idem.get(old_key) is old:
                        del self._idem[old_key]
            else:
                del self._idem[key]
        pending.done.set()
        if forgot:
            self.core.dropped("Idempotency-Key answers", f"once {KEEP_ANSWERS_S:g} emulator seconds old; such a key "
                              "sent again runs and bills again")
        return reply

    # -- helpers -------------------------------------------------------------------------------------------

    @staticmethod
    def _match(method: str, rest: str) -> tuple[Route, dict[str, str]] | None:
        for r in _ROUTES:
            if r.method == method:
                m = r.pattern.match(rest)
                if m:
                    return r, m.groupdict()
        return None

    @staticmethod
    def _authorized(family: Family, headers: dict[str, str], query: dict[str, str]) -> bool:
        # Any non-empty key in its family's header passes; the key itself is only tested for presence and never kept.
        if family == "google":  # Google's own API: its header, or ?key= (never a bearer token: that is OAuth's)
            return bool(headers.get("x-goog-api-key", "").strip() or query.get("key", "").strip())
        if family == "anthropic":  # an API key in x-api-key alone: Anthropic reads a Bearer header as an OAuth token's
            return bool(headers.get("x-api-key", "").strip())
        auth = headers.get("authorization", "")
        return bool(auth[7:].strip() if auth.lower().startswith("bearer ") else "")

    def _control(self, method: str, path: str, body: bytes) -> Reply:
        rid = self.core.new_id("req_")
        try:
            if method == "GET" and path == "/_emulator/bill":
                return json_reply("openai", 200, self._bill_json(), rid)
            if method == "GET" and path == "/_emulator/calls":
                return json_reply("openai", 200, [c._asdict() for c in self.calls()], rid)
            if method == "GET" and path == "/_emulator/counts":
                return json_reply("openai", 200, self._counts_json(), rid)
            if method == "POST" and path == "/_emulator/faults":
                cfg = json.loads(body or b"{}")
                if not isinstance(cfg, dict):
                    raise ConfigError("the fault plan must be a JSON object")
                self.faults.configure(cfg)
                return json_reply("openai", 200, {"ok": True, "faults": repr(self.faults)}, rid)
        except (ConfigError, ValueError) as exc:
            return error_reply("openai", ApiError(400, str(exc)), rid)
        return error_reply("openai", ApiError(404, f"no control route {method} {path}; use GET /_emulator/bill, "
                                              "GET /_emulator/calls, GET /_emulator/counts or POST "
                                              "/_emulator/faults"), rid)

    def _counts_json(self) -> Any:
        with self._lock:  # one moment's counts: kept + dropped = calls
            tally, kept = Counter(self._tally), len(self._calls)
        return {"calls": sum(tally.values()), "kept": kept, "dropped": sum(tally.values()) - kept,
                "by_call": [{"provider": p, "route": r, "method": m, "status": st, "n": n}
                            for (p, r, m, st), n in sorted(tally.items())]}

    def _bill_json(self) -> Any:
        self.core.advance_batches()
        with self.core.lock:
            return self.core.ledger.bill().model_dump(mode="json")


def _body_digest(ctx: Ctx) -> bytes:
    """A request body's identity for its Idempotency-Key: a multipart form's fields (the ``openai`` SDK draws a new
    boundary for each send, so the same Sora create sent again by a re-run was a 409, "a different request body",
    and its request failed: a helper's tour), any other body's bytes."""
    if ctx.headers.get("content-type", "").startswith("multipart/form-data"):
        try:
            fields = _openai.multipart(ctx)
        except (ApiError, ValueError):
            fields = None
        if fields is not None:
            return hashlib.sha256(repr(sorted(fields.items())).encode()).digest()
    return hashlib.sha256(ctx.body).digest()
