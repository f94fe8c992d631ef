"""Budgets shared by several engines: the rules of ``engine.core.budgets`` applied atomically inside Redis.

Each reservation batch and each settlement batch is one Lua script, so Redis runs it whole, with no other
client's command in between: there is no check-then-increment window. (LiteLLM's budgets were overrun that
way: "with N pods the effective budget was N x max_budget", issues #34732 and #6288.)

Keys: ``{prefix}:w:{spec}@{window start}`` is a hash {spent, reserved} that expires a day after its window;
``{prefix}:c:{claim id}`` records which windows a claim reserved and how much, so settling releases exactly
that, even after the window rolled over; ``{prefix}:exp`` orders open claims by expiry; ``{prefix}:spend``
holds settled spend per tenant, provider and model; ``{prefix}:x:{charge id}`` marks a ``Charge`` counted.

Reservations expire: a claim still open ``reservation_ttl_s`` after it was made (on Redis's clock, ``TIME``,
one clock for every engine) is released by the next script that runs (both sweep first), so an engine that
crashed holding reservations cannot keep them for good. The claim's record stays, marked swept, so a
settlement that comes after all still counts its spend (and releases nothing twice).
"""

from __future__ import annotations

import math
import re
import time

from actors._budget_replay import ScriptRefused, ServerWatch
from actors._budget_scripts import CHARGE, PROBE, RESERVE, SETTLE, SWEEP_ONLY, UPGRADE, on_cluster
from actors._redis_cluster import config_get, is_cluster_client
from engine.core._budget_legacy import legacy_key, today_key
from engine.core.budgets import (
    BudgetSpec,
    Charge,
    Claim,
    Covering,
    Refusal,
    Throttle,
    Verdict,
    verdict_of,
    window_bounds,
)

__all__ = ["RedisBudgetBook"]

_SEP = "\x1f"  # joins tenant, provider and model in the spend hash; escaped inside a name (see _who)
SWEEP_MAX = 1000  # expired claims released per script, so one script never runs long
# Past a claim's expiry, how long the book keeps who spent it (a settlement it sends again) and Redis the marker
# that such a replay was counted already: a day.
MARKER_SLACK_S = 86400
_UNKNOWN = (0.0, "", [], 0.0)  # what this book knows of a claim it did not grant

def _ttl(s: BudgetSpec, now: float) -> int:
    """Seconds a budget's window hash lives: a day past the window's end (0: a window that never ends)."""
    end = window_bounds(s.budget_duration, now)[1]
    return 0 if end == math.inf else int(end - now) + 86400


def _who(tenant: str, provider: str, model: str) -> str:
    """The spend hash's field for a tenant, provider and model. ``%`` and the separator are escaped inside
    each name, so a tenant name holding the separator can neither pass for another tenant's row nor make the
    report unreadable for every engine sharing the ledger (names without them are stored as before)."""
    return _SEP.join(x.replace("%", "%25").replace(_SEP, "%1F") for x in (tenant, provider, model))


def _names(field: str) -> list[str]:
    return [re.sub("%(25|1F)", lambda m: "%" if m.group(1) == "25" else _SEP, x) for x in field.split(_SEP)]


# Errors of Redis's state, not of what a script was given: an outage like any other. Raised by a command inside a
# script, they carry its "on @user_script" too (redis-py maps the first four by their code and strips it).
_STATE_CODES = ("OOM", "READONLY", "NOPERM", "MISCONF", "BUSY", "LOADING", "MASTERDOWN", "NOREPLICAS", "TRYAGAIN",
                "CROSSSLOT", "CLUSTERDOWN", "MOVED", "ASK")
# A cluster node refusing a key it does not serve inside a script (Redis 7 words it so, with no code): read as a
# refusal, the settlement was settled again one by one over what its first try wrote, then dropped (a $0.80
# settlement counted $1.60, its reservation released twice; docs/budgets.md, Redis Cluster). And a cluster down
# that serves reads (cluster-allow-reads-when-down yes) runs the script, EVALSHA being no write command, and stops it
# at its first write: read as a refusal, the settlement was dropped, its spend never counted (a review).
_NOT_LOCAL = re.compile(r"non local key|do not hash to the same slot|the cluster is down")
# Redis 6.2 and older wrap such an error in "Error running script (call to f_...): @user_script:N: ...", the code
# after a dash: read as a refusal, a full Redis's settlements were dropped there, uncounted (a review).
_WRAPPED_STATE = re.compile(r"\s-(?:" + "|".join(_STATE_CODES) + r")\b")


