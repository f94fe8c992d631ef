"""The reference budget ledger, in one process: the rules of ``engine.core.budgets`` applied to dicts. The
simulator and the budget actor (without Redis) keep one; ``RedisBudgetBook`` (actors/) applies the same rules
atomically in Redis for budgets shared by several engines."""

from __future__ import annotations

import heapq
import math
import pickle
from collections import OrderedDict, deque

from engine.core.budgets import (
    EPS,
    BudgetSpec,
    Charge,
    Claim,
    Covering,
    Refusal,
    Throttle,
    Verdict,
    verdict_of,
    window_bounds,
    window_row,
)

__all__ = ["CHARGES_KEPT", "CHARGE_KEPT_S", "ENDED_KEPT", "BudgetBook", "KeptCharges"]

ENDED_KEPT = 256  # final rows of ended windows a ledger keeps for its report; their overrun is kept whole
# A charge id is remembered this long past its last sending, as Redis keeps its marker (``_budget_scripts.CHARGE``):
# a charge is sent again only within hours (a put-back, a resumed file), so one older is new spend. The span is on
# the ledger's clock, which a speed-up runs fast (two days in 0.2 s at 1e6): the newest CHARGES_KEPT ids stay
# whatever their age, so a replay on a fast clock is still counted once.
CHARGE_KEPT_S = 172_800.0
CHARGES_KEPT = 16_384


class KeptCharges:
    """The charge ids counted (``Charge.cid``), each until ``CHARGE_KEPT_S`` past its last sending (the newest
    ``CHARGES_KEPT`` whatever their age), and the USD of all ever counted. An engine that runs for days is charged
    per request (a batch's late results, a resumed file's lines, a body lost after its bill): before, every id
    stayed for good and went whole into each journal snapshot of the ledger."""

    __slots__ = ("_at", "_blob", "usd")

    def __init__(self) -> None:
        # cid -> (its USD, last sent: None if unknown, an old snapshot's), oldest sending first; ordered so the
        # oldest goes in O(1) (a dict emptied from its front scans the holes left there at each look)
        self._at: OrderedDict[str, tuple] = OrderedDict()
        self.usd = 0.0
        self._blob: bytes | None = None  # ``blob()`` while nothing changed since

    def __repr__(self) -> str:
        return f"KeptCharges(kept={len(self._at)}, usd={self.usd:.6f})"

    def __len__(self) -> int:
        return len(self._at)

    def __contains__(self, cid: object) -> bool:
        return cid in self._at

    def add(self, cid: str, usd: float, now: float) -> bool:
        """Note ``cid`` sent at ``now``; True if it is new (its USD counted), False if it was counted already."""
        return self.add_many([(cid, usd)], now)[0]

    def add_many(self, rows: list[tuple[str, float]], now: float) -> list[bool]:
        """``add`` for each (cid, USD) of one call, every one looked up before any is forgotten: pruned per id, a
        call of more than ``CHARGES_KEPT`` sent again past the span (a retried delivery on a sped-up clock) had
        its first id move the others out, each then counted twice."""
        at, new = self._at, []
        self._blob = None  # each id's last sending moves, new or not
        for cid, usd in rows:
            row = at.get(cid)
            new.append(row is None)
            if row is None:
                self.usd += usd
                at[cid] = (usd, now)
            else:
                at[cid] = (row[0], now if row[1] is None else max(row[1], now))
                at.move_to_end(cid)  # the order stays that of last sending
        self._prune(now)
        return new

    def _prune(self, now: float) -> None:
        at, old = self._at, now - CHARGE_KEPT_S
        while len(at) > CHARGES_KEPT:
            cid, (usd, last) = next(iter(at.items()))
            if last is None:  # restored without its time: its whole span from the first sending seen since, and
                at.move_to_end(cid)  # behind the rest (left first, it held back every id behind it for good)
                at[cid] = (usd, now)
                continue
            if last >= old:
                break
            at.popitem(last=False)

    def take(self, other: KeptCharges) -> None:
        """Add those of ``other`` not here (charges noted before a restart's snapshot was read back)."""
        for cid, row in other._at.items():
            if cid not in self._at:
                self._at[cid] = row
                self.usd += row[0]
                self._blob = None

    def state(self) -> tuple[dict[str, tuple], float]:
        return dict(self._at), self.usd

    def blob(self) -> bytes:
        """``state()`` pickled, once per change: a memory ledger's journal snapshot carries it at every group of
        changes, and reservations and settlements change no id. Built and pickled per snapshot (with the
        controller's copy beside them), 16,384 ids cut the budget actor's reserve + settle pairs from ~8,400/s to
        ~33/s for one caller (stop 82, ``benchmarks/bench_budget_ids.py``, docs/budgets.md)."""
        if self._blob is None:
            self._blob = pickle.dumps(self.state(), protocol=pickle.HIGHEST_PROTOCOL)
        return self._blob

    @classmethod
    def restore(cls, state) -> KeptCharges:
        """From ``blob()`` or ``state()``, or an older snapshot's set of ids (the book's) or dict of id -> USD (the
        controller's)."""
        if isinstance(state, bytes):
            return cls.restore(pickle.loads(state))
        kept = cls()
        if isinstance(state, tuple):
            rows, kept.usd = state
            kept._at = OrderedDict(rows)
        elif isinstance(state, dict):
            kept._at = OrderedDict((k, (float(v), None)) for k, v in state.items())
            kept.usd = sum(float(v) for v in state.values())
        else:
            kept._at = OrderedDict.fromkeys(state, (0.0, None))
        return kept


