"""The budget controller: reserve an upper-bound estimate before a dispatch, settle the actual cost after.

The rules are ``engine.core.budgets``'s. With ``budgets.redis_url`` the ledger lives in Redis (``RedisBudgetBook``,
one Lua script per batch of reservations or settlements), so every engine on that Redis shares one budget;
without it, one ``BudgetBook`` in this actor, whose calls run on one event loop, so no check-then-increment
race exists inside the engine either.

Budget windows run on the calendar when the engine runs at real speed (``base`` is the wall time of engine
time 0) and on trace time when it replays a trace (``base`` 0), as the simulator does.

Redis faults: ``check_ledger`` (awaited at start) turns an unreachable Redis into a ``ConfigError``, because a
budget that cannot be enforced must not silently pass. Mid-run, every call has a timeout
(``budgets.redis_timeout_s``) and a failed one marks Redis down for ``budgets.redis_retry_s``: claims are
answered ``budget_unavailable`` (nothing reserved; the grouper holds the work until Redis is back or its
deadline passes), and settlements wait in an outbox replayed, first thing, once Redis answers. A reservation
whose reply was lost (Redis may still run a script it received before it paused) is released through the
same outbox. The outbox is journaled while it holds anything (``actors._budget_outbox``; the engine keeps it in
Ray's key-value store), so a restart of this actor, of the hub or of both loses none of it; what is lost anyway
expires (``budgets.reservation_ttl_s``). No Redis error leaves this actor's methods.
"""

from __future__ import annotations

import asyncio
import math
import secrets

from actors._budget_calls import LedgerCalls, _spend
from actors._budget_check import check_redis_ledger
from actors._budget_journal import LedgerJournal
from actors._budget_live import LiveBudgets
from actors._budget_outbox import OutboxJournal
from actors._budget_report import BudgetReports
from actors._budget_stop import OutboxAtStop
from actors._peer import Warm, as_peer, resolve_clock
from actors.journal import HubJournal
from engine.core._logkeys import get_logger
from engine.core.budgets import BudgetSettings, BudgetSpec, Charge, Claim, Verdict, usd
from engine.core.errors import ConfigError
from engine.core.ledger import BudgetBook, KeptCharges
from engine.core.settings import JournalSettings

__all__ = ["BudgetController"]

log = get_logger("smartbatch.budget")