def _refused(exc: BaseException) -> bool:
    """The ledger's script failed on what it was given (a value it cannot read, a key of another type written
    under the ledger's prefix), not for Redis's state (busy, loading, read-only, out of memory, no permission),
    which is an outage like any other."""
    from redis.exceptions import (
        AskError,
        BusyLoadingError,
        ClusterCrossSlotError,
        ClusterDownError,
        NoPermissionError,
        OutOfMemoryError,
        ReadOnlyError,
        TryAgainError,
    )

    # Before (a helper's hunt), a full Redis's OOM inside the settlement's script read as a refusal: each
    # settlement was dropped, its spend never counted and its reservation held until it expired.
    if isinstance(exc, (OutOfMemoryError, ReadOnlyError, NoPermissionError, BusyLoadingError, AskError,
                        ClusterCrossSlotError, ClusterDownError, TryAgainError)):
        return False
    text = str(exc)
    if text.split(" ", 1)[0] in _STATE_CODES or _WRAPPED_STATE.search(text) or _NOT_LOCAL.search(text):
        return False
    return "user_script" in text or "Error running script" in text or text.startswith("WRONGTYPE")


class RedisBudgetBook(ServerWatch):
    """``BudgetBook``'s interface (async), state in Redis. ``client``: a ``redis.asyncio.Redis``."""

    def __init__(self, client, specs: list[BudgetSpec], throttle: Throttle = Throttle(), *,
                 prefix: str = "smartbatch:budget", reservation_ttl_s: float = 172_800.0):
        if reservation_ttl_s <= 0:
            raise ValueError(f"reservation_ttl_s must be > 0, got {reservation_ttl_s}")
        self.client = client
        self.specs = list(specs)
        self.covering = Covering(self.specs)
        self.throttle = throttle
        self.origin = 0.0  # where a horizon's pacing starts on this book's clock (``BudgetSpec.span``)
        self.prefix = prefix
        # Each script names one key of the ledger, so a cluster client sends it to the node serving the ledger's
        # slot (every key under one hash tag, ``actors._redis_cluster.namespace``); a single Redis ignores it.
        self.route = [f"{prefix}:exp"]
        self.reservation_ttl_s = reservation_ttl_s
        # On a cluster, each script that writes refuses while the ledger's slot moves between nodes (``SLOT_STILL``).
        self._guard = on_cluster if is_cluster_client(client) else str
        self._reserve = client.register_script(self._guard(RESERVE))
        self._settle = client.register_script(self._guard(SETTLE))
        self._sweep = client.register_script(self._guard(SWEEP_ONLY))
        self._charge = client.register_script(self._guard(CHARGE))
        # The start's probe too: sent by ASK to the node a slot moves to, it wrote its key there before the move's
        # MIGRATE of it, which then failed (BUSYKEY).
        self._probe = client.register_script(self._guard(PROBE))
        self._upgrade = client.register_script(self._guard(UPGRADE))
        # Per budget, its last window looked for under its key of before stop 74 (``legacy_key``): one per budget,
        # not one per window, which a quoted budget of "1s" windows would add every second for good.
        self._looked: dict[str, str] = {}
        # The claims this book granted and has not settled: (when, whose spend, the windows it holds, its amount),
        # sent with its settlement (until Redis takes it) so that spend counts if Redis lost the claim's record, and
        # reserved again should another Redis process answer (``ServerWatch._reopen``). Oldest first.
        self._open: dict[str, tuple[float, str, list[tuple[str, int]], float]] = {}
        ServerWatch.__init__(self)

    def __repr__(self) -> str:
        return f"RedisBudgetBook(specs={len(self.specs)}, prefix={self.prefix!r})"

    def set_specs(self, specs: list[BudgetSpec]) -> None:
        """The budgets from now on (a live change): a window's hash is keyed by its budget's name, so a limit
        changed mid-window counts what that window spent and holds already."""
        self.specs = list(specs)
        self.covering = Covering(self.specs)

    def claim_copy(self, rid: str) -> tuple | None:
        """What this book knows of an open claim (whose spend, which windows), for a settlement kept where it
        outlives this process (``actors._budget_outbox``); None if it knows nothing of it."""
        entry = self._open.get(rid)
        return None if entry is None else entry[1:]

    def restore_copy(self, rid: str, copy: tuple) -> None:
        """Take back a ``claim_copy`` kept from before a restart; its age starts again here. A window named as
        before stop 74 (kept by that version) is named as its budget is now: it is moved there (``_take_legacy``)."""
        who, windows, *rest = copy
        windows = [(today_key(k, self.specs), ttl) for k, ttl in windows]
        self._open.setdefault(rid, (time.monotonic(), who, windows, *rest))

    async def reserve_many(self, claims: list[Claim], now: float) -> list[Verdict]:
        if not claims:
            return []
        await self._same_server()
        args: list = [self.prefix, repr(float(self.reservation_ttl_s)), len(claims), SWEEP_MAX]
        touched_all, allowed_all = [], []  # per claim: the budgets covering it, what its priority may reach of each
        th = self.throttle
        for c in claims:
            if c.amount < 0:
                raise ValueError(f"claim {c.rid}: amount must be >= 0, got {c.amount}")
            touched = self.covering(c.tenant, c.provider, c.model)
            allowed = [s.max_budget * th.of(c.priority) * th.pace_of(s, c.priority, now, self.origin) for s in touched]
            touched_all.append(touched)
            allowed_all.append(allowed)
            args += [c.rid, repr(float(c.amount)), len(touched)]
            for s, a in zip(touched, allowed):
                args += [s.key(now), repr(float(s.max_budget)), repr(float(a)), _ttl(s, now)]
            args.append(_who(c.tenant, c.provider, c.model))
        await self._take_legacy([s for touched in touched_all for s in touched], now)
        raw = await self._run(self._reserve, args)
        out = []
        self._forget_old()
        for c, touched, allowed, r in zip(claims, touched_all, allowed_all, raw):
            text = r.decode() if isinstance(r, bytes) else r
            if not text:  # granted
                self._open[c.rid] = (time.monotonic(), _who(c.tenant, c.provider, c.model),
                                     [(s.key(now), _ttl(s, now)) for s in touched], float(c.amount))
                self._arm_watch()
            refusals = []
            for j, rem, fits in (part.split(":") for part in text.split(",") if part):
                s = touched[int(j) - 1]
                used = s.max_budget - float(rem)
                refusals.append(Refusal(s, float(rem), fits == "1",
                                        th.paced_until(s, c.priority, now, used + c.amount, self.origin),
                                        allowed[int(j) - 1], th.pace_of(s, c.priority, now, self.origin) < 1.0,
                                        s.max_budget * th.of(c.priority)))
            out.append(verdict_of(refusals, c.priority, now))
        return out

    async def _take_legacy(self, specs: list[BudgetSpec], now: float) -> None:
        """Move each of ``specs``' current window from its key of before stop 74 to today's, once per window (the
        script finds none after). Not one another budget holds as its own today: tenant "a,provider=x" was named
        as tenant a on provider x is now, and that window is the latter's."""
        moves, looked, today = [], {}, None
        for s in {s.name: s for s in specs}.values():  # a batch's claims touch a few budgets, each many times
            old = legacy_key(s, now)
            if old is None or self._looked.get(s.name) == old:
                continue
            today = today or {t.key(now) for t in self.specs}  # once: per budget, 1,000 budgets took 0.8 s
            if old not in today:
                moves += [old, s.key(now), _ttl(s, now)]
            looked[s.name] = old
        if moves:  # one script for them all: it reads each open claim once (``UPGRADE``)
            await self._upgrade(keys=self.route, args=[self.prefix, len(moves) // 3, *moves])
        self._looked.update(looked)

    async def settle_many(self, items: list[tuple[str, float]]) -> int:
        """Settle each (claim id, actual); returns how many settlements found their claim's record gone and were
        counted from what this book kept of them (a claim another engine, or this one before a restart, granted
        is counted only through its record). Raises ``ScriptRefused`` when the script refused what it was given
        (nothing settled: the caller settles them one by one, ``BudgetController._settle_apart``)."""
        if not items:
            return 0
        await self._same_server()
        return await self._settle_items(items)

    async def _settle_items(self, items: list[tuple[str, float]], check: bool = True) -> int:
        args: list = [self.prefix, len(items), SWEEP_MAX, int(self.reservation_ttl_s + MARKER_SLACK_S)]
        for rid, actual in items:
            # Kept until Redis took it: the controller sends a settlement again after a failed call (the first
            # after a restart meets the connection it cut), and the marker the script leaves makes it count once.
            who, windows = self._open.get(rid, _UNKNOWN)[1:3]
            args += [rid, repr(float(actual)), who, len(windows)]
            for key, ttl in windows:
                args += [key, ttl]
        from redis.exceptions import ResponseError

        try:
            lost = int(await self._run(self._settle, args, check))
        except ResponseError as exc:
            if not _refused(exc):
                raise
            raise ScriptRefused(str(exc)) from exc
        t = time.monotonic()
        for rid, actual in items:
            who, windows = self._open.pop(rid, _UNKNOWN)[1:3]
            if who:  # a claim this book granted: sent again should Redis forget it
                self._kept(self._settled, rid, (t, actual, who, windows))
        return lost

    def _forget_old(self) -> None:
        """A claim never settled (its grouper gone) is released by the sweep; what this book kept of it goes a day
        after its expiry, so the map stays bounded by the claims of that span."""
        cutoff = time.monotonic() - self.reservation_ttl_s - MARKER_SLACK_S
        while self._open:
            rid, (at, *_) = next(iter(self._open.items()))
            if at >= cutoff:
                break
            del self._open[rid]

    async def charge_many(self, charges: list[Charge], now: float) -> None:
        if not charges:
            return
        await self._same_server()
        await self._charge_items(charges, now)

    async def _charge_items(self, charges: list[Charge], now: float, check: bool = True) -> None:
        args: list = [self.prefix, len(charges)]
        await self._take_legacy([s for c in charges for s in self.covering(c.tenant, c.provider, c.model)], now)
        for c in charges:
            touched = self.covering(c.tenant, c.provider, c.model)
            args += [c.cid, repr(float(c.usd)), _who(c.tenant, c.provider, c.model), len(touched)]
            for s in touched:
                args += [s.key(now), _ttl(s, now)]
        await self._run(self._charge, args, check)
        t = time.monotonic()
        for c in charges:
            self._kept(self._charged, c.cid, (t, c, now))

    async def sweep(self) -> int:
        """Release the reservations of expired claims now (every reservation or settlement does it too);
        returns how many were released. Also a check that the ledger's Redis answers and runs its scripts."""
        return int(await self._sweep(keys=self.route, args=[self.prefix, SWEEP_MAX]))

    async def probe(self) -> None:
        """Raise unless the ledger's Redis answers, runs its scripts and takes their writes."""
        await self._probe(keys=self.route, args=[self.prefix])
        await self.sweep()
        await self._same_server()

    async def eviction(self) -> str | None:
        """How this Redis may drop the ledger's keys (a memory limit under any policy but ``noeviction``; a
        budget's window hash has a TTL, so even a ``volatile-*`` policy takes it), or None. None too when its
        configuration cannot be read (managed services): it is let be."""
        from redis.exceptions import ResponseError

        try:
            cfg = await config_get(self.client, self.route[0], "maxmemory*")
        except ResponseError:
            return None
        policy, limit = str(cfg.get("maxmemory-policy", "")), int(cfg.get("maxmemory", 0) or 0)
        if not limit or policy in ("", "noeviction"):
            return None
        return f"maxmemory {limit}, maxmemory-policy {policy}"

    async def spend_report(self) -> list[dict]:
        """Settled spend per tenant, provider and model, over every engine sharing this Redis."""
        h = await self.client.hgetall(f"{self.prefix}:spend")
        rows = []
        for k, v in h.items():
            t, p, m = _names(k.decode() if isinstance(k, bytes) else k)
            rows.append({"tenant": t, "provider": p, "model": m, "spent_usd": round(float(v), 6)})
        return sorted(rows, key=lambda r: (r["tenant"], r["provider"], r["model"]))

    async def report(self, now: float) -> list[dict]:
        """Each budget's current window, as ``BudgetBook.report``."""
        from engine.core.budgets import window_row

        rows = []
        for s in self.specs:
            spent, reserved = await self.window(s, now)
            rows.append(window_row(s, s.key(now), spent, reserved))
        return rows

    async def window(self, spec: BudgetSpec, now: float) -> tuple[float, float]:
        """(spent, reserved) of ``spec``'s window at ``now``."""
        await self._take_legacy([spec], now)
        h = await self.client.hgetall(f"{self.prefix}:w:{spec.key(now)}")
        return float(h.get(b"spent", 0) or 0), float(h.get(b"reserved", 0) or 0)
