"""The Grafana dashboard uses only metrics the engine exports, and the reliability metrics carry their units."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from actors.metrics import DispatchCounts, EngineMetrics, retry_reason
from engine.core.result import Result

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana" / "smartbatch.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset", "and", "or",
             "unless", "inf", "nan"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names of a PromQL expression: identifiers that are not functions, keywords, label names of
    ``by``/``without``/``on``/``ignoring`` clauses or matchers, durations or numbers."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals (label values)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(word)
    return names


def exported_names(metrics: EngineMetrics) -> set[str]:
    names = set()
    for fam in metrics.registry.collect():
        for suffix in _SUFFIXES.get(fam.type, ("",)):
            names.add(fam.name + suffix)
    return names


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", []) if t.get("expr")]


def test_the_parser_finds_metric_names_and_skips_the_rest():
    expr = ('histogram_quantile(0.95, sum by (provider, le) (rate(smartbatch_x_seconds_bucket{mode="sync"}[5m])))'
            ' / on (provider) group_left smartbatch_y_usd * 3600')
    assert promql_metric_names(expr) == {"smartbatch_x_seconds_bucket", "smartbatch_y_usd"}


def test_every_metric_of_the_dashboard_exists():
    metrics = EngineMetrics()
    metrics.observe_cache({}, {"redis_up": 1})  # registered only once a cache with Redis reports
    known = exported_names(metrics)
    exprs = dashboard_exprs()
    assert len(exprs) >= 16
    used = set()
    for e in exprs:
        names = promql_metric_names(e)
        assert names, f"no metric in {e!r}"
        used |= names
    missing = sorted(used - known)
    assert not missing, f"the dashboard uses metrics the engine does not export: {missing}"
    # The dashboard covers what operators alert on.
    for needed in ("smartbatch_deadline_missed_requests_total", "smartbatch_retried_calls_total",
                   "smartbatch_http_429_responses_total", "smartbatch_circuit_breaker_open_bool",
                   "smartbatch_hedge_cancelled_batches_total", "smartbatch_batch_turnaround_seconds_bucket",
                   "smartbatch_rate_limit_wait_seconds_bucket", "smartbatch_budget_remaining_usd",
                   "smartbatch_cache_hits_total", "smartbatch_cost_usd_total", "smartbatch_list_price_usd_total",
                   "smartbatch_flex_refused_calls_total", "smartbatch_flex_timed_out_calls_total"):
        assert needed in used


def test_the_reliability_metrics_carry_units():
    units = ("_seconds", "_usd", "_requests", "_calls", "_responses", "_bool", "_openings", "_batches", "_members")
    new = {"deadline_missed", "retries", "http_429", "breaker_open", "breaker_openings", "hedged_batches",
           "hedge_kept", "paid_twice", "paid_twice_usd", "turnaround_s", "rate_limit_wait_s", "rejected",
           "flex_refused", "flex_timed_out"}
    m = EngineMetrics()
    for attr in new:
        name = getattr(m, attr)._name
        assert name.startswith("smartbatch_") and name.endswith(units), name


def test_redis_up_is_exported_only_when_redis_is_configured():
    m = EngineMetrics()
    m.observe_cache({"miss": 1}, {"memory_entries": 1})  # a memory-only cache: no redis_up in its report
    assert "smartbatch_cache_redis_up" not in exported_names(m)
    m.observe_cache({}, {"redis_up": 0})
    m.observe_cache({}, {"redis_up": 1})
    assert m.registry.get_sample_value("smartbatch_cache_redis_up") == 1.0


def test_released_followers_are_counted_as_a_lookup_result():
    m = EngineMetrics()
    m.observe_cache({"in_flight": 3, "released": 1}, {})
    get = lambda result: m.registry.get_sample_value("smartbatch_cache_lookups_total", {"result": result})  # noqa: E731
    assert (get("in_flight"), get("released")) == (3.0, 1.0)


@pytest.mark.parametrize("retry_after, error, reason", [
    (2.0, "openai HTTP 429: slow down", "429"),
    (None, "openai 429 rate limited", "429"),
    (None, "anthropic HTTP 529: overloaded", "5xx"),
    (None, "openai 5xx", "5xx"),
    (None, "openai: timed out after 60 s", "timeout"),
    (None, "openai: ConnectError: refused", "other"),
    (None, None, "other"),
])
def test_retry_reasons(retry_after, error, reason):
    assert retry_reason(retry_after, error) == reason


def test_dispatch_counts_reach_the_metrics():
    c = DispatchCounts()
    assert not c
    c.failed("429", retried=True)
    c.failed("5xx", retried=False)
    c.deadline_missed["urgent"] = 2
    c.breaker_open["gpt-4o"] = 1
    c.breaker_openings["gpt-4o"] = 1
    c.hedged_batches, c.hedge_kept_members = 1, 3
    c.turnaround_s.append(120.0)
    c.rate_limit_wait_s["sync"] = [0.0, 1.5]
    c.flex_refused, c.flex_timed_out = 2, 1
    m = EngineMetrics()
    m.observe_counts("openai", c.as_dict())
    v = m.registry.get_sample_value
    assert v("smartbatch_retried_calls_total", {"provider": "openai", "reason": "429"}) == 1
    assert v("smartbatch_retried_calls_total", {"provider": "openai", "reason": "5xx"}) is None
    assert v("smartbatch_http_429_responses_total", {"provider": "openai"}) == 1
    assert v("smartbatch_deadline_missed_requests_total", {"provider": "openai", "priority": "urgent"}) == 2
    assert v("smartbatch_circuit_breaker_open_bool", {"provider": "openai", "model": "gpt-4o"}) == 1
    assert v("smartbatch_circuit_breaker_openings_total", {"provider": "openai", "model": "gpt-4o"}) == 1
    assert v("smartbatch_hedge_cancelled_batches_total", {"provider": "openai"}) == 1
    assert v("smartbatch_hedge_kept_members_total", {"provider": "openai"}) == 3
    assert v("smartbatch_batch_turnaround_seconds_count", {"provider": "openai"}) == 1
    assert v("smartbatch_rate_limit_wait_seconds_sum", {"provider": "openai", "mode": "sync"}) == 1.5
    assert v("smartbatch_flex_refused_calls_total", {"provider": "openai"}) == 2
    assert v("smartbatch_flex_timed_out_calls_total", {"provider": "openai"}) == 1


def test_rejections_are_counted_by_a_bounded_reason():
    m = EngineMetrics()
    m.observe_results([Result(id="a", status="rejected", error="budget_exhausted"),
                       Result(id="b", status="rejected", error="policy error: boom, with free text"),
                       Result(id="c", status="ok")], None)
    v = m.registry.get_sample_value
    assert v("smartbatch_rejected_requests_total", {"reason": "budget_exhausted"}) == 1
    assert v("smartbatch_rejected_requests_total", {"reason": "other"}) == 1


def test_a_batch_of_observations_exports_what_one_at_a_time_would():
    """The hub observes a batch of values in one step (``_observe_all``); the exposition must be what
    prometheus-client's own ``observe`` gives, values on a bucket's bound included."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from actors.metrics import _SECONDS, _observe_all

    rng = np.random.default_rng(0)
    values = np.r_[rng.exponential(60.0, 500), _SECONDS, 0.0, 1e6]
    out = []
    for bulk in (False, True):
        reg = CollectorRegistry()
        h = Histogram("t_seconds", "t", ["provider"], buckets=_SECONDS, registry=reg)
        child = h.labels("openai")
        if bulk:
            _observe_all(child, values[:300])
            _observe_all(child, values[300:])
            _observe_all(child, [])
        else:
            for v in values:
                child.observe(float(v))
        text = generate_latest(reg).decode().splitlines()
        out.append(([line for line in text if "_created" not in line and "_sum" not in line],
                    float(next(line for line in text if line.startswith("t_seconds_sum")).split()[-1])))
    (one, one_sum), (many, many_sum) = out
    assert one == many and any('le="+Inf",provider="openai"} 517.0' in line for line in many)
    assert many_sum == pytest.approx(one_sum, rel=1e-12)  # summed in another order


