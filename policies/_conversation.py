"""A conversation's turns in ``smart``'s batch lanes: a turn pulled to sync when a call just left its prefix warm,
the lane's groups riding in one provider batch, and a prompt prefix marked for a cache write when it was seen
within the cache's TTL."""

from __future__ import annotations

import math
from collections.abc import Hashable

from engine.core.cost import min_cacheable_tokens
from engine.core.grouping import Decision, Group, PrefixWarmth
from engine.core.request import Request
from policies._text import BatchMates, warm_sync_pays
from policies._text import as_flex as _as_flex

__all__ = ["ConversationLane"]

_PULL_SCAN = 500  # members of a group a warm pull prices at most (about 15 ms)
_LIKELY_LATE = 0.5  # P(on time) under which a batch's members are expected back for a call


class ConversationLane:
    """Mixed into ``Smart``; reads its ``params``, ``catalog`` and its text constants (``_text_consts``,
    ``_p_alone``, ``_hedge_lead``, ``_flush_at``, ``_held_back``)."""

    def prefix_run(self, key: Hashable) -> tuple | None:
        """A conversation's group (``conversation_groups``) gathers the requests that start with one cacheable run."""
        if isinstance(key, tuple) and len(key) == 4 and key[0] == "batch" and self.params.pull_warm:
            return key[3]
        return None

    def warm_pull(self, group: Group, now: float, warmth: PrefixWarmth) -> tuple[Decision, set[str]] | None:
        """The turns of a conversation waiting for a batch that a call just left its prefix warm for (an urgent
        turn sent sync, a hedge's fallback): those that read it now for less than the batch is expected to cost
        them (``warm_sync_pays``, as at arrival) go sync at once, each writing its own turn for the next. Waiting
        on, they would write the prefix again in their batch, which ends long after the warmth is gone. Only the
        ``_PULL_SCAN`` oldest are looked at: a lane whose every request starts with one system prompt is one
        group of thousands, offered at every result, and each member is priced."""
        if self.params.warm_margin_s is None or group.returned:
            return None
        provider = group.provider
        c = self._text_consts(provider, group.spec, group.members[0].model)
        uids, first = set(), None
        staying = BatchMates()  # the members before this one that stay: they write what it shares with them
        for req in group.members[:_PULL_SCAN]:
            if warm_sync_pays(self.catalog, req, provider.batch_api, self._p_alone(provider, c, req, now), warmth, now,
                              self.params.warm_margin_s, self.params.block_tokens, staying.shared(req.prefix_blocks)):
                uids.add(req.uid)
                first = first or req
            else:
                staying.add(req.prefix_blocks)
        if first is None:
            return None
        d = Decision("dispatch", mode="sync", cache_write=True, recommendation="process_individually",
                     reason="sync now: its prompt prefix is warm at the provider, cheaper read now than in a batch",
                     prefix=self._prefix(first, group, now)[1])
        return (_as_flex(d, group, now, [r for r in group.members if r.uid in uids]) if self.params.flex else d), uids

    def _shares_prefix(self, req: Request, provider, spec) -> bool:
        """Whether ``req`` carries a prompt prefix long enough for the provider's cache, where that cache also
        serves batches: the requests for which sharing a batch with other turns of a conversation pays."""
        if (pc := provider.cache_of(spec)) is None or not pc.stacks_with_batch or not req.prefix_blocks:
            return False
        return min(len(req.prefix_blocks) * self.params.block_tokens, req.input_tokens) >= min_cacheable_tokens(
            provider, spec)

    def riders(self, group: Group, others: list[Group], now: float) -> list[Group]:
        """The lane's other groups to send in ``group``'s batch: those due to be sent within ``ride_s`` anyway,
        with an earliest deadline no earlier than ``group``'s, and that bring its hedge forward by at most
        ``ride_s`` (a longer output or more waves of the sync fallback lengthen the hedge's lead); none with
        members back from a dispatch or held back by a budget; as many as the provider's batch takes. One
        provider batch per lane and ``ride_s``, not one per conversation: fewer batches to create and follow
        (providers rate-limit both), at the price of sending a group, or hedging the batch, ``ride_s`` sooner."""
        ride = self.params.ride_s
        if ride <= 0 or group.returned or not isinstance(group.key, tuple) or group.key[0] != "batch":
            return []
        ba = group.provider.batch_api
        c = self._text_consts(group.provider, group.spec, group.members[0].model)
        n, max_out, out = len(group), group.max_output_tokens, []
        lead = self._hedge_lead(c, max_out, n)
        for o in sorted(others, key=lambda o: o.earliest_deadline_at):
            if (o.returned or o.earliest_deadline_at < group.earliest_deadline_at or n + len(o) > ba.max_requests
                    or self._hedge_lead(c, max(max_out, o.max_output_tokens), n + len(o)) > lead + ride
                    or any(self._held_back(m, o.budget) for m in o.members)):
                continue
            if self._flush_at(o, c) <= now + ride:
                out.append(o)
                n, max_out = n + len(o), max(max_out, o.max_output_tokens)
        return out

    def _cacheable_blocks(self, provider, spec) -> int:
        """Leading prefix blocks of the shortest prefix ``provider``'s cache serves for ``spec``."""
        return max(1, math.ceil(min_cacheable_tokens(provider, spec) / self.params.block_tokens))

    def _prefix(self, req: Request, group: Group, now: float) -> tuple[bool | tuple[int, ...], tuple | None]:
        """Whether to mark ``req``'s cacheable prefix for a cache write, and the prefix's key for the runtime to
        record. Marked when a write is likely read again: the same prefix was sent within the cache's TTL, or
        another request whose prompt starts with ``req``'s whole prefix waits in a batch likely late whose
        fallback call comes before the write goes cold (``_expect_calls``). An explicit cache's entry ends where
        the write did, so a turn that parts from ``req``'s prefix before its end (an earlier, shorter turn of the
        conversation) reads none of it (``engine/emulator/_cache.py``, as Anthropic documents): where such a
        fallback is expected, the call breaks where it parts too (the depths, ``Decision.cache_write``), and
        writes up to there when nothing else asks for a write."""
        if (key := self._prefix_key(req)) is None:
            return False, None
        if group.sightings is None:
            return False, key
        provider = self.catalog.provider(req.provider)
        pc = provider.cache_of(req.model)
        last = group.sightings.last(key)
        cold = now + pc.ttl_s - (self.params.warm_margin_s or 0.0)  # the call must start before the write is cold
        write = (last is not None and now - last <= pc.ttl_s
                 or group.sightings.expected(key, now, cold, req.uid, writes=req.prefix_blocks))
        whole = req.prefix_blocks[:req.input_tokens // self.params.block_tokens]  # the blocks the body renders
        least = self._cacheable_blocks(provider, provider.models[req.model])
        if not (parts := group.sightings.parts(key, now, cold, req.uid, whole, least)):  # expected: explicit only
            return write, key
        return ((len(whole), *parts) if write else parts), key

    def _prefix_key(self, req: Request) -> tuple | None:
        """The key ``req``'s cacheable prefix is recorded under; None where its provider caches none of it."""
        provider = self.catalog.provider(req.provider)
        if (provider.cache_of(spec := provider.models[req.model])) is None or not req.prefix_blocks:
            return None
        k = self._cacheable_blocks(provider, spec)
        if len(req.prefix_blocks) < k or req.input_tokens < min_cacheable_tokens(provider, spec):
            return None
        return (req.provider, req.model, req.prefix_blocks[:k])

    def _expect_calls(self, group: Group, k: int, hedge_at: float, now: float) -> tuple | None:
        """For a batch dispatch of ``group``'s first ``k`` members hedged at ``hedge_at``: each member's prefix key
        (None for one without), for the runtime to expect their calls of (``PrefixSightings.expect``), where the
        provider's cache is explicit (a call writes only what it marks), the batch is more likely late than not
        and its members would fall back within the cache's TTL (an urgent turn's try: P ~0.22 at Anthropic).
        Else None. Per member: a lane's conversations ride one batch."""
        pc = group.provider.cache_of(group.spec)
        if (not self.params.fallback_marks or pc is None or pc.automatic or hedge_at - now > pc.ttl_s
                or group.provider.batch_api.turnaround_cdf(hedge_at - now) >= _LIKELY_LATE):
            return None
        return tuple(self._prefix_key(r) for r in group.members[:k])
