"""Prometheus metrics of a running engine (prefix ``smartbatch_``), kept in the hub actor's own registry and
served on one port from there."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from engine.core._logkeys import get_logger
from engine.core.result import Result

__all__ = ["OTHER_TENANT", "DispatchCounts", "EngineMetrics", "TenantLabels", "rejected_reason", "retry_reason"]

_SECONDS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600)
_HTTP_5XX = re.compile(r"\b5(\d\d|xx)\b")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,39}")
OTHER_TENANT = "_other"  # the label value of every tenant past the cap
_TENANT_CHARS = 256  # as long as a request's tenant may be (engine.core.request)
# A lone surrogate cannot be encoded as UTF-8 (prometheus-client then fails the whole scrape); a control
# character garbles whoever reads the page raw. Requests refuse both; a result is not checked again.
_UNWRITABLE = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

log = get_logger("smartbatch.metrics")


def retry_reason(retry_after_s: float | None, error: str | None) -> str:
    """The ``reason`` label of a failed call: ``429``, ``5xx``, ``timeout`` or ``other``. A Retry-After or a
    429 in the message is a rate limit; the providers' messages say ``HTTP 503``, ``5xx`` or ``timed out``."""
    e = error or ""
    if retry_after_s is not None or re.search(r"\b429\b", e):
        return "429"
    if _HTTP_5XX.search(e):
        return "5xx"
    if "timed out" in e or "timeout" in e.lower():
        return "timeout"
    return "other"


def rejected_reason(res: Result) -> str:
    """A rejected result's reason, as a bounded label: the grouper's fixed reasons (``budget_exhausted``,
    ``budget_unavailable``); anything free-form counts as "other"."""
    return res.error if res.error and _REASON.fullmatch(res.error) else "other"


class DispatchCounts:
    """What one dispatcher saw since its last flush, sent to the hub with its ``observe_dispatches`` message
    (never one actor call per request). Plain dicts and lists, so it pickles cheaply."""

    def __init__(self) -> None:
        self.retries: dict[str, int] = {}  # reason -> retried calls
        self.http_429 = 0
        self.deadline_missed: dict[str, int] = {}  # priority -> requests
        self.breaker_open: dict[str, int] = {}  # model -> 0/1, only what changed
        self.breaker_openings: dict[str, int] = {}  # model -> openings
        self.hedged_batches = 0
        self.hedge_kept_members = 0
        self.paid_twice_members = 0
        self.paid_twice_usd = 0.0
        self.turnaround_s: list[float] = []
        self.rate_limit_wait_s: dict[str, list[float]] = {}  # mode -> engine seconds queued at the gate
        self.flex_refused = 0  # flex calls sent again standard: refused for want of capacity (billed nothing)
        self.flex_timed_out = 0  # ... or given up at their timeout (maybe billed)

    def __repr__(self) -> str:
        return f"DispatchCounts({self.as_dict()})"

    def failed(self, reason: str, retried: bool) -> None:
        if reason == "429":
            self.http_429 += 1
        if retried:
            self.retries[reason] = self.retries.get(reason, 0) + 1

    def as_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if v}

    def __bool__(self) -> bool:
        return any(vars(self).values())


class TenantLabels:
    """The ``tenant`` label value of each tenant: its own name (made writable) for the first ``max_tenants``
    tenants seen, ``_other`` for every later one. Callers name tenants freely, and each value is a series the
    registry keeps for its life and sends at every scrape: the cap bounds both, as the catalog bounds models.
    Tenants past the cap are not remembered (that would grow too); the log says once that the cap was reached."""

    def __init__(self, max_tenants: int = 100) -> None:
        self.max_tenants = max_tenants
        self._values: dict[str, str] = {}  # tenant -> its label value, for the tenants under the cap
        self._said = False

    def __repr__(self) -> str:
        return f"TenantLabels(kept={len(self._values)}, max_tenants={self.max_tenants}, full={self._said})"

    def __call__(self, tenant: str) -> str:
        value = self._values.get(tenant)
        if value is not None:
            return value
        if len(self._values) < self.max_tenants:
            value = self._values[tenant] = _UNWRITABLE.sub("\ufffd", tenant[:_TENANT_CHARS])
            return value
        if not self._said:
            self._said = True
            if self.max_tenants:  # 0 was asked for: every tenant under _other, nothing to say
                log.warning("metrics: %d tenants have a label value of their own (metrics.max_tenants); every later "
                            "tenant is counted under tenant=\"%s\" on this hub's metrics page (report() and `smartbatch "
                            "status` still show each). Raise SMARTBATCH_METRICS__MAX_TENANTS to see more",
                            self.max_tenants, OTHER_TENANT)
        return OTHER_TENANT