class BudgetController(LedgerCalls, LedgerJournal, OutboxJournal, OutboxAtStop, LiveBudgets, BudgetReports, Warm):
    def __init__(self, settings: BudgetSettings, hub=None, clock=None, base: float = 0.0, engine: str = "engine",
                 recover_wait_s: float = JournalSettings().recover_wait_s, ledger_id: str | None = None,
                 kv_journal=None):
        self.settings, self.recover_wait_s = settings, recover_wait_s
        # Ray's key-value store (``actors._kv_journal``): a Redis ledger's outbox, a memory ledger's snapshot's copy
        self.kv_journal = kv_journal
        self._restoring: asyncio.Event | None = None  # set while ``recover`` reads the journal
        self.hub = as_peer(hub)
        # A ledger in this actor's memory is journaled in the hub (a Redis ledger needs no journal).
        self.journal = HubJournal(self.hub) if self.hub is not None and not settings.redis_url else None
        self._journaling: asyncio.Task | None = None
        self._journal_dirty = False
        # Group commit: a change is numbered, and a reservation, settlement or charge is answered once a snapshot
        # holding it is in the journal. Answered first (the snapshot up to 50 ms later), a restart lost the claims
        # granted since and ignored their settlements: spend missing from the ledger, a hard limit overrun (a hunt).
        self._asked = self._written = 0
        # Names this ledger: the engine's start draws it, and Ray restarts the actor with it (its ledger taken back
        # from the journal); a new engine has another. The endpoint counts what its state directory kept only
        # against a ledger that did not see it (``_endpoint_resume``).
        self.ledger_id = ledger_id or secrets.token_hex(8)
        self._written_cond: asyncio.Condition | None = None
        self.clock, published_base = resolve_clock(clock)
        self.base = base if published_base is None else published_base
        self._errors: tuple[type[BaseException], ...] = ()  # what a failed ledger call raises
        self._config_error: str | None = None  # raised by check_ledger (never from here: the actor would die)
        self._down_until: float | None = None  # monotonic time Redis is tried again; None: up
        self._last_error = ""
        self._outbox: list[tuple[str, float]] = []  # settlements Redis has not taken yet
        self._charges: list[tuple[Charge, float]] = []  # charges Redis has not taken yet, each with its time
        self._charged = KeptCharges()  # the charge ids this controller was given lately, and the USD of all
        self._settling = 0  # settlements and charges in a call to Redis now (still unsettled: a report counts them)
        self.lost_records = 0  # settlements counted though Redis had lost their claim's record
        self.rejected_settlements = 0  # settlements the ledger's script refused, dropped (``_settle_apart``)
        self._flusher: asyncio.Task | None = None
        self._closed = False  # the flusher's stop (``close``): its cancel alone can be spent in a Redis read
        if settings.redis_url:
            from redis.exceptions import RedisError

            from actors._redis_cluster import async_client, cluster_errors, namespace
            from actors.budget_redis import RedisBudgetBook
            from engine.core.settings import masked_url

            self._errors = (RedisError, OSError, asyncio.TimeoutError, *cluster_errors())
            self._url = masked_url(settings.redis_url)
            try:
                # No client-side retries: the outage policy is this actor's (answer at once while down).
                client = async_client(settings.redis_url, cluster=settings.redis_cluster,
                                      timeout_s=settings.redis_timeout_s, retries=False, name="budget ledger")
            except Exception as exc:  # a URL redis-py refuses: reported by check_ledger, at start
                self._config_error = f"setting budgets.redis_url = {self._url!r}: {exc}"
                self.book = BudgetBook(list(settings.specs), settings.throttle)
            else:
                self.book = RedisBudgetBook(client, list(settings.specs), settings.throttle,
                                            prefix=namespace(settings.redis_prefix, settings.redis_cluster),
                                            reservation_ttl_s=settings.reservation_ttl_s)
        else:
            self.book = BudgetBook(list(settings.specs), settings.throttle)
            self._charged = self.book.charged  # one copy of the ids (each snapshot held two until stop 82)
        self.book.origin = self.base
        self.refusals = {"wait": 0, "deferred": 0, "budget_exhausted": 0, "budget_unavailable": 0}
        self._reported: asyncio.Task | None = None
        self._dirty = False
        self._soft_said: dict[str, str] = {}  # budget -> the window whose passed soft limit was logged
        self._window_timer: tuple[float, asyncio.TimerHandle] | None = None  # (when, handle): the next window end
        self.spec_version = 0  # budgets changed live so far (``LiveBudgets``): 0, those of the settings
        self.spec_incarnation = secrets.token_hex(4)  # this run of the actor: a restart's numbers may go back
        self._spec_by = ""  # a Redis ledger: the token of the change in force (``actors._budget_specs``)
        # A Redis ledger's budgets are the ledger's, shared by its engines: read at the first call (``LiveBudgets``).
        self._specs_unread = bool(self._errors) and self._config_error is None
        self._restarted = False  # by Ray (``reconstructed``)
        self._specs_lock: asyncio.Lock | None = None  # one live change at a time (``LiveBudgets``)
        # A change whose reply Redis lost (the version it was merged on, its version, its token): made or not is
        # settled at the next call Redis answers (``LiveBudgets._settle_unsure``).
        self._specs_unsure: tuple[int, int, str] | None = None
        self._specs_checked = -math.inf  # monotonic time of the last check of the ledger's version

    def __repr__(self) -> str:
        ledger = "" if not self._errors else f", redis_up={self._down_until is None}, unsettled={len(self._outbox)}"
        return f"BudgetController({self.book!r}, refusals={self.refusals}{ledger})"

    async def check_ledger(self) -> tuple[BudgetSpec, ...]:
        """Raise ``ConfigError`` when budgets are set and their Redis does not answer, refuses the ledger's scripts
        or their writes (a replica, a full Redis), or may evict its keys: awaited at engine start, so a budget that
        cannot be enforced stops the start. Then send the budget gauges: they are sent when they move, and a
        scrape before the first reservation showed no budget at all (a tour, stop 64). Returns the budgets in
        force, which the groupers start with: a Redis ledger's, changed live on an engine sharing it, over the
        settings' (an engine started with none reserved nothing until its groupers' first ask; a review)."""
        if self.settings.specs and self._config_error is not None:
            raise ConfigError(self._config_error)
        if self.settings.specs and self._errors:
            await check_redis_ledger(self.book, self._url, ", ".join(s.name for s in self.settings.specs),
                                     self._errors, self._describe)
        await self._restored_first()  # the budgets in force on the ledger, said at start if not the settings'
        if self.book.specs:
            self._changed(journal=False)
        return tuple(self.book.specs)

    async def close(self) -> None:
        """Close the ledger's Redis connections (what the outbox holds then is the engine stop's: ``leave``)."""
        self._closed = True
        client = getattr(self.book, "client", None)
        if client is not None:
            self.book.stop_watch()
        # Ended before the client closes: one woken after it opened a connection nothing closed (stop 80).
        await self._loops_ended(self._flusher, getattr(self.book, "_watcher", None))
        if client is not None:  # for good: a claim after it is refused, opening no connection (``actors._redis_gate``)
            from actors._redis_gate import close_client

            await close_client(client)

    async def set_clock(self, clock, base: float = 0.0) -> None:
        self.clock, self.base = clock, base
        self.book.origin = base  # a horizon is paced from the engine's start, on the ledger's clock

    def now(self) -> float:
        return (self.clock.now() if self.clock is not None else 0.0) + self.base

    async def _maybe(self, out):
        return await out if asyncio.iscoroutine(out) else out

    async def reserve_many(self, claims: list[Claim], release: list[str] = ()) -> list[Verdict]:
        """One verdict per claim; a deferral's ``retry_at`` is in engine time. ``release``: claims to let go
        first (settled at 0), in the same call, so what they held goes to these claims and nobody between."""
        await self._restored_first()
        if not await self._settle([(rid, 0.0) for rid in release]) or not self._usable():
            return self._unavailable(len(claims))
        try:
            verdicts = await self._maybe(self.book.reserve_many(claims, self.now()))
        except self._errors as exc:
            self._failed(exc)
            # Redis may have run the script and lost only the reply: release whatever it reserved.
            self._outbox.extend((c.rid, 0.0) for c in claims)
            self._arm_flush()
            await self._keep_pending([(c.rid, 0.0) for c in claims])
            return self._unavailable(len(claims))
        self._recovered()
        out = []
        for v in verdicts:
            if not v.ok:
                self.refusals[v.reason] += 1
                if v.retry_at is not None:
                    v = v._replace(retry_at=v.retry_at - self.base)
            out.append(v)
        # A call that reserved and released nothing (a try of held work that must wait again) changed only the
        # refusal counts: no journal write to wait for. Held work is tried once per engine second, 200 times a
        # second at 200x, and each write is the whole ledger.
        self._changed(journal=bool(release) or any(v.ok for v in out))
        await self._durable()
        return out

    async def settle_many(self, items: list[tuple[str, float]]) -> None:
        """(claim id, actual cost) of finished, failed or cancelled work, in one step: Ray does not order
        calls to an async actor, so a release sent apart from its settlement could let a reservation through
        that the limit cannot cover."""
        await self._restored_first()
        await self._settle([(rid, _spend(rid, usd)) for rid, usd in items])
        self._changed()
        await self._durable()

    def reconstructed(self) -> None:
        """Ray restarted this actor (``actors.remote`` calls this after the constructor): its memory ledger is read
        back before any ledger call is answered, not only when the driver's rewire asks, a health check later
        (calls answered meanwhile from an empty ledger were then overwritten by the restore)."""
        self._must_recover = True
        self._restarted = True

    async def _restored_first(self) -> None:
        if self.__dict__.pop("_must_recover", False):
            await self.recover()
        if self._restoring is not None:  # a restart's ledger is being read back (``recover``)
            await self._restoring.wait()
        if self._specs_unread:
            await self._read_specs()
        elif self._specs_unsure and self._usable():
            await self._settle_unsure()

    async def charge_many(self, charges: list[Charge]) -> None:
        """Count spend no reservation covered (``Charge``); kept until the ledger takes it, as settlements are
        (a charge is counted once per id, so a replay of one Redis did take changes nothing)."""
        now = self.now()  # its windows are those open now, however late Redis takes it
        await self._restored_first()
        charges = [c._replace(usd=_spend(c.cid, c.usd)) for c in charges]
        self._charges.extend((c, now) for c in charges)
        if self._charged is not getattr(self.book, "charged", None):  # a memory ledger's book notes them
            self._charged.add_many([(c.cid, c.usd) for c in charges], now)  # each looked up before any is forgotten
        await self._charge()
        self._changed()
        await self._durable()

    def _changed(self, journal: bool = True) -> None:
        if journal and self.journal is not None and (self.settings.specs or self.spec_version):
            self._journal_dirty = True
            self._asked += 1
            self._kv_soon()  # and Ray's store, off the hot path: the hub and this actor may die together
            if self._journaling is None or self._journaling.done():
                self._journaling = asyncio.get_running_loop().create_task(self._journal_soon())
        self._dirty = True
        if self.hub is not None and not self._closed and (self._reported is None or self._reported.done()):
            self._reported = asyncio.get_running_loop().create_task(self._report_soon())

    async def report(self) -> dict:
        """Each budget's current window, settled spend per tenant/provider/model, refusals by reason, and (for
        a ledger of this engine alone) every window so far and the overrun, which must be 0."""
        # charged_usd: spend no reservation covered (``Charge``), in the spend figures too, and past a limit if
        # it came to that: the bill's, not a decision's.
        await self._restored_first()  # restarted by Ray: the ledger taken back first, not reported empty
        await self.follow_ledger()  # a budget changed on another engine sharing the ledger is listed as it is
        out = {"budgets": [], "spend": [], "refusals": dict(self.refusals),
               "charged_usd": round(self._charged.usd, 6)}
        try:
            if self._usable():
                out["budgets"] = await self._rows()
                out["spend"] = await self._maybe(self.book.spend_report())
        except self._errors as exc:  # Redis down: the report says so instead of failing
            self._failed(exc)
        if self._errors:
            down = self._down_until is not None
            out["ledger"] = {"redis_url": self._url, "up": not down, "error": self._last_error if down else None,
                             "unsettled": len(self._outbox) + self._settling + len(self._charges),
                             "unjournaled": self.unjournaled(),
                             "lost_records": self.lost_records,
                             "replayed_after_restart": getattr(self.book, "replayed", 0),
                             "reopened_after_restart": getattr(self.book, "reopened", 0),
                             "lost_writes_found": getattr(self.book, "lost_writes", 0),
                             "rejected_settlements": self.rejected_settlements}
        if isinstance(self.book, BudgetBook):
            out["ledger_id"] = self.ledger_id
            out["windows"] = self.book.windows()
            out["overrun_usd"] = usd(self.book.overrun_usd())
            out["reserved_usd"] = usd(self.book.reserved_total())
            out["spent_usd"] = usd(sum(self.book.spend.values()))
        else:
            out["spent_usd"] = usd(sum(r["spent_usd"] for r in out["spend"]))
        return out