def test_the_dashboards_saving_is_the_reports_list_price_minus_cost():
    """A request may cost more than its list price (an Anthropic sync call that writes the cache pays 1.25x on
    what it writes; an image at "auto" made at a dearer quality). The report nets it (``saving_usd`` = list
    prices - cost); the saving counter, which cannot fall, dropped it, so the dashboard read a larger saving than
    the report: $1.4738 against $1.4722 in a helper's run over the emulator. A list price counter beside the cost
    one gives the report's figure."""
    m = EngineMetrics()
    results = [Result(id=k, status=status, provider="anthropic", model="claude-haiku-4-5", mode=mode, cost_usd=usd)
               for k, status, mode, usd in (("w", "ok", "sync", 0.01875), ("b", "ok", "batch_api", 0.004),
                                            ("r", "reused", "reuse", 0.0), ("f", "failed", None, 0.0))]
    lists = [0.017214, 0.008, 0.008, 0.009]
    m.observe_results(results, lists)
    v = m.registry.get_sample_value
    cost = sum(v("smartbatch_cost_usd_total", {"provider": "anthropic", "model": "claude-haiku-4-5", "mode": mode,
                                               "tenant": "default"}) or 0.0 for mode in ("sync", "batch_api", "reuse"))
    report_saving = sum(lists[:3]) - sum(r.cost_usd for r in results)  # actors.hub: served requests' list prices
    assert v("smartbatch_list_price_usd_total", {"provider": "anthropic"}) - cost == pytest.approx(report_saving)
    saving = [e for e in dashboard_exprs() if "saving" in e or "list_price" in e]
    assert saving and all("smartbatch_list_price_usd_total" in e and "smartbatch_cost_usd_total" in e
                          for e in saving), saving