class EngineMetrics:
    def __init__(self, max_tenants: int = 100) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # By tenant, as report()'s by_tenant counts them: a spend dashboard shows requests beside cost.
        self.tenant = TenantLabels(max_tenants)
        self.requests = Counter("smartbatch_requests", "Requests resolved, by outcome and tenant",
                                ["outcome", "tenant"], registry=r)
        # By model and tenant, so spend per model or tenant can be watched and alerted on: the catalog bounds
        # the models, ``metrics.max_tenants`` the tenants (TenantLabels).
        self.cost = Counter("smartbatch_cost_usd", "Billed cost in USD", ["provider", "model", "mode", "tenant"],
                            registry=r)
        # A request may cost more than its list price (a cache write), which a counter cannot take back: the
        # report's saving is list_price - cost, summed; saving_usd sums each request's gain, never below 0.
        self.list_price = Counter("smartbatch_list_price_usd", "List price of served requests (each alone, sync, "
                                  "no cache read), USD", ["provider"], registry=r)
        self.saving = Counter("smartbatch_saving_usd", "List price minus billed cost per served request, USD, "
                              "never below 0", ["provider"], registry=r)
        self.hits = Counter("smartbatch_cache_hits", "Requests served without a provider call", ["kind"],
                            registry=r)
        self.batch_size = Histogram("smartbatch_batch_size", "Requests per dispatch", ["provider", "mode"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384),
                                    registry=r)
        self.queue = Gauge("smartbatch_queue_depth", "Requests in flight at a provider's dispatcher", ["provider"],
                           registry=r)
        self.dispatch_s = Histogram("smartbatch_dispatch_seconds", "Engine seconds from arrival to dispatch",
                                    ["provider"], buckets=_SECONDS, registry=r)
        self.e2e_s = Histogram("smartbatch_end_to_end_seconds", "Engine seconds from arrival to result",
                               ["provider"], buckets=_SECONDS, registry=r)
        self.budget_limit = Gauge("smartbatch_budget_limit_usd", "Hard limit of each budget (max_budget)",
                                  ["budget"], registry=r)
        # Exported for the budgets that have one, so an alert compares spend with it (spent_usd > soft_limit_usd).
        self.budget_soft = Gauge("smartbatch_budget_soft_limit_usd", "Soft limit of each budget that has one "
                                 "(soft_budget: an alert above it, nothing refused)", ["budget"], registry=r)
        self.budget_spent = Gauge("smartbatch_budget_spent_usd", "Settled spend in each budget's current window",
                                  ["budget"], registry=r)
        self.budget_reserved = Gauge("smartbatch_budget_reserved_usd", "Open reservations in each budget's "
                                     "current window", ["budget"], registry=r)
        self.budget_remaining = Gauge("smartbatch_budget_remaining_usd", "Limit minus spend and open "
                                      "reservations, per budget", ["budget"], registry=r)
        self.budget_refusals = Counter("smartbatch_budget_refusals", "Reservations refused, by reason (wait, "
                                       "deferred, budget_exhausted, budget_unavailable)", ["reason"], registry=r)
        self._refusals_seen: dict[str, int] = {}
        self._budgets_shown: set[str] = set()  # budgets whose gauges the page shows
        self.cache_lookups = Counter("smartbatch_cache_lookups", "Cache lookups by result (exact_memory, "
                                     "exact_redis, near, in_flight, miss; released: in-flight followers "
                                     "sent on their own at their release time)", ["result"], registry=r)
        # Registered on the cache's first report with Redis configured: without Redis it would read 0 and fire
        # a "Redis down" alert for a cache that never had one.
        self.cache_redis_up = Gauge("smartbatch_cache_redis_up", "1 while the cache reaches Redis, 0 while it "
                                    "serves from memory only (exported only when Redis is configured)",
                                    registry=None)
        self._redis_up_registered = False
        self.cache_redis_errors = Counter("smartbatch_cache_redis_errors", "Failed Redis operations", registry=r)
        self.cache_corrupt = Counter("smartbatch_cache_corrupt_values", "Values under our keys that were not "
                                     "valid entries (ignored, never served)", registry=r)
        self.cache_evictions = Counter("smartbatch_cache_evictions", "Entries dropped from memory by size or "
                                       "TTL (why=near_evicted: rows of the near-duplicate index)", ["why"],
                                       registry=r)
        self.cache_entries = Gauge("smartbatch_cache_entries", "Entries held in this process", ["layer"],
                                   registry=r)
        # Reliability (issue 14): every name carries its unit (seconds, usd, or the thing counted).
        self.deadline_missed = Counter("smartbatch_deadline_missed_requests", "Requests a provider answered "
                                       "after their deadline or that failed, by provider and priority",
                                       ["provider", "priority"], registry=r)
        self.retries = Counter("smartbatch_retried_calls", "Failed calls or batch members sent again, by reason "
                               "(429, 5xx, timeout, other)", ["provider", "reason"], registry=r)
        self.http_429 = Counter("smartbatch_http_429_responses", "Rate-limit answers (429) received",
                                ["provider"], registry=r)
        self.breaker_open = Gauge("smartbatch_circuit_breaker_open_bool", "1 while a model's circuit is open "
                                  "(its work goes to the fallback or waits), else 0", ["provider", "model"],
                                  registry=r)
        self.breaker_openings = Counter("smartbatch_circuit_breaker_openings", "Times a model's circuit opened",
                                        ["provider", "model"], registry=r)
        self.hedged_batches = Counter("smartbatch_hedge_cancelled_batches", "Provider batches cancelled at "
                                      "their hedge time", ["provider"], registry=r)
        self.hedge_kept = Counter("smartbatch_hedge_kept_members", "Finished members of batches cancelled at "
                                  "their hedge time, used (billed once, never sent again)", ["provider"], registry=r)
        self.paid_twice = Counter("smartbatch_paid_twice_members", "Members a too-slow cancel still finished "
                                  "after they were sent again", ["provider"], registry=r)
        self.paid_twice_usd = Counter("smartbatch_paid_twice_usd", "What those members cost a second time, USD",
                                      ["provider"], registry=r)
        self.turnaround_s = Histogram("smartbatch_batch_turnaround_seconds", "Engine seconds from a provider "
                                      "batch's submission to its end (done, cancelled or given up)",
                                      ["provider"], buckets=_SECONDS, registry=r)
        self.rate_limit_wait_s = Histogram("smartbatch_rate_limit_wait_seconds", "Engine seconds requests "
                                           "waited at a provider's rate gate before they started", ["provider", "mode"],
                                           buckets=(0,) + _SECONDS, registry=r)
        self.rejected = Counter("smartbatch_rejected_requests", "Requests rejected, by reason "
                                "(budget_exhausted, budget_unavailable, other)", ["reason"], registry=r)
        # Not failures and not rate limits (no try spent, no 429 counted): flex calls the tier did not serve, each
        # sent again at the standard tier. A rising rate says flex saves less than smart expects.
        self.flex_refused = Counter("smartbatch_flex_refused_calls", "Flex calls (service_tier: flex) refused for "
                                    "want of capacity, billed nothing, each sent again standard", ["provider"],
                                    registry=r)
        self.flex_timed_out = Counter("smartbatch_flex_timed_out_calls", "Flex calls given up at their timeout "
                                      "(maybe billed: possibly_billed), each sent again standard", ["provider"],
                                      registry=r)
        self.port: int | None = None

    def serve(self, port: int = 0, addr: str = "127.0.0.1") -> int:
        """Serve /metrics; port 0 picks a free port. Returns the port."""
        if self.port is None:
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            self.port = server.server_port
        return self.port

    def observe_results(self, results: list[Result], list_prices: list[float] | None) -> None:
        # Sum per batch first: prometheus-client's labels() lookup costs more than the arithmetic, and the
        # hub sees every result (a profile of 20,000 requests showed 127,000 lookups before this).
        outcomes: dict[tuple[str, str], int] = {}
        cost: dict[tuple[str, str, str, str], float] = {}
        saving: dict[str, float] = {}
        listed: dict[str, float] = {}
        hits: dict[str, int] = {}
        e2e: dict[str, list[float]] = {}
        rejected: dict[str, int] = {}
        tenant_of = self.tenant
        for k, res in enumerate(results):
            tenant = tenant_of(res.tenant)
            outcomes[res.status, tenant] = outcomes.get((res.status, tenant), 0) + 1
            if res.status == "rejected":
                why = rejected_reason(res)
                rejected[why] = rejected.get(why, 0) + 1
            prov = res.provider or "unknown"
            if res.cost_usd:
                key = (prov, res.model or "unknown", res.mode or "none", tenant)
                cost[key] = cost.get(key, 0.0) + res.cost_usd
            if list_prices and res.status in ("ok", "reused"):
                saving[prov] = saving.get(prov, 0.0) + max(list_prices[k] - res.cost_usd, 0.0)
                listed[prov] = listed.get(prov, 0.0) + list_prices[k]
            if res.hit:
                hits[res.hit] = hits.get(res.hit, 0) + 1
            if res.done_s is not None:
                e2e.setdefault(prov, []).append(max(res.done_s - res.arrival_s, 0.0))
        for (status, tenant), n in outcomes.items():
            self.requests.labels(status, tenant).inc(n)
        for (prov, model, mode, tenant), usd in cost.items():
            self.cost.labels(prov, model, mode, tenant).inc(usd)
        for prov, usd in saving.items():
            self.saving.labels(prov).inc(usd)
        for prov, usd in listed.items():
            self.list_price.labels(prov).inc(usd)
        for kind, n in hits.items():
            self.hits.labels(kind).inc(n)
        for why, n in rejected.items():
            self.rejected.labels(why).inc(n)
        for prov, values in e2e.items():
            _observe_all(self.e2e_s.labels(prov), values)

    def observe_dispatch(self, provider: str, mode: str, waits: list[float], in_flight: int) -> None:
        self.observe_dispatches(provider, [(mode, waits, in_flight)])

    def observe_dispatches(self, provider: str, observed: list[tuple[str, list[float], int]]) -> None:
        """A dispatcher's message of dispatches (mode, each member's wait, in flight after it), observed per mode
        in one step: a sync call is a dispatch of one, so a message holds one per request, and one at a time
        each cost the hub three label lookups and a histogram step, 17-21 us (docs/benchmarks.md, stop 82)."""
        import numpy as np
        if not observed:
            return
        sizes: dict[str, list[int]] = {}
        waits: list[float] = []
        for mode, w, _ in observed:
            sizes.setdefault(mode, []).append(len(w))
            waits.extend(w)
        for mode, counts in sizes.items():
            _observe_all(self.batch_size.labels(provider, mode), counts)
        _observe_all(self.dispatch_s.labels(provider), np.maximum(waits, 0.0))
        self.queue.labels(provider).set(observed[-1][2])  # the last one's, as one at a time set it

    def observe_counts(self, provider: str, c: dict) -> None:
        """A dispatcher's ``DispatchCounts.as_dict()`` since its last flush."""
        import numpy as np
        for reason, n in c.get("retries", {}).items():
            self.retries.labels(provider, reason).inc(n)
        if c.get("http_429"):
            self.http_429.labels(provider).inc(c["http_429"])
        for prio, n in c.get("deadline_missed", {}).items():
            self.deadline_missed.labels(provider, prio).inc(n)
        for model, state in c.get("breaker_open", {}).items():
            self.breaker_open.labels(provider, model).set(state)
        for model, n in c.get("breaker_openings", {}).items():
            self.breaker_openings.labels(provider, model).inc(n)
        for key, counter in (("hedged_batches", self.hedged_batches), ("hedge_kept_members", self.hedge_kept),
                             ("paid_twice_members", self.paid_twice), ("paid_twice_usd", self.paid_twice_usd),
                             ("flex_refused", self.flex_refused), ("flex_timed_out", self.flex_timed_out)):
            if c.get(key):
                counter.labels(provider).inc(c[key])
        if c.get("turnaround_s"):
            _observe_all(self.turnaround_s.labels(provider), np.maximum(c["turnaround_s"], 0.0))
        for mode, waits in c.get("rate_limit_wait_s", {}).items():
            _observe_all(self.rate_limit_wait_s.labels(provider, mode), np.maximum(waits, 0.0))

    def observe_budget(self, rows: list[dict] | None, refusals: dict[str, int]) -> None:
        """``rows``: each budget in force, its current window; None when the ledger could not be read (the
        gauges stay as they were). A budget removed, or its soft limit, leaves the page: its last figures kept
        a removed budget's remaining, and an alert on it, for the rest of the run (a hunt)."""
        if rows is not None:
            names = {r["budget"] for r in rows}
            gauges = (self.budget_limit, self.budget_soft, self.budget_spent, self.budget_reserved,
                      self.budget_remaining)
            for b in self._budgets_shown - names:
                for g in gauges:
                    g.remove(b)
            self._budgets_shown = names
        for row in rows or ():
            b = row["budget"]
            self.budget_limit.labels(b).set(row["max_budget"])
            if row.get("soft_budget") is not None:
                self.budget_soft.labels(b).set(row["soft_budget"])
            else:
                self.budget_soft.remove(b)
            self.budget_spent.labels(b).set(row["spent_usd"])
            self.budget_reserved.labels(b).set(row["reserved_usd"])
            self.budget_remaining.labels(b).set(row["remaining_usd"])
        for reason, n in refusals.items():  # totals arrive; the counter takes what is new
            new = n - self._refusals_seen.get(reason, 0)
            if new > 0:
                self.budget_refusals.labels(reason).inc(new)
                self._refusals_seen[reason] = n

    def observe_cache(self, delta: dict, now: dict) -> None:
        for k in ("exact_memory", "exact_redis", "near", "in_flight", "miss", "released"):
            if delta.get(k):
                self.cache_lookups.labels(k).inc(delta[k])
        if delta.get("redis_errors"):
            self.cache_redis_errors.inc(delta["redis_errors"])
        if delta.get("corrupt"):
            self.cache_corrupt.inc(delta["corrupt"])
        for why in ("evicted", "expired", "near_evicted"):
            if delta.get(why):
                self.cache_evictions.labels(why).inc(delta[why])
        if "redis_up" in now:  # only a cache with Redis configured reports it
            if not self._redis_up_registered:
                self.registry.register(self.cache_redis_up)
                self._redis_up_registered = True
            self.cache_redis_up.set(now["redis_up"])
        self.cache_entries.labels("memory").set(now.get("memory_entries", 0))
        self.cache_entries.labels("near_index").set(now.get("near_entries", 0))


def _observe_all(child, values) -> None:
    """``child.observe(v)`` for every value of ``values``, in one step: the hub observes a few values for each
    request of the engine, and one ``observe`` costs a lock and a scan of the bounds. Counts per bucket and the
    sum go in as prometheus-client's own ``observe`` would put them (``amount <= bound``, first bound wins);
    a client whose histogram lacks those parts is fed one value at a time."""
    # numpy here, not at import: every engine actor imports this module (Ray loads the class of each peer's
    # handle it is given), and only the hub observes.
    import numpy as np

    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    v = np.asarray(values, dtype=float)
    if not v.size:
        return
    total.inc(float(v.sum()))
    for k, n in enumerate(np.bincount(np.searchsorted(bounds, v, side="left"), minlength=len(bounds))):
        if n and k < len(buckets):  # a NaN sorts past +Inf; observe() counts it in no bucket either
            buckets[k].inc(int(n))
