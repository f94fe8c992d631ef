"""What a policy sees and returns: open groups of pending requests, and decisions about them.

The runtime (simulator or actors) owns the groups and the loop; a policy only reads a ``Group`` and returns a
``Decision``. Both live on the core floor so that policies and both runtimes can import them.
"""

from __future__ import annotations

import bisect
import math
from collections import OrderedDict
from collections.abc import Container, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Literal, NamedTuple

from engine.core.catalog import ModelSpec, ProviderSpec
from engine.core.cost import Mode
from engine.core.fallbacks import FallbackCalendar
from engine.core.request import Request
from engine.core.similarity import Guards

__all__ = ["RECOMMENDATIONS", "BudgetPressure", "Decision", "FallbackCalendar", "Group", "LaneRates", "PrefixSightings",
           "PrefixWarmth", "Recommendation", "ReuseSettings", "WarmNote", "token_sums"]

Recommendation = Literal["process_as_batch", "consider_batch", "process_individually"]
RECOMMENDATIONS: tuple[Recommendation, ...] = ("process_as_batch", "consider_batch", "process_individually")


class ReuseSettings(NamedTuple):
    """What reuse a policy allows. The runtime applies it; a request's own ``reuse`` field can only narrow it."""

    exact: bool = False
    in_flight: bool = False
    near: bool = False
    near_threshold: float = 0.92
    guards: Guards = Guards()
    # A request due before the leader it would follow may still follow it, until this many seconds (past
    # twice its own call's p99) before its deadline, when it is sent on its own; None: it never follows such a
    # leader. Only requests sent by a sync call (engine.runtime.admission.release_lead says why).
    follow_margin_s: float | None = None


class Decision(NamedTuple):
    """``wait`` until ``wake_at`` (or the next arrival to the group), or ``dispatch`` the first ``take``
    members (0 = all) in ``mode``. ``hedge_at``: for ``batch_api``, the time at which an unfinished batch is
    cancelled and its members sent synchronously. ``cache_write``: mark the shared prompt prefix for the
    provider's cache (explicit-caching providers); on a call, a tuple instead names the depths (leading prefix
    blocks, deepest first) it breaks at, the write reaching the deepest (``PrefixSightings.parts``). ``prefix``: the key of a prompt prefix this dispatch sends,
    for the runtime to record in the group's ``PrefixSightings`` (a policy never records it itself): sent now by
    a call; on a ``batch_api`` dispatch, one key per member taken (or None), whose calls are expected at
    ``hedge_at`` (a batch likely late: ``PrefixSightings.expect``)."""

    action: Literal["wait", "dispatch"]
    mode: Mode | None = None
    take: int = 0
    wake_at: float | None = None
    hedge_at: float | None = None
    cache_write: bool | tuple[int, ...] = False
    recommendation: Recommendation = "process_individually"
    reason: str = ""
    prefix: Hashable | None = None
    # For a batch: (start, end, calls, seconds a call) of the sync calls its members fall back to if late (from
    # its final hedge: a checkpoint's second batch hedges then), which the runtime's ``FallbackCalendar`` reserves.
    fallback: tuple[float, float, int, float] | None = None

    @staticmethod
    def wait(until: float | None, reason: str = "") -> Decision:
        return Decision("wait", wake_at=until, reason=reason)