def test_spend_is_counted_per_model_and_the_dashboard_shows_it():
    """A user watching spend per model had the report and ``smartbatch status`` only: the counter was by provider
    and mode, so no dashboard or alert could say which model spent (a helper's tour)."""
    m = EngineMetrics()
    m.observe_results([Result(id="a", status="ok", provider="openai", model="gpt-5-mini", mode="sync", cost_usd=0.02),
                       Result(id="b", status="ok", provider="openai", model="gpt-5", mode="sync", cost_usd=0.5),
                       Result(id="c", status="ok", provider="openai", model="gpt-5", mode="sync", cost_usd=0.25)],
                      None)
    v = m.registry.get_sample_value
    key = {"provider": "openai", "mode": "sync", "tenant": "default"}
    assert v("smartbatch_cost_usd_total", {**key, "model": "gpt-5"}) == 0.75
    assert v("smartbatch_cost_usd_total", {**key, "model": "gpt-5-mini"}) == 0.02
    assert any("by (provider, model)" in e and "smartbatch_cost_usd_total" in e for e in dashboard_exprs())


def _spend(tenant: str, usd: float, rid: str = "", status: str = "ok") -> Result:
    return Result(id=rid or f"{tenant}-{usd}", status=status, tenant=tenant, provider="openai", model="gpt-5-mini",
                  mode="sync", cost_usd=usd)


def _by_tenant(m: EngineMetrics, metric: str) -> dict[str, float]:
    """Each ``tenant`` label's sum of ``metric`` over its other labels."""
    out: dict[str, float] = {}
    for fam in m.registry.collect():
        for s in fam.samples:
            if s.name == metric:
                out[s.labels["tenant"]] = out.get(s.labels["tenant"], 0.0) + s.value
    return out


def test_spend_is_counted_per_tenant_and_the_dashboard_shows_it():
    """A user watching spend per tenant had the report's ``by_tenant`` and ``smartbatch status`` only: the cost
    counter had no tenant label, so no Grafana panel or alert could say which tenant spent (the gap left when the
    model label was added)."""
    m = EngineMetrics()
    m.observe_results([_spend("acme", 0.5, "a"), _spend("acme", 0.25, "b"), _spend("globex", 0.02, "c"),
                       _spend("globex", 0.0, "d", status="failed")], None)
    v = m.registry.get_sample_value
    assert v("smartbatch_cost_usd_total", {"provider": "openai", "model": "gpt-5-mini", "mode": "sync",
                                           "tenant": "acme"}) == 0.75
    assert _by_tenant(m, "smartbatch_cost_usd_total") == {"acme": 0.75, "globex": 0.02}
    # Requests per tenant too, as by_tenant counts them (every result, whatever its status).
    assert _by_tenant(m, "smartbatch_requests_total") == {"acme": 2.0, "globex": 2.0}
    assert v("smartbatch_requests_total", {"outcome": "failed", "tenant": "globex"}) == 1
    assert any("by (tenant)" in e and "smartbatch_cost_usd_total" in e for e in dashboard_exprs())
    variables = {v["name"]: v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]}
    assert "smartbatch_cost_usd_total" in variables["tenant"]["definition"]


