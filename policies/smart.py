"""``smart``: the product policy.

Per request, the cheapest way that still meets the deadline:

* reuse (exact, in flight, near-duplicate with guards), applied by the runtime from ``reuse``;
* text whose model takes the provider's flex tier goes there at once when its deadline has room (batch prices);
* text and hosted images with a provider batch API go to a *batch lane* when the batch has a fair chance of
  finishing before its hedge time; it is sent with ``hedge_at = earliest deadline - (sync p99 x drain) - margin``
  so a late batch is cancelled (billing nothing) and its members sent synchronously in time. The expected cost
  ``P * batch + (1 - P) * sync`` is compared with sync, so the risk of a late batch is priced in. A request whose
  prompt prefix is warm at the provider now goes sync instead when reading it costs less;
* GPU-priced media gathers compatible jobs (same compat key) until the GPU batch is full or the latest start
  that still meets the earliest deadline, amortising the warm-up, while the lane's recent arrivals promise
  company worth the wait (value of time); a job with none expected goes at once;
* everything else is sent at once, alone; on an explicit-caching provider the prompt prefix is marked for
  caching when the same cacheable prefix was seen within the cache TTL.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

from engine.core.cost import mode_factor
from engine.core.grouping import Decision, Group, PrefixWarmth, ReuseSettings, token_sums
from engine.core.request import Request
from engine.core.scheduling import Scheduling
from engine.core.settings import TurnaroundLearning
from engine.core.similarity import Guards
from policies._conversation import ConversationLane
from policies._gpu import GpuLane
from policies._smart_params import SmartParams
from policies._text import TextConsts, second_batch_checkpoint, text_consts, warm_sync_pays
from policies._text import as_flex as _as_flex
from policies._text import batch_lane as _batch_lane
from policies._text import fallback_slot as _fallback_slot
from policies._text import flex_fits as _flex_fits
from policies._text import hedge_lead as _hedge_lead
from policies._text import held_back as _held
from policies._text import member_usd as _usd
from policies._text import not_worth as _not_worth
from policies.base import Policy, register

__all__ = ["Smart", "SmartParams"]

@register
class Smart(GpuLane, ConversationLane, Policy):
    """The cheapest way per request that still meets its deadline: reuse, a hedged provider batch, a GPU
    batch, or sync at once (the module's docstring says how each is chosen)."""

    name = "smart"
    Params = SmartParams
    reads_budget_pressure = True  # the runtime passes ``group_key`` its BudgetPressure (``_held_back``)
    reads_warmth = True  # ... and its PrefixWarmth (``warm_sync_pays``)
    reads_returned = True  # ... and whether the request comes back from a dispatch (a late batch, a failed attempt)

    def __init__(self, catalog, params=None):
        super().__init__(catalog, params)
        # Per (provider, model) constants, computed once here so that ``decide`` never writes to the policy.
        self._consts: dict[tuple[str, str], TextConsts] = {
            (p.name, m): text_consts(p, spec) for p in catalog.providers.values()
            for m, spec in p.models.items() if _batch_lane(spec)}
        # Per provider, the deadline past which requests share one band (see ``band_p``).
        self._band_cap: dict[str, float] = {
            p.name: p.batch_api.turnaround_quantile(self.params.band_p) if p.batch_api is not None else math.inf
            for p in catalog.providers.values()}

    @property
    def reuse(self) -> ReuseSettings:
        p = self.params
        return ReuseSettings(exact=p.reuse_exact, in_flight=p.reuse_in_flight, near=p.reuse_near,
                             near_threshold=p.near_threshold, guards=Guards.of(p.near_guards),
                             follow_margin_s=p.in_flight_margin_s)

    @property
    def scheduling(self) -> Scheduling:
        return self.params.scheduling

    @property
    def turnaround_learning(self) -> TurnaroundLearning:
        """Read by the runtime (its ``GroupTable``), which hands ``group_key`` and ``decide`` the learned provider."""
        return self.params.turnaround

    # -- grouping ----------------------------------------------------------------------------------------------
    def _text_consts(self, provider, spec, model: str) -> TextConsts:
        return self._consts.get((provider.name, model)) or text_consts(provider, spec)

    def _hedge_lead(self, c: TextConsts, output_tokens: int, n: int) -> float:
        return _hedge_lead(c, output_tokens, n, self.params)  # when a late batch falls back (policies/_text.py)

    def _p_alone(self, provider, c: TextConsts, req: Request, now: float) -> float:
        """P(a batch sent now with ``req`` alone is back before its hedge)."""
        return provider.batch_api.turnaround_cdf(req.deadline_at - now - self._hedge_lead(c, req.output_tokens, 1))

    def group_key(self, req: Request, compat: tuple, now: float, provider=None, budget=None,
                  warmth: PrefixWarmth | None = None, returned: bool = False) -> Hashable:
        """``provider``: the runtime's view of ``req``'s provider (its learned turnaround); None: the catalog's.
        ``budget``: the runtime's ``BudgetPressure`` (see ``_held_back``); ``warmth``: its ``PrefixWarmth``;
        ``returned``: ``req`` comes back from a dispatch (a batch cancelled late, a failed attempt)."""
        provider = provider or self.catalog.providers[req.provider]
        spec = provider.models[req.model]
        if spec.gpu_priced:
            return ("gpu", compat)
        p, held, ba = self.params, self._held_back(req, budget), provider.batch_api
        now_s = p.flex_now_s if p.flex_now_s is not None else ba.turnaround_median_s if ba is not None else math.inf
        # Held back by a budget, it goes at once (``_held_back``): at the flex tier where it fits, the same money
        # serving twice the work a sync call would.
        if p.flex and (held or req.deadline_at - now <= now_s) and _flex_fits(provider, spec, req, now):
            return ("flex", req.uid)
        if _batch_lane(spec) and provider.supports_batch_api(req.kind, req.model) and not held:
            c = self._text_consts(provider, spec, req.model)
            p_on_time = self._p_alone(provider, c, req, now)
            if p_on_time >= self.params.min_on_time_p:
                if (warmth is not None and self.params.warm_margin_s is not None and req.prefix_blocks
                        and warm_sync_pays(self.catalog, req, provider.batch_api, p_on_time, warmth, now,
                                           self.params.warm_margin_s, self.params.block_tokens)):
                    return ("sync", req.uid, "warm")
                # Deadlines within a factor of two share a batch, so one urgent member does not hedge (and push
                # to sync) members that could have waited. Past the band cap a batch is on time with P >= band_p
                # whatever the deadline, so those share one band: a rare hedge only sends a long-deadline member
                # back for another batch, and a conversation's turns (priorities per turn) share a prefix write.
                band_s, left = req.deadline_s, req.deadline_at - now
                if conversation := self._shares_prefix(req, provider, spec):
                    band_s, left = min(band_s, cap := self._band_cap_of(provider)), min(left, cap)
                bucket = int(math.log2(max(band_s, 1.0)))
                if returned:
                    # Back from a dispatch (a batch cancelled late, a failed attempt): apart from fresh requests,
                    # whose gathering its old arrival would cut short and whose batch its near hedge would cancel
                    # early; with the members of its batch, which come back in the same second, banded by the
                    # time they have left (one due soon would hedge the others early again), up to the band cap
                    # as fresh ones are: past it, a conversation's normal and background turns went to two
                    # batches, each writing their prefix again (a review: $2.40 on Mooncake's seed 0).
                    return ("batch", compat, ("back", math.floor(now), int(math.log2(max(left, 1.0)))))
                if conversation and self.params.conversation_groups:
                    # Only requests that start with one cacheable run share a read: a group per run loses nothing.
                    return ("batch", compat, bucket, req.prefix_blocks[:self._cacheable_blocks(provider, spec)])
                return ("batch", compat, bucket)
        return ("sync", req.uid)

    def _band_cap_of(self, provider) -> float:
        """The shared band's deadline cap (``band_p``) at ``provider``'s turnaround: the catalog's, or a learned one."""
        if provider is self.catalog.providers.get(provider.name):
            return self._band_cap[provider.name]
        return provider.batch_api.turnaround_quantile(self.params.band_p)

    _held_back = staticmethod(_held)  # a budget holds work back while reservations are the model's maximum

    def arrival_key(self, key: Hashable) -> Hashable | None:
        """The lanes that weigh company to come count arrivals; a conversation's group (``conversation_groups``)
        counts in its lane: the lane's batches sent about together are what its wait is worth."""
        if not (isinstance(key, tuple) and key[0] in ("batch", "gpu")):
            return None
        if key[0] == "batch" and isinstance(key[2], tuple):
            return None  # members back from a cancelled batch: no arrivals of the lane, nor judged by its company
        return key[:3] if key[0] == "batch" and len(key) == 4 else key

    # -- decisions ---------------------------------------------------------------------------------------------
    def decide(self, group: Group, now: float) -> Decision:
        lane = group.key[0] if isinstance(group.key, tuple) else "sync"
        if lane == "gpu":
            return self._decide_gpu(group, now)
        d = self._decide_batch(group, now) if lane == "batch" else self._decide_call(group, now, lane)
        if not self.params.flex or d.mode != "sync" or d.action != "dispatch":
            return d
        return _as_flex(d, group, now)

    def _decide_call(self, group: Group, now: float, lane: str) -> Decision:
        req = group.members[0]
        write, prefix = self._prefix(req, group, now)
        if lane == "flex":
            return Decision("dispatch", "flex", cache_write=write, reason="flex now: batch prices, no wait", prefix=prefix)
        why = "deadline too close for a batch" if group.provider.supports_batch_api(req.kind, req.model) else \
            "no batch lever for this model"
        # By the key's shape, not its last item: a plain sync key ends with the request's id, which may be "warm".
        if group.key == ("sync", req.uid, "warm"):  # it reads the prefix and writes its turn for the next
            write, why = True, "its prompt prefix is warm at the provider, cheaper read now than in a batch"
        return Decision("dispatch", mode="sync", cache_write=write, recommendation="process_individually",
                        reason=f"sync now: {why}" + ("; prefix marked for caching" if write else ""), prefix=prefix)

    def _gather_budget(self, group: Group, c: TextConsts) -> float:
        """Seconds a batch may gather after its oldest arrival: the longest wait that lowers the chance of
        finishing before the hedge by at most ``gather_p_loss`` (``shared_gather_p_loss`` in the shared band), so
        long deadlines gather long, large batches that share cached prefixes, and short ones go almost at once.
        Closed form: wait ``g`` such that ``usable - g`` is the turnaround quantile of ``cdf(usable) - loss``."""
        ba = group.provider.batch_api
        usable = (group.earliest_deadline_at - group.oldest_arrival_s
                  - self._hedge_lead(c, group.max_output_tokens, len(group)))
        if usable <= 0:
            return 0.0
        loss = self.params.gather_p_loss
        if (group.earliest_deadline_at - group.oldest_arrival_s >= self._band_cap_of(group.provider)
                and self._shares_prefix(group.members[0], group.provider, group.spec)):
            # The shared band: a longer gather takes in more follow-ups (a median 2 minutes after their turn on
            # Mooncake), which read the prefix one member writes.
            loss = self.params.shared_gather_p_loss
        target = ba.turnaround_cdf(usable) - loss
        g = usable - ba.turnaround_quantile(target) if target > 0 else usable - ba.turnaround_min_s
        cap = self.params.batch_gather_s
        pc = group.provider.cache_of(group.spec)
        if self.params.chain_cache and pc is not None and pc.stacks_with_batch:
            # Flush at least once per (median turnaround + cache TTL). Written for batches whose prefixes were
            # warm from their submission (the simulator before stop 30); kept since it still hedges less
            # (docs/policies.md).
            cap = min(cap, ba.turnaround_median_s + pc.ttl_s)
        if group.closed:  # a member expects no company (``Request.gather``): only the rest of its submission
            cap = min(cap, self.params.closed_gather_s)
        return min(max(g, 0.0), cap)

    def _flush_at(self, group: Group, c: TextConsts) -> float:
        """When ``group`` stops gathering: its oldest arrival plus its gather budget. Kept on the group (``memo``,
        with what ``_decide_batch`` derives from it) while everything it is computed from stands: a group is
        decided on every arrival, and ``riders`` asks it of every group of its lane."""
        ba = group.provider.batch_api  # (the runtime's learned turnaround changes at its epochs)
        key = (group.earliest_deadline_at, group.oldest_arrival_s, -(-len(group) // c.max_conc),
               group.max_output_tokens, ba, group.closed > 0, id(group.members[0]))
        memo = group.memo
        if memo is not None and memo[0] == key:
            return memo[1]
        flush_at = group.oldest_arrival_s + self._gather_budget(group, c)
        group.memo = (key, flush_at, None, None)
        return flush_at

    def _decide_batch(self, group: Group, now: float) -> Decision:
        p = self.params
        ba = group.provider.batch_api
        assert ba is not None
        n = len(group)
        held = 0  # the leading members a budget holds back (the lane mixes tenants; budgets may cover some)
        while held < min(n, ba.max_requests) and self._held_back(group.members[held], group.budget):
            held += 1
        if held:
            return Decision("dispatch", mode="sync", take=held, recommendation="process_individually",
                            reason="sync now: a budget holds work back and a batch would keep its members' "
                                   "model-max reservations open for the whole turnaround")
        c = self._text_consts(group.provider, group.spec, group.members[0].model)
        flush_at = self._flush_at(group, c)
        if isinstance(group.key[2], tuple):
            # Members back from one dispatch come back together: judged once all are here, then sent (no one joins).
            if now < group.key[2][1] + 1.0:
                return Decision.wait(group.key[2][1] + 1.0, "gathering the members back from one batch")
            flush_at = now
        gathering = n < ba.max_requests and now < flush_at
        if n <= ba.max_requests:  # the running aggregates, no pass over the members (decide is O(1) per arrival)
            k, max_out, earliest = n, group.max_output_tokens, group.earliest_deadline_at
            tokens = group.input_tokens, group.output_tokens, group.long_input_tokens, group.long_output_tokens
        else:
            members = group.members[: ba.max_requests]
            k, max_out, earliest = len(members), max(r.output_tokens for r in members), min(r.deadline_at
                                                                                              for r in members)
            tokens = token_sums(group.spec, members)
        lead = self._hedge_lead(c, max_out, k)
        hedge_at, fallback = _fallback_slot(group, c, earliest - lead, lead - p.hedge_margin_s - c.cancel_s, k, max_out,
                                            now, sent=not gathering, margin_s=p.hedge_margin_s)
        send_at = flush_at if gathering else now
        if not p.second_batch or group.returned:
            checkpoint, p_on_time = None, ba.turnaround_cdf(hedge_at - send_at)
        elif group.memo[2] == (hedge_at, send_at, ba):  # decided on every arrival: kept
            checkpoint, p_on_time = group.memo[3]
        else:
            checkpoint, p_on_time = second_batch_checkpoint(ba, send_at, hedge_at)
            group.memo = group.memo[:2] + ((hedge_at, send_at, ba), (checkpoint, p_on_time))
        # List prices without cache effects: the batch reads the provider cache as sync calls would, so it holds.
        c_sync = c.list_usd(*tokens) if group.spec.kind == "text" else _usd(self.catalog, group, c, group.members[:k])
        c_batch = mode_factor(group.provider, "batch_api") * c_sync
        # Value of time, judged on every decision, with P(on time) at the time the batch would be sent. P only
        # falls while a batch waits, so a batch not worth it now never will be, unless company arrives: the
        # lane's recent arrival rate (others than these members) says how much.
        saving = p_on_time * (c_sync - c_batch)  # expected: sync minus (P * batch + (1 - P) * sync)
        # Company to come: the lane's arrivals before the batch is sent, which join it. A conversation's group
        # batches alone, but the lane's other conversations that arrive over its gather go about together with it
        # and would have shared its batch as one lane: their saving counts, whether it still gathers or not.
        if len(group.key) == 4:
            projected = saving * (1.0 + group.arrival_rate(now) * (flush_at - group.oldest_arrival_s) / k)
        else:
            projected = saving * (1.0 + group.arrival_rate(now) * (flush_at - now) / k) if gathering else saving
        why_not = _not_worth(self.params, group, projected, c_sync, p_on_time, hedge_at, send_at, now)
        if why_not is not None and gathering and group.closed:
            # The rest of its submission is on its way (a file's lines come in parts): judged with it.
            return Decision.wait(flush_at, "gathering the rest of a submission")
        if why_not is not None and p_on_time < p.min_on_time_p and isinstance(group.key[2], tuple) and k > 1:
            return self._split_back(group, c, now, k)
        if why_not is not None:
            return Decision("dispatch", mode="sync", take=k, recommendation="process_individually",
                            reason=f"sync now: {why_not}")
        if gathering:
            return Decision.wait(flush_at, "gathering a batch")
        rec = "process_as_batch" if p_on_time >= p.confident_p else "consider_batch"
        hedge = (f"hedge at t={hedge_at:.0f}s" if checkpoint is None else
                 f"cancelled at t={checkpoint:.0f}s if late for a second batch, hedge at t={hedge_at:.0f}s")
        back_at = hedge_at if checkpoint is None else checkpoint
        return Decision("dispatch", mode="batch_api", take=k, hedge_at=back_at, fallback=fallback, recommendation=rec,
                        reason=(f"batch API: {k} requests, expected ${saving:.4f} saved of ${c_sync:.4f} at list price, "
                                f"P(on time)={p_on_time:.2f}, {hedge}"), prefix=self._expect_calls(group, k, back_at, now))

    def _split_back(self, group: Group, c: TextConsts, now: float, k: int) -> Decision:
        """Members back with no chance as one batch, most of whom alone have one: the leading ones that do (one
        wave of calls at most, so each one's own lead holds) ride a batch hedged at the earliest of their last safe
        moments; with none, the first goes sync, the rest decided again (a review, stop 57)."""
        ba, mp = group.provider.batch_api, self.params.min_on_time_p
        j = 0
        while j < min(k, c.max_conc) and self._p_alone(group.provider, c, group.members[j], now) >= mp:
            j += 1
        ride = group.members[:j]
        hedge_at = min((r.deadline_at - self._hedge_lead(c, r.output_tokens, j) for r in ride), default=now)
        out, margin = max((r.output_tokens for r in ride), default=0), self.params.hedge_margin_s + c.cancel_s
        hedge_at, fallback = _fallback_slot(group, c, hedge_at, self._hedge_lead(c, out, j) - margin, j, out, now, margin_s=margin - c.cancel_s)
        p_on_time = ba.turnaround_cdf(hedge_at - now)
        if p_on_time < mp:
            return Decision("dispatch", mode="sync", take=1, recommendation="process_individually",
                            reason=f"sync now: P(batch done by hedge)={p_on_time:.2f} too low")
        c_sync = sum(_usd(self.catalog, group, c, (r,)) for r in ride)
        saving = p_on_time * (1.0 - mode_factor(group.provider, "batch_api")) * c_sync
        return Decision("dispatch", mode="batch_api", take=j, hedge_at=hedge_at, fallback=fallback,
                        recommendation="consider_batch", reason=f"batch API: {j} of {k} members back, expected "
                        f"${saving:.4f} saved of ${c_sync:.4f} at list price, P(on time)={p_on_time:.2f}, hedge at "
                        f"t={hedge_at:.0f}s")
