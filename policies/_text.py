"""Text-lane helpers of ``smart``: per-model constants, warm follow-ups, and the checkpoint of a second batch.

Warm follow-ups: a request that would wait for a batch while its prompt prefix is warm at the provider now.

A batch reads the provider's prompt cache when it runs, often many minutes later, when a conversation's
prefix written by its last turn has gone cold (a 5-minute TTL). Sent at once, the follow-up reads that prefix at
the cache-read price (0.1x input at Anthropic and OpenAI), and for a long conversation with a short new turn that
costs less than the batch's 50 % off the full prompt. The runtime's belief of what is warm (``PrefixWarmth``)
comes from its own results only: no foresight of follow-ups is needed, the follow-up is here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from engine.core.catalog import RateLimits
from engine.core.cost import min_cacheable_tokens, mode_factor, price_alone, token_prices
from engine.core.grouping import PrefixWarmth, token_sums
from engine.core.latency import Z99, flex_room
from engine.core.rates import start_spread_s
from engine.core.request import Request

__all__ = ["BatchMates", "TextConsts", "as_flex", "batch_lane", "fallback_slot", "flex_fits", "hedge_lead", "held_back", "member_usd",
           "not_worth", "rate_hedge", "second_batch_checkpoint", "text_consts", "warm_sync_pays"]

_MIN_GAIN = 0.005  # P(on time) a second batch must add to be worth its cancel and its second submission


class TextConsts(NamedTuple):
    base: float
    per_tok: float
    p99_factor: float
    max_conc: int
    p_in: float
    p_out: float
    cancel_s: float  # how long a cancel may take before the batch's finished members are known
    limits: RateLimits  # the gate its calls pass: the model's own limits, else the provider's
    long_p_in: float = 0.0  # what a token costs more in a call past the model's long_context tier (else 0)
    long_p_out: float = 0.0
    flex_slow: float = 0.0  # a flex call's slowdown where the model takes the provider's flex tier (else 0)
    flex_timeout_s: float = 0.0

    def list_usd(self, tokens_in: int, tokens_out: int, long_in: int = 0, long_out: int = 0) -> float:
        """List price of calls of ``tokens_in`` / ``tokens_out`` tokens, ``long_in`` / ``long_out`` of them in
        calls past the model's long_context tier (Gemini 2.5 Pro past 200k prompt tokens: the whole call at
        $2.50 / $15 a million, not $1.25 / $10; priced at the lower, a long prompt's batch saving read half)."""
        usd = self.p_in * tokens_in + self.p_out * tokens_out
        return usd + self.long_p_in * long_in + self.long_p_out * long_out if long_in or long_out else usd


def batch_lane(spec) -> bool:
    """Whether ``spec``'s requests may ride smart's batch lane (where the provider's batch API takes their kind):
    text, and hosted images (a GPU-priced model batches on its own GPUs)."""
    return spec.kind == "text" or spec.kind == "image" and not spec.gpu_priced


def text_consts(provider, spec) -> TextConsts:
    """A model's constants for its batch lane. A hosted image (stop 71: OpenAI's Batch API takes them): one call's
    latency is the model's (``media_latency``), whatever its output, and its price is per image (``member_usd``)."""
    if spec.kind == "image":
        ml, limits = provider.media_latency, spec.rate_limits or provider.rate_limits
        return TextConsts(ml.image_s, 0.0, math.exp(Z99 * ml.sigma), limits.max_concurrency, 0.0, 0.0,
                          provider.batch_api.cancel_s if provider.batch_api is not None else 0.0, limits)
    lat = provider.sync_latency
    p_in, p_out = token_prices(spec)
    limits = spec.rate_limits or provider.rate_limits
    lc = spec.long_context
    long_in, long_out = (token_prices(spec, lc.above_input_tokens + 1) if lc is not None else (p_in, p_out))
    fx = provider.flex
    flex = fx is not None and any(provider.models.get(m) == spec for m in fx.models)
    return TextConsts(lat.base_s, lat.per_output_token_s, math.exp(Z99 * lat.sigma), limits.max_concurrency,
                      p_in, p_out, provider.batch_api.cancel_s if provider.batch_api is not None else 0.0, limits,
                      long_in - p_in, long_out - p_out, fx.slowdown if flex else 0.0, fx.timeout_s if flex else 0.0)