def test_tenants_past_the_cap_are_counted_under_other_and_the_totals_still_add_up(caplog):
    """Tenants are named by callers: past ``metrics.max_tenants`` distinct ones a new tenant is counted under
    ``tenant="_other"``, so the page cannot grow without bound; the first ones keep their own value, and the sum
    over every label is still the engine's spend. The log says so once."""
    m = EngineMetrics(max_tenants=3)
    batches = [[_spend(f"t{k}", 0.01 * (k + 1), f"r{b}-{k}") for k in range(b * 4, b * 4 + 4)] for b in range(5)]
    batches.append([_spend("t0", 1.0, "again"), _spend("t19", 2.0, "again")])  # a kept one and a late one again
    with caplog.at_level(logging.WARNING, logger="smartbatch.metrics"):
        for batch in batches:
            m.observe_results(batch, None)
    cost = _by_tenant(m, "smartbatch_cost_usd_total")
    assert sorted(cost) == ["_other", "t0", "t1", "t2"]
    assert cost["t0"] == pytest.approx(0.01 + 1.0)
    everything = sum(r.cost_usd for batch in batches for r in batch)
    assert sum(cost.values()) == pytest.approx(everything)
    assert cost["_other"] == pytest.approx(everything - cost["t0"] - cost["t1"] - cost["t2"])
    requests = _by_tenant(m, "smartbatch_requests_total")
    assert sorted(requests) == sorted(cost) and sum(requests.values()) == sum(map(len, batches))
    said = [r for r in caplog.records if "_other" in r.getMessage()]
    assert len(said) == 1 and "max_tenants" in said[0].getMessage(), [r.getMessage() for r in caplog.records]


def test_max_tenants_0_puts_every_tenant_under_other():
    m = EngineMetrics(max_tenants=0)
    m.observe_results([_spend("acme", 0.5), _spend("globex", 0.25)], None)
    assert _by_tenant(m, "smartbatch_cost_usd_total") == {"_other": 0.75}