class BudgetBook:
    """The reference ledger. A window that has ended is not asked for again, and once no claim refers to it,
    it is gone. So a time earlier than the latest one given counts as that one (``_at``): the simulator's never
    goes back, but the budget actor's is a wall clock, which can (NTP, or a restart on a node that lags)."""

    def __init__(self, specs: list[BudgetSpec], throttle: Throttle = Throttle()):
        self.specs = list(specs)
        self.throttle = throttle
        self.origin = 0.0  # where a horizon's pacing starts on this book's clock (``BudgetSpec.span``)
        self.spent: dict[str, float] = {}
        self.reserved: dict[str, float] = {}
        self.claims: dict[str, tuple[tuple[str, str, str], list[tuple[str, float]]]] = {}  # rid -> (who, windows)
        self.spend: dict[tuple[str, str, str], float] = {}  # (tenant, provider, model) -> settled USD
        self.charged = KeptCharges()  # Charge.cid already counted
        self.by_name = {s.name: s for s in self.specs}
        self.covering = Covering(self.specs)
        # A window's spend is needed while it is open, and after it ends until the last claim that reserved in
        # it settles there; then its final row goes to ``ended`` and the window leaves ``spent`` and
        # ``reserved`` (30 s windows for months kept a key per window). Decisions read only open windows.
        self.ended: deque[dict] = deque(maxlen=ENDED_KEPT)
        self.ended_overrun = 0.0
        self._refs: dict[str, int] = {}  # window key -> open claims that reserved in it
        self._ends: list[tuple[float, str]] = []  # heap of (end, key) of the windows held that end
        self._ended_held: set[str] = set()  # ended, but a claim still refers to it
        self.latest = -math.inf  # the latest time given: no window it has passed is opened again
        # Window key -> what its spend and claims reached under a limit lowered since (``set_specs``): granted
        # under the limit then in force, it is no overrun of the lower one (``overrun_usd``).
        self.granted: dict[str, float] = {}

    def __repr__(self) -> str:
        return (f"BudgetBook(specs={len(self.specs)}, open={len(self.claims)}, "
                f"windows={len(self.spent.keys() | self.reserved.keys())}, "
                f"reserved={sum(self.reserved.values()):.4f}, spent={sum(self.spent.values()):.4f})")

    def set_specs(self, specs: list[BudgetSpec]) -> None:
        """The budgets from now on (a live change): a budget keeps its windows' spend and reservations by its
        name, so a limit changed mid-window counts what that window spent and holds already. A budget removed
        is named still by the windows it left (``by_name``), which end and report as any other."""
        held = set(self.spent) | set(self.reserved)
        for s in specs:
            old = self.by_name.get(s.name)
            if old is None or s.max_budget >= old.max_budget:
                continue
            for k in (k for k in held if k.rsplit("@", 1)[0] == s.name):
                granted = min(old.max_budget, self.spent.get(k, 0.0) + self.reserved.get(k, 0.0))
                self.granted[k] = max(self.granted.get(k, 0.0), granted)
        self.specs = list(specs)
        self.by_name.update((s.name, s) for s in self.specs)
        self.covering = Covering(self.specs)

    def plan(self, c: Claim, now: float) -> tuple[list[tuple[BudgetSpec, str]], Verdict]:
        """The windows a claim touches and whether it may pass (no change made)."""
        touched = [(s, s.key(now)) for s in self.covering(c.tenant, c.provider, c.model)]
        if c.amount < 0:
            raise ValueError(f"claim {c.rid}: amount must be >= 0, got {c.amount}")
        th = self.throttle
        frac = th.of(c.priority)
        refusals = []
        for s, k in touched:
            spent = self.spent.get(k, 0.0)
            used = spent + self.reserved.get(k, 0.0)
            pace = th.pace_of(s, c.priority, now, self.origin)
            limit = s.max_budget * frac * pace
            if used + c.amount > limit + EPS:
                refusals.append(Refusal(s, s.max_budget - used, spent + c.amount <= limit + EPS,
                                        th.paced_until(s, c.priority, now, used + c.amount, self.origin), limit,
                                        pace < 1.0, s.max_budget * frac))
        return touched, verdict_of(refusals, c.priority, now)

    def _at(self, now: float) -> float:
        """``now``, or the latest time given if that is later: a window that ended may be gone, and opened
        again empty it would let its budget be spent twice (and split its overrun into two rows under the
        limit)."""
        if now > self.latest:
            self.latest = now
        return self.latest

    def reserve_many(self, claims: list[Claim], now: float) -> list[Verdict]:
        now = self._at(now)
        self._drop_ended(now)
        out = []
        for c in claims:
            touched, v = self.plan(c, now)
            if v.ok:
                self.claims[c.rid] = ((c.tenant, c.provider, c.model), [(k, c.amount) for _, k in touched])
                for s, k in touched:
                    self._hold(s, k, now)
                    self.reserved[k] = self.reserved.get(k, 0.0) + c.amount
                    self._refs[k] = self._refs.get(k, 0) + 1
            out.append(v)
        return out

    def _hold(self, s: BudgetSpec, k: str, now: float) -> None:
        if k not in self.spent and k not in self.reserved:
            end = window_bounds(s.budget_duration, now)[1]
            if end < math.inf:
                heapq.heappush(self._ends, (end, k))

    def _drop_ended(self, now: float) -> None:
        ends = self._ends
        while ends and ends[0][0] <= now:
            k = heapq.heappop(ends)[1]
            if self._refs.get(k):
                self._ended_held.add(k)
            else:
                self._drop(k)

    def _drop(self, k: str) -> None:
        self._ended_held.discard(k)
        self._refs.pop(k, None)
        row = window_row(self.by_name[k.rsplit("@", 1)[0]], k, self.spent.pop(k, 0.0), self.reserved.pop(k, 0.0))
        self.ended.append(row)
        self.ended_overrun += self._over(k, row)
        self.granted.pop(k, None)

    def _over(self, k: str, row: dict) -> float:
        return max(row["spent_usd"] - max(row["max_budget"], self.granted.get(k, 0.0)), 0.0)

    def restore(self, spent: dict, reserved: dict, claims: dict, spend: dict, ended: tuple = (),
                ended_overrun: float = 0.0, latest: float = -math.inf, charged=frozenset()) -> None:
        """Take a ledger's state back (a journal's snapshot) and rebuild what says when each window goes. The
        latest time is at least the end of every window that went (a snapshot without ``latest``). ``charged``:
        the charge ids counted, so a charge sent again after the restart is not counted twice."""
        self.spent, self.reserved, self.claims, self.spend = dict(spent), dict(reserved), dict(claims), dict(spend)
        self.charged = KeptCharges.restore(charged)
        self.ended = deque(ended, maxlen=ENDED_KEPT)
        self.ended_overrun = ended_overrun
        self.latest = max([latest, *(window_bounds(r["budget_duration"], float(r["window"]))[1]
                                     for r in self.ended)])
        self._refs, self._ended_held = {}, set()
        for _, windows in self.claims.values():
            for k, _ in windows:
                self._refs[k] = self._refs.get(k, 0) + 1
        self._ends = []
        for k in set(self.spent) | set(self.reserved):
            name, start = k.rsplit("@", 1)
            s = self.by_name.get(name)
            end = math.inf if s is None else window_bounds(s.budget_duration, float(start))[1]
            if end < math.inf:
                self._ends.append((end, k))
        heapq.heapify(self._ends)

    def settle_many(self, items: list[tuple[str, float]]) -> None:
        """(claim id, actual cost): record it in the windows the claim reserved in, release the reservation.
        An unknown id (never reserved, or settled already) changes nothing, so a repeat is harmless."""
        for rid, actual in items:
            entry = self.claims.pop(rid, None)
            if entry is None:
                continue
            who, windows = entry
            self.spend[who] = self.spend.get(who, 0.0) + actual
            for k, amount in windows:
                if k not in self.reserved:  # its window is gone: what the late spend counts in is gone with it
                    continue
                self.reserved[k] -= amount
                self.spent[k] = self.spent.get(k, 0.0) + actual
                self._refs[k] -= 1
                if not self._refs[k]:
                    del self._refs[k]
                    if k in self._ended_held:
                        self._drop(k)

    def charge_many(self, charges: list[Charge], now: float) -> None:
        """Count spend no claim covered; a charge id seen before changes nothing, so a replay is harmless."""
        now = self._at(now)
        self._drop_ended(now)
        for c, new in zip(charges, self.charged.add_many([(c.cid, c.usd) for c in charges], now), strict=True):
            if not new:
                continue
            who = (c.tenant, c.provider, c.model)
            self.spend[who] = self.spend.get(who, 0.0) + c.usd
            for s in self.covering(c.tenant, c.provider, c.model):
                k = s.key(now)
                self._hold(s, k, now)
                self.spent[k] = self.spent.get(k, 0.0) + c.usd

    def report(self, now: float) -> list[dict]:
        """Each budget's current window."""
        now = max(now, self.latest)
        return [window_row(s, s.key(now), self.spent.get(s.key(now), 0.0), self.reserved.get(s.key(now), 0.0))
                for s in self.specs]

    def windows(self) -> list[dict]:
        """Every window any budget has spent or reserved in, oldest first: those still held, and the last
        ``ENDED_KEPT`` that ended."""
        keys = set(self.spent) | set(self.reserved)
        rows = [*self.ended, *(window_row(self.by_name[k.rsplit("@", 1)[0]], k, self.spent.get(k, 0.0),
                                          self.reserved.get(k, 0.0)) for k in keys)]
        return sorted(rows, key=lambda r: (float(r["window"]), f"{r['budget']}@{r['window']}"))

    def overrun_usd(self) -> float:
        """Spend past the hard limit, summed over every window (the invariant says 0). A limit lowered mid-window
        counts from what the window had granted under the one before: read against the lower limit alone, that
        spend showed as an overrun the ledger never made (a hunt)."""
        held = ((k, window_row(self.by_name[k.rsplit("@", 1)[0]], k, self.spent.get(k, 0.0),
                               self.reserved.get(k, 0.0))) for k in set(self.spent) | set(self.reserved))
        return self.ended_overrun + sum(self._over(k, r) for k, r in held)

    def reserved_total(self) -> float:
        """What the open claims hold, each once: a claim is held in every budget that covers it, and the sum of
        those windows counted it once per budget (a tour read $0.0118 reserved where $0.0066 was)."""
        return sum(windows[0][1] for _, windows in self.claims.values() if windows)

    def spend_report(self) -> list[dict]:
        """Settled spend per tenant, provider and model."""
        return [{"tenant": t, "provider": p, "model": m, "spent_usd": round(v, 6)}
                for (t, p, m), v in sorted(self.spend.items())]