def hedge_lead(c: TextConsts, output_tokens: int, n: int, p) -> float:
    """Seconds before the earliest deadline at which a late batch must fall back: its slowest member's sync p99
    per wave of ``max_concurrency`` calls (one more with ``hedge_retry``), the margin, and the time a cancel takes
    there (the unfinished members are known only once it ends). Where the model takes the flex tier (``p.flex``)
    and the fallback is one wave, room for a flex call and then a standard one if the tier refuses it: the
    fallback then costs batch prices too, for a hedge a slow call's p99 sooner (``as_flex``)."""
    call = (c.base + c.per_tok * output_tokens) * c.p99_factor
    waves = -(-max(n, 1) // c.max_conc)
    lead = call * (waves + (1 if p.hedge_retry else 0))  # a retry: one wave more
    if p.flex and c.flex_slow and waves == 1 and call * c.flex_slow <= c.flex_timeout_s:
        lead = max(lead, call * (c.flex_slow + 1))
    return lead + p.hedge_margin_s + c.cancel_s


def member_usd(catalog, group, c: TextConsts, members) -> float:
    """The list (sync) price of ``members`` of ``group``: their tokens at the text model's prices, a hosted image's
    from the cost model (per image, by size and quality, and its prompt's tokens)."""
    if group.spec.kind == "text":
        return c.list_usd(*token_sums(group.spec, members))
    return sum(price_alone(r, catalog, "sync").total for r in members)


def rate_hedge(members, c: TextConsts, hedge_at: float, margin_s: float) -> float:
    """The latest hedge, no later than ``hedge_at``, at which the rate limits (requests and tokens a minute) still
    start every member's fallback call in time, the calls served in deadline order (the queue's order): the
    ``j``-th due starts at most ``start_spread_s`` of the first ``j`` calls after the cancel. The hedge's lead
    counts the waves of ``max_concurrency`` calls, not the rate limits: at 30,000 tokens a minute, two of three
    20k-token fallbacks hedged together were 44 and 103 s late where naive met them (a hunt). ``hedge_at`` itself
    where the limits start them all at once (the default catalog's, for all but the largest batches)."""
    if start_spread_s(c.limits, len(members), sum(r.input_tokens + r.output_tokens for r in members)) <= 0:
        return hedge_at
    tokens, out = 0, 0
    for j, r in enumerate(sorted(members, key=lambda r: r.deadline_at), start=1):
        tokens, out = tokens + r.input_tokens + r.output_tokens, max(out, r.output_tokens)
        call = (c.base + c.per_tok * out) * c.p99_factor
        hedge_at = min(hedge_at, r.deadline_at - start_spread_s(c.limits, j, tokens) - call - margin_s - c.cancel_s)
    return hedge_at


def warm_sync_pays(catalog, req: Request, batch_api, p_on_time: float, warmth: PrefixWarmth, now: float,
                   margin_s: float, block_tokens: int, mates: int = 0) -> int:
    """How many leading prefix blocks of ``req`` a sync call sent now would read, when that call (writing the
    rest of its prefix for the next turn) costs less than the batch is expected to; else 0. The batch: its
    price with P(on time) ``p_on_time``, else the sync fallback at list price; reading the warm prefix too if
    it ends before that goes cold (at best: were it sent now). Nothing counts as warm unless it stays so for
    ``margin_s`` more seconds (the call must start before it goes cold). ``mates``: leading blocks an earlier member
    writes for it in the batch it waits for (``BatchMates``), which it reads there in any case."""
    provider = catalog.provider(req.provider)
    pc = provider.cache_of(req.model)
    if pc is None:  # a batch API without a prompt cache (a catalog overlay may declare one)
        return 0
    n, until = warmth.leading(req.provider, req.model, req.prefix_blocks, now + margin_s, exact=not pc.automatic)
    if n * block_tokens < min_cacheable_tokens(provider, provider.models[req.model]):
        return 0  # too little to read (most often the one leading block that every prompt shares)
    warm = price_alone(req, catalog, "sync", warm_blocks=n, write=True, block_tokens=block_tokens).total
    p_read = batch_api.turnaround_cdf(until - now)
    batch = (p_read * price_alone(req, catalog, "batch_api", warm_blocks=max(n, mates), block_tokens=block_tokens).total
             + (1.0 - p_read) * price_alone(req, catalog, "batch_api", warm_blocks=mates,
                                            block_tokens=block_tokens).total)
    cold = price_alone(req, catalog, "sync", block_tokens=block_tokens).total
    return n if warm < p_on_time * batch + (1.0 - p_on_time) * cold else 0


def second_batch_checkpoint(ba, send_at: float, hedge_at: float) -> tuple[float | None, float]:
    """When to cancel a batch sent at ``send_at`` that is not back yet so that its members ride a second batch
    (``second_batch``), and the chance that one of the two is back by ``hedge_at``; (None, P of one batch) when
    a second batch does not raise it by ``_MIN_GAIN`` (``BatchApi.second_batch``). The caller gives no
    checkpoint to that second batch: cancelled again and again at ever earlier checkpoints, members would reach
    sync with time to spare."""
    usable = hedge_at - send_at
    best, p_best = ba.second_batch(usable)
    p_one = ba.turnaround_cdf(usable)
    if best is None or p_best < p_one + _MIN_GAIN:
        return None, p_one
    return send_at + best, p_best


class BatchMates:
    """How many leading prefix blocks a request reads in a batch from the members before it, built member by
    member (``price_batch``: members run in order, and one marks for caching what a later one starts with). A
    trie of the members added: O(blocks) per request, however large the group."""

    __slots__ = ("_root",)

    def __init__(self) -> None:
        self._root: dict = {}

    def shared(self, blocks) -> int:
        node, k = self._root, 0
        for b in blocks:
            node = node.get(b)
            if node is None:
                break
            k += 1
        return k

    def add(self, blocks) -> None:
        node = self._root
        for b in blocks:
            node = node.setdefault(b, {})


def not_worth(p, group, projected: float, c_sync: float, p_on_time: float, hedge_at: float, send_at: float,
          now: float) -> str | None:
    """Why a batch is not worth its wait (None when it is): P(on time) too low, an expected saving too small
    in all or as a share of the price, or less than what its members' wait is worth."""
    if p_on_time < p.min_on_time_p or projected <= 0:
        return f"P(batch done by hedge)={p_on_time:.2f} too low"
    if group.returned:
        return None  # back from a dispatch already judged (with its second batch): its wait is spent
    if projected < p.min_batch_saving_usd:
        return (f"a batch would save ${projected:.4f} expected, under min_batch_saving_usd "
                f"${p.min_batch_saving_usd:g}")
    share = p_on_time * (1.0 - mode_factor(group.provider, "batch_api"))
    if c_sync > 0 and share < p.min_saving_rel:
        return (f"a batch would save {share:.0%} of the list price expected, under min_saving_rel "
                f"{p.min_saving_rel:.0%}")
    if p.wait_usd_per_hour:
        # Expected wait: until it is sent, then the turnaround if on time, else until the hedge.
        to_hedge = max(hedge_at - send_at, 0.0)
        on_time = min(group.provider.batch_api.turnaround_median_s, to_hedge)
        hours = (send_at - now + p_on_time * on_time + (1 - p_on_time) * to_hedge) / 3600
        price = hours * sum(p.wait_usd_per_hour.get(k, 0.0) * n for k, n in group.by_priority.items())
        if price >= projected:
            return f"its wait is worth ${price:.4f}, the batch would save ${projected:.4f} expected"
    return None


def fallback_slot(group, c: TextConsts, hedge_at: float, calls_s: float, k: int, max_out: int, now: float,
                  sent: bool = True, margin_s: float | None = None) -> tuple[float, tuple]:
    """A batch of ``k`` hedged at ``hedge_at`` at the latest, whose fallback calls (of ``max_out`` tokens at most)
    take ``calls_s`` once its cancel is through: its hedge where the calls other batches' fallbacks may need
    leave room for its own (``FallbackCalendar``), and the (start, end, calls, seconds a call) reserved. Asked
    only of a batch ``sent`` now: on every arrival to a group that gathers, it cost seconds on a busy lane. With
    ``margin_s`` (the hedge's margin), the hedge also leaves the rate limits time to start every call
    (``rate_hedge``), and the reservation lasts that much longer."""
    if sent and margin_s is not None:
        moved = hedge_at - rate_hedge(group.members[:k], c, hedge_at, margin_s)
        hedge_at, calls_s = hedge_at - moved, calls_s + moved
    start, call = hedge_at + c.cancel_s, (c.base + c.per_tok * max_out) * c.p99_factor
    end = start + calls_s
    if group.calendar is not None and sent:
        start = group.calendar.latest(group.provider.name, start, end, k, call, c.max_conc, now)
    return start - c.cancel_s, (start, end, k, call)


def flex_fits(provider, spec, req: Request, now: float) -> bool:
    """Whether ``req`` may go at the flex tier now: its model takes it, a flex call at its 99th-percentile latency
    ends within the tier's client timeout, and before its deadline there is room for that call and then a
    standard one (sent if the tier refuses it), so the tier's price never costs a deadline (``flex_room``). Not
    a request whose own body names a tier (``service_tier`` other than ``auto``): it chose its tier, and a live
    engine sends and bills it there, so planned at flex the simulator priced it at batch prices (a review)."""
    if (req.body or {}).get("service_tier") not in (None, "auto"):
        return False
    return req.deadline_at - now >= flex_room(provider, spec, req)


def as_flex(d, group, now: float, members=None):
    """``d`` at the flex tier where it sends sync calls that all fit it (``flex_fits``): the same calls, the same
    prompt cache, at batch prices. A decision to send sync (a deadline too close for a batch, a batch not worth
    its wait, a warm prefix, a hedge's fallback) is a decision to call now, which flex does for less wherever the
    deadline leaves room for a slow call and a standard one after it."""
    if d.action != "dispatch" or d.mode != "sync" or group.spec.kind != "text":
        return d
    members = members if members is not None else group.members[:d.take] if d.take > 0 else group.members
    if not all(flex_fits(group.provider, group.spec, r, now) for r in members):
        return d
    return d._replace(mode="flex", reason=d.reason.replace("sync now", "flex now", 1))


def held_back(req: Request, budget) -> bool:
    """Whether a budget covering ``req`` holds work back while reservations are the model's maximum output:
    a batch member keeps that reserved for the whole turnaround, a sync call for seconds (a flex call for a few
    times that), and the money a batch locks keeps the held work waiting past its deadline (docs/budgets.md,
    "Smart under a budget that binds"). Such a request is sent at once, at arrival or, if it waits in a batch
    lane, at the next decision: at the flex tier where it fits (``flex_fits``; reserved and billed at the flex
    price, so the money a budget holds serves more work; one the tier does not serve reserves the standard price
    before its standard call), else sync."""
    return budget is not None and budget.model_max and bool(budget.holding) and budget.holds(req)