def test_the_page_renders_whatever_the_tenants_are_called():
    """A tenant's name goes on the page as a label value: quotes, backslashes and non-ASCII are escaped by the
    exposition; text that is not valid UTF-8 (a lone surrogate) failed the whole scrape, so it is replaced, and a
    name is cut to the length a request's tenant may have."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    names = ['ac"me', "back\\slash", "Zürich 東京", "x\ud800y", "t" * 300]
    m = EngineMetrics()
    m.observe_results([_spend(t, 0.125, f"r{k}") for k, t in enumerate(names)], None)
    page = generate_latest(m.registry).decode("utf-8")
    got = {s.labels["tenant"]: s.value for fam in text_string_to_metric_families(page) for s in fam.samples
           if s.name == "smartbatch_cost_usd_total"}
    assert got == {'ac"me': 0.125, "back\\slash": 0.125, "Zürich 東京": 0.125, "x\ufffdy": 0.125, "t" * 256: 0.125}


def test_the_hub_takes_the_tenant_cap_from_the_settings():
    from actors.hub import ResultHub
    from engine.core.settings import MetricsSettings, Settings

    assert MetricsSettings().max_tenants == 100
    with pytest.raises(ValueError, match="max_tenants"):
        MetricsSettings(max_tenants=-1)
    hub = ResultHub(1, max_tenants=1)
    hub.metrics.observe_results([_spend("acme", 0.5), _spend("globex", 0.25)], None)
    assert _by_tenant(hub.metrics, "smartbatch_cost_usd_total") == {"acme": 0.5, "_other": 0.25}
    import os
    from unittest import mock

    with mock.patch.dict(os.environ, {"SMARTBATCH_METRICS__MAX_TENANTS": "7"}):
        assert Settings().metrics.max_tenants == 7


def test_a_message_of_dispatches_is_observed_per_mode_in_one_step_as_one_at_a_time_would():
    """A sync call is a dispatch of one, so a dispatcher's message to the hub holds one dispatch per request; the
    hub observed each alone (three label lookups and a histogram step, 17-21 us: a fifth of its CPU). Now one
    step per histogram and mode, exporting what one ``observe`` per dispatch and per wait exports."""
    import asyncio

    from prometheus_client import generate_latest

    from actors.hub import ResultHub

    observed = [("sync", [0.25 * k - 0.5], k % 3) for k in range(40)]
    observed += [("batch_api", [0.5 * k for k in range(n)], 7) for n in (1, 3, 16, 0)]
    ref = EngineMetrics()
    for mode, waits, n in observed:
        ref.batch_size.labels("openai", mode).observe(len(waits))
        for w in waits:
            ref.dispatch_s.labels("openai").observe(max(w, 0.0))
        ref.queue.labels("openai").set(n)
    hub = ResultHub()
    looked = []
    for name in ("batch_size", "dispatch_s"):
        h = getattr(hub.metrics, name)
        h.labels = (lambda labels, name=name: lambda *a: looked.append(name) or labels(*a))(h.labels)
    asyncio.run(hub.observe_dispatches("openai", observed, None, None))
    assert sorted(looked) == ["batch_size", "batch_size", "dispatch_s"]  # 44 lookups each before

    def shown(m):
        return [line for line in generate_latest(m.registry).decode().splitlines() if "_created" not in line]

    assert shown(hub.metrics) == shown(ref)
    assert hub.metrics.registry.get_sample_value("smartbatch_batch_size_count",
                                                 {"provider": "openai", "mode": "sync"}) == 40


def _labels_by_name(metrics: EngineMetrics) -> dict[str, set[str]]:
    """Each exported sample name (with its type's suffixes) and the labels it carries."""
    from prometheus_client.metrics import MetricWrapperBase

    out: dict[str, set[str]] = {}
    for m in vars(metrics).values():
        if isinstance(m, MetricWrapperBase):
            for suffix in _SUFFIXES.get(m._type, ("",)):
                out[m._name + suffix] = set(m._labelnames) | ({"le"} if suffix == "_bucket" else set())
    return out


# Aggregations that keep only their ``by`` labels (none without one); ``histogram_quantile`` and the
# ``_over_time`` functions are not matched (no word boundary before ``quantile``, none after ``max``).
_AGGREGATION = re.compile(r"\b(sum|avg|min|max|count|group|stddev|stdvar|quantile)\s*(\(|by\b)")


def _label_faults(expr: str, legend: str, labels: dict[str, set[str]]) -> list[str]:
    """The ``by`` labels of ``expr`` no metric of it carries, and the labels ``legend`` names that its series
    have lost (or never had)."""
    carried = set().union(*(labels.get(n, set()) for n in promql_metric_names(expr)))
    grouped = {x.strip() for g in re.findall(r"\bby\s*\(([^)]*)\)", expr) for x in g.split(",")}
    shown = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    kept = (grouped if _AGGREGATION.search(expr) else carried) - {"le"}
    return sorted(grouped - carried) + sorted(shown - kept)


def test_every_label_the_dashboard_groups_or_names_a_series_by_is_one_its_metrics_carry():
    """A ``by (...)`` label no metric of the query carries sums every series into one with no label: the panel
    draws one line where it promised one per provider, and nothing says so."""
    labels = _labels_by_name(EngineMetrics())
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        for t in panel.get("targets", []):
            faults = _label_faults(t["expr"], t.get("legendFormat", ""), labels)
            assert not faults, (panel["title"], t["expr"], t.get("legendFormat"), faults)


def test_a_legend_label_an_aggregation_without_by_dropped_is_a_fault():
    """``sum (rate(x[5m]))`` keeps no label, so a legend ``{{provider}}`` draws an empty name; the check took
    every label of the metric as kept when no ``by`` was written (a review of stop 85)."""
    labels = _labels_by_name(EngineMetrics())
    expr = "sum (rate(smartbatch_hedge_kept_members_total[15m])) * 3600"
    assert _label_faults(expr, "{{provider}} members kept", labels) == ["provider"]
    assert _label_faults(expr.replace("sum ", "sum by (provider) "), "{{provider}} members kept", labels) == []
    assert _label_faults("rate(smartbatch_hedge_kept_members_total[15m])", "{{provider}}", labels) == []
    quantile = "histogram_quantile(0.5, sum by (provider, le) (rate(smartbatch_batch_turnaround_seconds_bucket[1h])))"
    assert _label_faults(quantile, "{{provider}} p50", labels) == []


def test_a_panel_of_several_queries_names_each_ones_series():
    """A panel with two queries and no legend names both series by their labels alone: the turnaround panel drew
    two lines per provider, each ``{provider="openai"}``, with nothing to say which was the p50 and which the p95
    (the same in the hedge, rate-limit wait, budget and cache panels; a helper's tour)."""
    doc = json.loads(DASHBOARD.read_text())
    for panel in doc["panels"]:
        targets = panel.get("targets", [])
        if len(targets) < 2:
            continue
        legends = [t.get("legendFormat", "") for t in targets]
        assert all(legends) and len(set(legends)) == len(legends), (panel["title"], legends)