class PrefixSightings:
    """When each prompt prefix was last dispatched (keys are a policy's, e.g. (provider, model, leading blocks)):
    what tells a policy that a cache write would be read again. Runtime state, not a policy's: the table
    records a dispatch's ``Decision.prefix`` after the decision, so ``decide`` stays pure; and which requests of a
    batch likely late will call for a prefix, and when (``expect``). Bounded: the prefix seen least recently is
    forgotten first."""

    __slots__ = ("_last", "_due", "capacity")

    def __init__(self, capacity: int = 65_536):
        self._last: OrderedDict[Hashable, float] = OrderedDict()
        # Per prefix, the members of batches likely late, by the blocks they start with, and when each falls
        # back to a call (``expect``).
        self._due: OrderedDict[Hashable, list[tuple[tuple, float, str]]] = OrderedDict()  # (blocks, at, uid), sorted
        self.capacity = capacity

    def last(self, key: Hashable) -> float | None:
        return self._last.get(key)

    def see(self, key: Hashable, now: float) -> None:
        self._last[key] = now
        self._last.move_to_end(key)
        if len(self._last) > self.capacity:
            self._last.popitem(last=False)

    def expect(self, key: Hashable, at: float, readers: Iterable[tuple[str, Sequence[int]]], now: float) -> None:
        """Requests wait in a batch likely late, and call for ``key``'s prefix at ``at`` if it is: ``readers``, each
        (uid, the prefix blocks its prompt starts with: a write is read only by a prompt that holds it whole,
        ``expected``). One call per key and batch: the key's expectations are rebuilt once, not once per member."""
        new = [(tuple(head), at, u) for u, head in readers]
        again = {u for _, _, u in new}
        # Those past are sent or back; one expected again is in a batch anew.
        kept = [e for e in self._due.pop(key, ()) if e[1] >= now and e[2] not in again]
        self._due[key] = sorted(kept + new)  # by prefix: those that hold a write are one run (``expected``)
        # The prefixes expected least recently go once all theirs are past (a long-running engine holds only
        # the batches still out), and the least recent of all beyond ``capacity``.
        while self._due and (len(self._due) > self.capacity
                             or all(e[1] < now for e in next(iter(self._due.values())))):
            self._due.popitem(last=False)

    def forget(self, uids: Container[str]) -> None:
        """Requests withdrawn by their driver: none of them falls back to a call (rare: a pass over the table)."""
        for key, due in list(self._due.items()):
            if any(e[2] in uids for e in due):
                self._due[key] = [e for e in due if e[2] not in uids]

    def expected(self, key: Hashable, since: float, until: float, but: str, writes: Sequence[int] = ()) -> bool:
        """Whether a request other than ``but`` is expected to call for ``key``'s prefix within [since, until]
        with a prompt that starts with ``writes`` (an explicit cache's entry ends where its write did: a prompt
        that parts from it before its end reads none of it). Looks only at those that hold ``writes``: a call
        does not pay for the other conversations of its system prompt's batch."""
        due, w = self._due.get(key, ()), tuple(writes)
        for i in range(bisect.bisect_left(due, (w,)), len(due)):
            head, t, u = due[i]
            if head[:len(w)] != w:
                return False
            if u != but and since <= t <= until:
                return True
        return False

    def parts(self, key: Hashable, since: float, until: float, but: str, blocks: Sequence[int],
              least: int) -> tuple[int, ...]:
        """The depths, deepest first, at which requests other than ``but`` expected to call for ``key``'s prefix
        within [since, until] part from ``blocks`` before its end, each at least ``least`` blocks: a call that
        breaks there leaves an entry such a prompt holds whole (``engine.core.cost.entry_marks``), where one
        write at the call's end is read by none of them (``expected`` counts only those). By the sorted runs of
        those that hold ``blocks[:k]``, as ``expected``: a pass over all of a system prompt's batch cost a call
        15 ms at 10,000 members expected (a review)."""
        due, b, out = self._due.get(key, ()), tuple(blocks), []
        lo, hi = 0, len(due)
        for k in range(max(least, 0), len(b)):
            if k:  # the run that holds the first k blocks, inside the last one
                lo = bisect.bisect_left(due, b[:k], lo, hi, key=lambda e, k=k: e[0][:k])
                hi = bisect.bisect_right(due, b[:k], lo, hi, key=lambda e, k=k: e[0][:k])
            if lo == hi:
                break
            n_lo = bisect.bisect_left(due, b[:k + 1], lo, hi, key=lambda e, k=k: e[0][:k + 1])
            n_hi = bisect.bisect_right(due, b[:k + 1], n_lo, hi, key=lambda e, k=k: e[0][:k + 1])
            if any(due[i][2] != but and since <= due[i][1] <= until for i in chain(range(lo, n_lo), range(n_hi, hi))):
                out.append(k)
        return tuple(reversed(out))

    def __len__(self) -> int:
        return len(self._last)


