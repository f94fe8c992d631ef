"""The offline lower bound: with hindsight of everything the simulator draws for a seed, the trace cannot
cost less than this under the catalog while meeting every deadline.

Each step only ever makes a request cheaper than any policy could make it, so the sum is a true bound
(docs/lower-bound.md gives the argument step by step):

1. *Unservable*: a request whose every allowed attempt fails (``Draws.fail_u``) is never billed, by any
   policy; it costs 0.
2. *Reuse*: among requests with the same fingerprint, the first servable one pays; every later one that
   allows reuse is free. A ``near`` request is free when an earlier request of the same tenant and
   compatibility class clears the simulator's near floor (``settings.sim.near_floor``) and every guard, the
   most any policy may be granted.
3. *Batch API*: a request gets the discount iff some submission time ``s`` in ``[arrival, deadline]`` has
   ``s + turnaround(slot(s)) <= deadline`` under the seed's drawn turnarounds (a relaxed deadline of
   infinity always qualifies).
4. *Prompt cache*: every cacheable prefix token is billed at the cheapest read price the request can get;
   on top, each (provider, model, block) pays one write per *cluster* of holders whose windows
   ``[arrival, deadline + ttl]`` chain together (the cache must be written at least once in each period
   it can stay warm): the cheapest holder's write, unless every holder sending it plain costs less (nobody
   writes it, so nobody reads it).
5. *GPU batching*: a job's share is ``price * (setup / b + unit / speedup(b))`` with ``b`` the largest
   number of compatible paying jobs whose windows contain one common instant (Helly: a batch's members all
   start together), capped at ``max_batch``; the share falls with ``b``, so this is the least it can pay.
6. Rate limits, latency, concurrency and cache granularity are ignored: each only adds cost or time.

``relax`` marks requests whose deadline is treated as infinite: a policy that misses a deadline may use a
cheaper mode than a deadline-respecting schedule could, so its cost is compared with the bound relaxed for
the requests it missed. ``unserved`` marks requests a run never served (a budget rejected them; they billed
nothing): the bound prices them as it prices a request whose every attempt fails, at 0, writing nothing.

``online=True`` gives the *online bound*: step 3 without hindsight of the turnaround draws. No online policy
knows whether a batch will be on time, only the turnaround distribution; at best it submits at arrival, cancels
the batch at the best checkpoint if it is still out and sends a second one with the time left, and is on time
with ``p = BatchApi.second_batch(deadline - arrival)``, paying the batch price with probability ``p`` and the
sync price otherwise. Every other step keeps its hindsight (a prompt-cache write is priced at the cheapest
lane), so this stays below what any online policy that makes at most two batch attempts per request pays in
expectation (smart's members can ride a third batch after a batch mate's earlier hedge: docs/lower-bound.md).
In expectation over the draws it lies above the offline bound; one seed's offline bound can exceed it where
batches matter little (docs/lower-bound.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engine.core.catalog import Catalog, default_catalog
from engine.core.cost import (
    cache_read_multiplier,
    gpu_share_price,
    gpu_unit_seconds,
    min_cacheable_tokens,
    mode_factor,
    price_alone,
    token_prices,
)
from engine.core.draws import Draws, TurnaroundWorld
from engine.core.features import compat_key, fingerprint, near_class, near_text, near_vectors
from engine.core.request import Request
from engine.core.settings import Settings, load_settings
from engine.core.similarity import guard_reason
from engine.core.trace import with_day_origin

__all__ = ["LowerBound", "batch_eligible", "lower_bound"]


@dataclass(frozen=True)
class LowerBound:
    total_usd: float
    per_request_usd: np.ndarray
    cache_write_usd: float
    unservable: int
    exact_free: int
    near_free: int
    batch_eligible: int

    def as_dict(self) -> dict:
        return {"lower_bound_usd": round(self.total_usd, 6), "cache_write_usd": round(self.cache_write_usd, 6),
                "unservable": self.unservable, "exact_free": self.exact_free, "near_free": self.near_free,
                "batch_eligible": self.batch_eligible}


def batch_eligible(arrival: np.ndarray, deadline_at: np.ndarray, slot_t: np.ndarray, slot_s: float) -> np.ndarray:
    """Whether a batch submitted in ``[arrival, deadline]`` can finish by the deadline, per request."""
    k = np.arange(slot_t.size)
    finish = k * slot_s + slot_t  # best finish of a batch submitted at the start of slot k
    sufmin = np.minimum.accumulate(finish[::-1])[::-1]
    sufmin = np.append(sufmin, np.inf)
    k0 = np.minimum((arrival // slot_s).astype(np.int64), slot_t.size - 1)
    first = arrival + slot_t[k0] <= deadline_at
    later = sufmin[k0 + 1] <= deadline_at
    return first | later | np.isinf(deadline_at)


def _near_free(reqs: Sequence[Request], candidates: list[int], settings: Settings) -> set[int]:
    """Near requests with an earlier admissible source (same tenant and compat class)."""
    if not candidates:
        return set()
    classes: dict[tuple, list[int]] = {}
    for i, r in enumerate(reqs):
        classes.setdefault(near_class(r, r.tenant), []).append(i)
    cand = set(candidates)
    free: set[int] = set()
    floor = settings.sim.near_floor
    for members in classes.values():
        targets = [i for i in members if i in cand]
        if not targets:
            continue
        mat = near_vectors([reqs[i] for i in members])
        pos = {i: p for p, i in enumerate(members)}
        for i in targets:
            p = pos[i]
            if p == 0:
                continue
            sims = mat[:p] @ mat[p]
            for q in np.flatnonzero(sims >= floor)[np.argsort(-sims[sims >= floor])]:
                if guard_reason(near_text(reqs[i]), near_text(reqs[members[q]])) is None:
                    free.add(i)
                    break
    return free


def _max_overlap(a: np.ndarray, d: np.ndarray) -> np.ndarray:
    """For each window i, the most windows that contain one instant inside window i."""
    order = np.argsort(a, kind="stable")
    a_s = a[order]
    d_sorted = np.sort(d)
    # Coverage just at each a_j: windows started by then minus windows already ended before it.
    cov = np.searchsorted(a_s, a_s, side="right") - np.searchsorted(d_sorted, a_s, side="left")
    out = np.empty(a.size, dtype=np.int64)
    hi = np.searchsorted(a_s, d, side="right")
    lo = np.searchsorted(a_s, a, side="left")
    for i in range(a.size):
        out[i] = cov[lo[i]:hi[i]].max() if hi[i] > lo[i] else 1
    return out


def _cluster_writes(holders: list[tuple[float, float, float, float]]) -> float:
    """What the holders of one block pay above their read price, at least: per cluster of chained windows
    ``[arrival, end]``, either someone writes the block (the cheapest holder's ``write_extra``), or nobody does,
    so nobody reads it and every holder sends it plain (the sum of their ``plain_extra``)."""
    holders.sort()
    total, end = 0.0, -np.inf
    w_min, p_sum, open_ = np.inf, 0.0, False
    for a, e, w, p in holders:
        if open_ and a > end:  # this window starts after every earlier one ended: a new cluster
            total += min(w_min, p_sum)
            w_min, p_sum = np.inf, 0.0
        w_min, p_sum, end, open_ = min(w_min, w), p_sum + p, max(end, e), True
    return total + (min(w_min, p_sum) if open_ else 0.0)


def _shared_blocks(reqs: Sequence[Request], unserv: np.ndarray, catalog: Catalog) -> set[tuple]:
    """The (provider, model, block) that at least two servable requests hold: the only blocks any request can
    read, since a block nobody else holds is never written before the one request that holds it is sent. A
    request that fails every attempt writes nothing; one the bound counts free by reuse may still be sent by a
    policy that does not reuse, and write (``_optional_writer``)."""
    seen: set[tuple] = set()
    shared: set[tuple] = set()
    for i, r in enumerate(reqs):
        if unserv[i] or not r.prefix_blocks or catalog.providers[r.provider].cache_of(r.model) is None:
            continue
        for b in r.prefix_blocks:
            key = (r.provider, r.model, b)
            (shared if key in seen else seen).add(key)
    return shared


def _optional_writer(r: Request, catalog: Catalog, p: float, bt: int, arrival: float, deadline: float,
                     write_holders: dict) -> None:
    """A request the bound counts free by reuse can still be sent, by a policy that does not reuse, and write
    blocks others read: it joins its blocks' clusters as a writer at its whole write price (the bound charges
    it nothing else) and reads nothing."""
    prov = catalog.providers[r.provider]
    spec = prov.models[r.model]
    pc = prov.cache_of(spec)
    if pc is None or spec.kind != "text" or spec.gpu_priced or not r.prefix_blocks:
        return
    prefix = min(len(r.prefix_blocks) * bt, r.input_tokens)
    if prefix < max(min_cacheable_tokens(prov, spec), 1):
        return
    p_in, _ = token_prices(spec, r.input_tokens)
    fw = mode_factor(prov, "batch_api") if p > 0 and pc.stacks_with_batch else 1.0  # its cheapest write lane
    fw = min(fw, mode_factor(prov, "flex") if prov.supports_flex(r.model) else 1.0)
    write = p_in * pc.write_multiplier * fw
    for k, b in enumerate(r.prefix_blocks):
        tok = min(bt, prefix - k * bt)
        if tok <= 0:
            break
        write_holders.setdefault((r.provider, r.model, b), []).append(
            (arrival, deadline + pc.ttl_s, write * tok, 0.0))


def _readable(r: Request, prov, spec, prefix: int, shared: set[tuple], bt: int) -> int:
    """The most prefix tokens ``r`` can read from the provider's cache: a read is the leading run of blocks
    others also hold, cut to the cache's granularity, and none at all under the model's minimum (the
    provider's rules, which the simulator applies to every read: ``engine.core.cost.cache_split``)."""
    run = 0
    for b in r.prefix_blocks:
        if (r.provider, r.model, b) not in shared:
            break
        run += 1
    readable = min(run * bt, prefix)
    readable -= readable % max(prov.cache_of(spec).block_tokens, 1)
    return readable if readable >= max(min_cacheable_tokens(prov, spec), 1) else 0


def lower_bound(requests: Sequence[Request], *, catalog: Catalog | None = None, settings: Settings | None = None,
                seed: int | None = None, draws: Draws | None = None,
                relax: np.ndarray | None = None, online: bool = False,
                unserved: np.ndarray | None = None) -> LowerBound:
    settings = with_day_origin(settings or load_settings(), requests)  # the world's hours, as the simulator's
    catalog = catalog or default_catalog()
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    n = len(reqs)
    seed = settings.sim.seed if seed is None else seed
    draws = draws or Draws(n, settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    bt = settings.prefix_block_tokens
    arrival = np.array([r.arrival_s for r in reqs], dtype=np.float64)
    deadline = np.array([r.deadline_at for r in reqs], dtype=np.float64)
    if relax is not None:
        deadline = np.where(relax, np.inf, deadline)
    providers = [r.provider for r in reqs]
    per = np.zeros(n)
    failing = draws.attempts_all_fail(catalog, providers) if n else np.zeros(0, bool)
    unserv = failing | unserved if unserved is not None else failing

    # 2. reuse
    free = unserv.copy()
    payer: dict[str, int] = {}
    exact_free = 0
    for i, r in enumerate(reqs):
        if unserv[i]:
            continue
        fp = fingerprint(r, share_across_tenants=settings.cache.share_across_tenants)
        if fp in payer:
            if r.reuse != "none":
                free[i] = True
                exact_free += 1
        else:
            payer[fp] = i
    near = _near_free(reqs, [i for i, r in enumerate(reqs) if r.reuse == "near" and not free[i]], settings)
    for i in near:
        free[i] = True

    # 3. batch API eligibility, per provider: p_batch is the probability the discount is had (0 or 1 offline)
    p_batch = np.zeros(n)
    world = TurnaroundWorld.of(settings.sim)
    horizon = float(np.max(np.where(np.isinf(deadline), arrival, deadline))) if n else 0.0
    for pname, prov in catalog.providers.items():
        if prov.batch_api is None:
            continue
        idx = np.flatnonzero([(p == pname and prov.supports_batch_api(reqs[i].kind, reqs[i].model))
                              for i, p in enumerate(providers)])
        if not idx.size:
            continue
        if online:
            # The distribution the world draws from (the catalog's, scaled by the simulated world)
            # A second batch, cancelled at the best checkpoint, is the best an online policy does here: the
            # chance one of two is back in time (at most 2 batches, as smart tries: ``BatchApi.second_batch``).
            two, f = prov.batch_api.second_batch, world.factor
            p_batch[idx] = [1.0 if np.isinf(deadline[i]) else two((deadline[i] - arrival[i]) / f(arrival[i]))[1]
                            for i in idx]
        else:
            slot_t = draws.slot_turnarounds(pname, prov.batch_api, horizon + 1.0, world)
            p_batch[idx] = batch_eligible(arrival[idx], deadline[idx], slot_t, draws.slot_s)
    elig = p_batch >= 1.0

    # 4-5. price every paying request at its cheapest
    shared = _shared_blocks(reqs, unserv, catalog)
    write_holders: dict[tuple, list[tuple[float, float, float]]] = {}
    gpu_classes: dict[tuple, list[tuple[int, bool]]] = {}  # (request, whether it pays)
    for i, r in enumerate(reqs):
        if failing[i] and catalog.providers[r.provider].models[r.model].gpu_priced:
            # Its attempts fail, billed nothing, yet each rides a GPU batch and shrinks its mates' shares
            # (a hunt: two flux jobs, one failing, the other paid $0.006969 against a bound of $0.013164).
            gpu_classes.setdefault(compat_key(r), []).append((i, False))
        if free[i]:
            if not unserv[i]:
                _optional_writer(r, catalog, p_batch[i], bt, arrival[i], deadline[i], write_holders)
            continue
        prov = catalog.providers[r.provider]
        spec = prov.models[r.model]
        p = p_batch[i]
        # (probability, price factor, whether the prompt cache stacks) of the lanes it pays: batch with p, else a
        # call, at the flex tier where its model takes it (the bound lets a flex call through however often
        # the tier refuses: a policy may ask again while its deadline allows)
        call = mode_factor(prov, "flex") if prov.supports_flex(r.model) else 1.0
        stacks = (pc0 := prov.cache_of(spec)) is None or pc0.stacks_with_batch
        lanes = [(w, f, st) for w, f, st in ((p, mode_factor(prov, "batch_api"), stacks), (1.0 - p, call, True))
                 if w > 0]
        if spec.kind != "text":
            if spec.gpu_priced:
                gpu_classes.setdefault(compat_key(r), []).append((i, True))
            else:
                per[i] = sum(w * f for w, f, _ in lanes) * price_alone(r, catalog, "sync").total
            continue
        p_in, p_out = token_prices(spec, r.input_tokens)
        pc = prov.cache_of(spec)
        prefix = min(len(r.prefix_blocks) * bt, r.input_tokens)
        if pc is None or prefix == 0 or prefix < max(min_cacheable_tokens(prov, spec), 1):
            per[i] = sum(w * f for w, f, _ in lanes) * (p_in * r.input_tokens + p_out * r.output_tokens)
            continue
        rm = cache_read_multiplier(prov, spec)
        readable = _readable(r, prov, spec, prefix, shared, bt)
        write_extra, plain_extra, write_over_plain = np.inf, np.inf, np.inf
        for w, f, stacks in lanes:
            rc = f * rm if stacks else min(f, rm)
            per[i] += w * (f * p_in * (r.input_tokens - readable) + rc * p_in * readable
                           + f * p_out * r.output_tokens)
            # Above its read price, a holder pays ``plain_extra`` for a block sent uncached, ``write_extra`` for
            # writing it (in a lane where the cache applies: sync, or the batch lane if the cache stacks). Both
            # at the cheapest lane, so a cluster's minimum stays below the expected minimum. Tokens it cannot
            # read it already pays plain, and writing them costs ``write_over_plain`` more.
            plain_extra = min(plain_extra, p_in * (f - rc))
            fw = f if stacks else 1.0
            write_extra = min(write_extra, p_in * (pc.write_multiplier * fw - rc))
            write_over_plain = min(write_over_plain, p_in * (pc.write_multiplier * fw - f))
        for k, b in enumerate(r.prefix_blocks):
            tok = min(bt, prefix - k * bt)
            if tok <= 0:
                break
            read = min(max(readable - k * bt, 0), tok)
            write_holders.setdefault((r.provider, r.model, b), []).append(
                (arrival[i], deadline[i] + pc.ttl_s, write_extra * read + write_over_plain * (tok - read),
                 plain_extra * read))
    write_total = sum(_cluster_writes(holders) for holders in write_holders.values())
    for key, jobs in gpu_classes.items():
        r0 = reqs[jobs[0][0]]
        prov = catalog.providers[r0.provider]
        spec = prov.models[r0.model]
        gb = prov.gpu_batching
        ix = np.array([i for i, _ in jobs])
        b = np.minimum(_max_overlap(arrival[ix], deadline[ix]), gb.max_batch)
        for j, (i, pays) in enumerate(jobs):
            if pays:
                per[i] = gpu_share_price(prov, gpu_unit_seconds(spec, reqs[i].params), int(b[j]))
    total = float(per.sum() + write_total)
    return LowerBound(total, per, write_total, int(unserv.sum()), exact_free, len(near), int(elig.sum()))