class WarmNote(NamedTuple):
    """What one ended call or batch member tells of the provider's prompt cache: ``blocks`` (the leading prefix
    blocks it read or wrote) stay warm for ``model`` until at least ``until`` (engine time)."""

    provider: str
    model: str
    blocks: tuple[int, ...]
    until: float

    @classmethod
    def of(cls, req: Request, cached: int, start: float, ttl_s: float, block_tokens: int) -> WarmNote:
        """What a call of ``req`` that began at ``start`` and read or wrote its first ``cached`` prefix blocks
        leaves warm: those blocks for one TTL from ``start`` (a batch member ran somewhere between its batch's
        submission and its end, so from the submission that much holds however the provider orders a batch).
        Whole blocks only: a prompt's last block, shorter than a block, is sent with the rest of the prompt
        (``anthropic_http.body``), so an entry ends at the last whole block, which a next turn shares."""
        whole = min(cached, req.input_tokens // block_tokens)
        return cls(req.provider, req.model, tuple(req.prefix_blocks[:whole]), start + ttl_s)


class PrefixWarmth:
    """The runtime's belief of which prompt-prefix blocks are warm at each provider, from the results of its own
    calls and batches (``WarmNote``): what tells a policy that a follow-up sent now reads its conversation's
    prefix at the cache-read price. Runtime state, like ``PrefixSightings``: a policy only reads it. Bounded:
    blocks gone cold are dropped once per ``sweep_s``."""

    __slots__ = ("_until", "_ends", "_sweep_at", "sweep_s")

    def __init__(self, sweep_s: float = 300.0):
        self._until: dict[tuple[str, str], dict[int, float]] = {}
        # Where cache entries end (a note's last block): an explicit cache (Anthropic) holds exact prefixes that
        # end at a breakpoint, and reads none that stops inside one.
        self._ends: dict[tuple[str, str], dict[int, float]] = {}
        self._sweep_at = -math.inf
        self.sweep_s = sweep_s

    def see(self, notes: Iterable[WarmNote], now: float) -> None:
        for n in notes:
            until = self._until.setdefault((n.provider, n.model), {})
            for b in n.blocks:
                if until.get(b, -1.0) < n.until:
                    until[b] = n.until
            if n.blocks:
                ends = self._ends.setdefault((n.provider, n.model), {})
                ends[n.blocks[-1]] = max(ends.get(n.blocks[-1], -1.0), n.until)
        if now >= self._sweep_at:
            for table in (self._until, self._ends):
                for key, until in list(table.items()):
                    for b in [b for b, t in until.items() if t < now]:
                        del until[b]
                    if not until:
                        del table[key]
            self._sweep_at = now + self.sweep_s

    def leading(self, provider: str, model: str, blocks: Sequence[int], at: float,
                exact: bool = False) -> tuple[int, float]:
        """How many of ``blocks`` (a prompt's prefix blocks, in order) are believed warm until ``at`` or later,
        counting from the first (a provider's cache reads a prefix, never a block past a cold one), and until
        when all of those are (``at`` when none is). ``exact``: only up to the last block where a cache entry
        ends (an explicit cache)."""
        until = self._until.get((provider, model))
        ends = self._ends.get((provider, model), {}) if exact else None
        n, first_cold, upto, upto_cold = 0, math.inf, 0, math.inf
        for b in blocks if until else ():
            t = until.get(b, -1.0)
            if t < at:
                break
            n, first_cold = n + 1, min(first_cold, t)
            end = ends.get(b, -1.0) if ends is not None else -1.0
            if end >= at:  # the entry ending here lasts until ``end``, which the blocks may outlast
                upto, upto_cold = n, min(first_cold, end)
        if ends is not None:
            n, first_cold = upto, upto_cold
        return n, first_cold if n else at

    def __len__(self) -> int:
        return sum(len(u) for u in self._until.values())


class LaneRates:
    """How fast requests arrive under each group key lately: an arrival count that decays with time constant
    ``tau_s``, so ``rate`` is about the arrivals of the last ``tau_s`` seconds over ``tau_s``. What tells a
    policy whether a lone request will have company if it waits. Runtime state, like ``PrefixSightings``: the
    table records every arrival before the policy decides. Bounded: the key seen least recently goes first."""

    __slots__ = ("_seen", "capacity", "tau_s")

    def __init__(self, tau_s: float = 600.0, capacity: int = 65_536):
        self._seen: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()  # key -> (count, at)
        self.tau_s = tau_s
        self.capacity = capacity

    def see(self, key: Hashable, now: float) -> None:
        seen = self._seen
        got = seen.get(key)
        if got is None:
            seen[key] = (1.0, now)
            if len(seen) > self.capacity:
                seen.popitem(last=False)
            return
        count, at = got
        seen[key] = (count * math.exp(min(0.0, at - now) / self.tau_s) + 1.0, now)
        seen.move_to_end(key)

    def rate(self, key: Hashable, now: float) -> float:
        """Arrivals per second under ``key`` (the latest arrival included), 0 for a key never seen."""
        count, at = self._seen.get(key, (0.0, now))
        return count * math.exp(min(0.0, at - now) / self.tau_s) / self.tau_s

    def __len__(self) -> int:
        return len(self._seen)


class BudgetPressure:
    """Which budgets hold work back right now (the runtime's budget waits), and whether a reservation is the
    model's maximum output (``budgets.reserve_output``). Runtime state that a policy reads, like ``LaneRates``:
    under a budget that holds work back, money reserved for longer keeps more work waiting."""

    __slots__ = ("holding", "model_max")

    def __init__(self, model_max: bool = True):
        self.holding: tuple = ()  # the budgets (``BudgetSpec``) that hold work back
        self.model_max = model_max

    def holds(self, req: Request) -> bool:
        """Whether a budget covering ``req`` holds work back."""
        return any(s.covers(req.tenant, req.provider, req.model) for s in self.holding)


def token_sums(spec: ModelSpec, reqs: Sequence[Request]) -> tuple[int, int, int, int]:
    """Input and output tokens of ``reqs``, then of those whose prompt passes ``spec``'s ``long_context`` tier
    (each such call billed whole at the tier's prices: ``engine.core.cost.list_price_text``)."""
    lc, past = spec.long_context, ()
    if lc is not None:
        past = [r for r in reqs if r.input_tokens > lc.above_input_tokens]
    return (sum(r.input_tokens for r in reqs), sum(r.output_tokens for r in reqs),
            sum(r.input_tokens for r in past), sum(r.output_tokens for r in past))


@dataclass(eq=False, slots=True)
class Group:
    """Pending requests that a policy put under one key, in arrival order, with running aggregates so a
    policy can decide in O(1) per arrival. ``sightings``: the runtime's record of recent prompt prefixes (read
    only, for a policy). ``memo``: a policy may keep values derived from the group here (they live and die with
    it); the runtime never reads it."""

    key: Hashable
    provider: ProviderSpec
    spec: ModelSpec
    members: list[Request] = field(default_factory=list)
    earliest_deadline_at: float = float("inf")
    oldest_arrival_s: float = float("inf")
    max_output_tokens: int = 0
    version: int = 0
    sightings: PrefixSightings | None = None
    memo: Any = None
    rates: LaneRates | None = None
    rate_key: Hashable = None  # the key ``rates`` counts this group's arrivals under (``Policy.arrival_key``); None: ``key``
    budget: BudgetPressure | None = None
    input_tokens: int = 0  # of the members, summed
    output_tokens: int = 0
    long_input_tokens: int = 0  # of those, the members' whose prompt passes the model's long_context tier
    long_output_tokens: int = 0
    by_priority: dict[str, int] = field(default_factory=dict)  # members per priority
    returned: set[str] = field(default_factory=set)  # uids of members back from a dispatch (a cancelled batch, a retry)
    closed: int = 0  # members that expect no company (``Request.gather`` false): nothing is held for them
    run: tuple | None = None  # (provider, model, prefix run) the runtime indexes it under (``Policy.prefix_run``)
    calendar: FallbackCalendar | None = None  # the runtime's, read only: the fallbacks its batches may make

    def __post_init__(self) -> None:
        if self.rate_key is None:
            self.rate_key = self.key

    def add(self, req: Request, returned: bool = False) -> None:
        """``returned``: ``req`` comes back from a dispatch (a batch cancelled late, a failed attempt)."""
        self.members.append(req)
        if returned:
            self.returned.add(req.uid)
        self.earliest_deadline_at = min(self.earliest_deadline_at, req.deadline_at)
        self.oldest_arrival_s = min(self.oldest_arrival_s, req.arrival_s)
        self.max_output_tokens = max(self.max_output_tokens, req.output_tokens)
        self.input_tokens += req.input_tokens
        self.output_tokens += req.output_tokens
        if (lc := self.spec.long_context) is not None and req.input_tokens > lc.above_input_tokens:
            self.long_input_tokens += req.input_tokens
            self.long_output_tokens += req.output_tokens
        self.by_priority[req.priority] = self.by_priority.get(req.priority, 0) + 1
        self.closed += not req.gather
        self.version += 1

    def arrival_rate(self, now: float) -> float:
        """Arrivals per second lately under this group's ``rate_key`` (``LaneRates``: the group's key, or the
        lane a policy counts it in), not counting the members waiting here (what company to expect); 0 when the
        runtime keeps none."""
        if self.rates is None:
            return 0.0
        return max(0.0, self.rates.rate(self.rate_key, now) - len(self.members) / self.rates.tau_s)

    def take(self, k: int) -> list[Request]:
        """Remove and return the first ``k`` members (all for k <= 0), recomputing the aggregates."""
        k = len(self.members) if k <= 0 else k
        out, self.members = self.members[:k], self.members[k:]
        return self._took(out)

    def remove(self, uids: Container[str]) -> list[Request]:
        """Remove and return the members whose uid is in ``uids`` (withdrawn by their driver)."""
        out = [r for r in self.members if r.uid in uids]
        if out:
            self.members = [r for r in self.members if r.uid not in uids]
            self._took(out)
        return out

    def _took(self, out: list[Request]) -> list[Request]:
        self.version += 1
        if self.returned:
            self.returned.difference_update(r.uid for r in out)
        if not self.members:
            self.earliest_deadline_at = self.oldest_arrival_s = float("inf")
            self.max_output_tokens = self.input_tokens = self.output_tokens = self.closed = 0
            self.long_input_tokens = self.long_output_tokens = 0
            self.by_priority = {}
            return out
        self.input_tokens -= sum(r.input_tokens for r in out)
        self.output_tokens -= sum(r.output_tokens for r in out)
        if self.spec.long_context is not None:
            _, _, long_in, long_out = token_sums(self.spec, out)
            self.long_input_tokens -= long_in
            self.long_output_tokens -= long_out
        for r in out:
            self.by_priority[r.priority] -= 1
            self.closed -= not r.gather
        self.earliest_deadline_at = min((r.deadline_at for r in self.members), default=float("inf"))
        self.oldest_arrival_s = min((r.arrival_s for r in self.members), default=float("inf"))
        self.max_output_tokens = max((r.output_tokens for r in self.members), default=0)
        return out

    def __len__(self) -> int:
        return len(self.members)

    def __repr__(self) -> str:
        return (f"Group(key={self.key!r}, n={len(self.members)}, earliest_deadline_at={self.earliest_deadline_at:.1f}, "
                f"oldest_arrival_s={self.oldest_arrival_s:.1f})")
