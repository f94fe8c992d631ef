"""``bench``: several policies on one trace in the simulator, judged against naive and the lower bound."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

# places_for and usd_places: the commands that print costs import them from here
from engine.app._bench_output import places_for, source_line, usd_places, write_outputs  # noqa: F401
from engine.core._yaml import yaml_problem
from engine.core.catalog import Catalog, default_catalog
from engine.core.draws import Draws
from engine.core.errors import ConfigError
from engine.core.request import Request
from engine.core.settings import Settings, load_settings
from engine.core.trace import with_day_origin
from engine.sim.lower_bound import lower_bound
from engine.sim.simulator import SimResult, simulate

__all__ = ["PolicySpec", "document", "load_variants", "resolve_policies", "result_row", "run_bench", "source_line",
           "source_of", "write_outputs"]

SOURCE_PROBLEMS_KEPT = 1000  # skipped lines named one by one in results.json; ``skipped_lines`` counts them all


class PolicySpec(BaseModel):
    """One entry of a bench: a label, the policy (name or module:Class) and its parameters."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: str = Field(min_length=1)
    policy: str = Field(min_length=1)
    params: dict[str, Any] = Field(default_factory=dict)


class _VariantsLoader(yaml.SafeLoader):
    """YAML as JSON reads numbers: YAML 1.1's float needs a dot and a signed exponent, so PyYAML read a bare
    ``1e-4`` as the string '1e-4', which a policy parameter refuses as no number (a review)."""


_VariantsLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"))


def load_variants(path: str | Path | None) -> dict[str, PolicySpec]:
    """Named variants from YAML: ``variants: [{name, policy, params}]``."""
    if path is None:
        return {}
    try:
        raw = yaml.load(Path(path).read_text(encoding="utf-8"), Loader=_VariantsLoader) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read variants file {path}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); "
                          "save the variants file as UTF-8 YAML") from exc
    except yaml.YAMLError as exc:  # one line: where, and what the parser expected (not its multi-line pointer)
        raise ConfigError(f"{yaml_problem(exc, str(path))}; see the variants example in README.md") from exc
    items = raw.get("variants") if isinstance(raw, dict) else None
    if not isinstance(items, list):
        raise ConfigError(f"{path}: expected a top-level 'variants:' list of {{name, policy, params}}")
    out: dict[str, PolicySpec] = {}
    for k, item in enumerate(items):
        try:
            spec = PolicySpec.model_validate(item)
        except ValidationError as exc:
            first = min(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")  # a misspelt key ('polcy') first
            near = get_close_matches(str(first["loc"][-1]), list(PolicySpec.model_fields), 1, 0.6)
            keys = (f"; did you mean {near[0]!r}? a" if near else "; a") + " variant takes name, policy and params" \
                if first["type"] == "extra_forbidden" else ""
            raise ConfigError(f"{path}: variants[{k}].{'.'.join(map(str, first['loc']))}: {first['msg']}{keys}"
                              ) from exc
        if spec.name in out:
            raise ConfigError(f"{path}: variant name {spec.name!r} appears twice")
        from policies import available_policies

        if spec.name != spec.policy and spec.name in available_policies():
            # It would stand in for the registered policy of that name in every table (a helper's hunt: a
            # "naive" row that was batch-all's cost).
            raise ConfigError(f"{path}: variants[{k}].name {spec.name!r} is a registered policy's name, and this "
                              f"variant runs {spec.policy!r}; give it a name of its own")
        out[spec.name] = spec
    return out


def resolve_policies(names: str | Sequence[str], variants: dict[str, PolicySpec],
                     catalog: Catalog | None = None, *, flag: str = "--policies") -> list[PolicySpec]:
    """The entries ``names`` asks for (given as ``flag``: run's is ``--policy``, of one). Given the ``catalog``,
    every variant of a registered policy is built once too, asked for or not: a variants file's bad entry failed
    only the run that asked for it, maybe days later."""
    items = [n for n in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names) if n]
    twice = next((n for k, n in enumerate(items) if n in items[:k]), None)  # it ran twice: two rows of one policy
    if flag == "--policy" and len(items) > 1:
        raise ConfigError(f"--policy {names!r}: run takes one policy (bench compares several)")
    if not items or twice:
        raise ConfigError(f"{flag} names {twice!r} twice; give each once" if twice else
                          f"{flag} is empty; give e.g. {flag} {'smart' if flag == '--policy' else 'naive,smart'}")
    if catalog is not None:
        from policies import available_policies

        for spec in variants.values():
            if spec.policy in available_policies():  # a module:Class is the user's code: imported only when run
                load_spec(spec, catalog)
    return [variants.get(n) or PolicySpec(name=n, policy=n) for n in items]


def load_spec(spec: PolicySpec, catalog: Catalog):
    """The policy of one bench entry; an error in a variant's parameters names the variant (of several variants
    of one policy, the error said only "policy 'smart'")."""
    from policies import load_policy

    try:
        return load_policy(spec.policy, catalog, spec.params)
    except ConfigError as exc:
        if spec.name == spec.policy:
            raise
        raise ConfigError(f"variant {spec.name!r} (policy {spec.policy}): {exc}") from exc


def _round(x: float | None, nd: int = 6) -> float | None:
    return None if x is None else round(x, nd) + 0.0  # + 0.0 turns -0.0 into 0.0


@dataclass
class _Run:
    spec: PolicySpec
    result: SimResult
    relaxed_bound: float


def _served_naive_cost(result: SimResult, naive: SimResult) -> float:
    """What naive's run bills for the requests ``result`` served: the reference of a run that refused some."""
    bill = dict(zip((r.uid for r in naive.requests), naive.cost.tolist()))
    return float(sum(bill[r.uid] for r, s in zip(result.requests, result.served.tolist()) if s))


def result_row(name: str, policy_class: str, params: dict, result: SimResult, naive: SimResult,
               bound: float, relaxed_bound: float, online_bound: float | None = None) -> dict:
    """One row of ``results``: the contract keys, judged against naive (``naive``: its run without budgets) and
    the bound (and the online bound: ``capture_of_online``), plus the summary."""
    s = result.summary()
    cost = result.total_cost  # unrounded, as naive's: naive against itself is 0 %, not the rounding's 0.05 %
    naive_cost = naive.total_cost
    achievable = naive_cost - bound
    refused = sum(s["rejected"].values()) + s["failed"]
    # A refused or failed request bills little or nothing: against the whole trace's naive bill, that would read
    # as saving (a run at an unreachable provider showed 89.8 %, a helper's tour). So a run that did not serve
    # every request is judged against naive's bill for the requests it served.
    reference = _served_naive_cost(result, naive) if refused else naive_cost
    row = {
        "policy": name, "policy_class": policy_class, "params": params,
        "cost_usd": s["cost_usd"],
        "naive_cost_usd": round(naive_cost, 6),
        "saving_vs_naive": _round((reference - cost) / reference if reference > 0 else 0.0),
        # Against the bound of serving every request: meaningless when some were refused (budgets) or failed.
        "capture_of_achievable": _round((naive_cost - cost) / achievable
                                        if achievable > 1e-12 and not refused else None),
        # Against what an online policy can achieve in expectation (docs/lower-bound.md: the online bound).
        "capture_of_online": _round((naive_cost - cost) / (naive_cost - online_bound)
                                    if online_bound is not None and naive_cost - online_bound > 1e-12
                                    and not refused else None),
        "lower_bound_for_its_misses_usd": round(relaxed_bound, 6),
    }
    if refused:
        row["naive_cost_of_served_usd"] = round(reference, 6)
    row.update({k: v for k, v in s.items() if k not in ("policy", "cost_usd")})
    budget = result.extra.get("budget")
    row["budget_overrun_usd"] = budget["overrun_usd"] if budget else 0.0
    if budget:
        row["budget"] = budget
    return row


def document(trace_name: str, n_requests: int, seed: int, lb, rows: list[dict],
             budgets: list[dict] | None = None) -> dict:
    doc = {"trace": trace_name, "requests": n_requests, "seed": seed, "lower_bound_usd": round(lb.total_usd, 6),
           "lower_bound": lb.as_dict(), "results": rows}
    online = rows[0].get("online_bound_usd") if rows else None
    if online is not None:
        doc["online_bound_usd"] = online
    if budgets:
        doc["budgets"] = budgets
    return doc


def source_of(trace_file: str | Path, *, skipped: int = 0, problems: Sequence[tuple] = (),
              catalog: str | Path | None = None, overlay: str | Path | None = None) -> dict:
    """What a results document was made from: the trace file, the lines ``--skip-invalid`` left out (each with
    its field and problem), and the catalog and overlay that priced it. A report read later, or beside another,
    said none of it: a skipped line past the first five was named nowhere (a helper's tour)."""
    return {"trace_file": str(trace_file), "skipped_lines": skipped,
            "invalid_lines": [{"line": n, "field": f, "message": m} for _, n, f, m in problems[:SOURCE_PROBLEMS_KEPT]],
            "catalog": str(catalog) if catalog else "packaged", "catalog_overlay": str(overlay) if overlay else None}



def run_bench(requests: Sequence[Request], specs: Sequence[PolicySpec], *, trace_name: str,
              catalog: Catalog | None = None, settings: Settings | None = None, seed: int | None = None,
              on_progress: Callable[[str], None] | None = None) -> dict:
    """Simulate every policy, the naive baseline and the lower bound; return the results document."""
    from policies import load_policy

    settings = with_day_origin(settings or load_settings(), requests)  # before the sort drops the trace's
    catalog = catalog or default_catalog()
    seed = settings.sim.seed if seed is None else seed
    reqs = sorted(requests, key=lambda r: r.arrival_s)
    draws = Draws(len(reqs), settings.sim.max_attempts, seed, settings.sim.batch_slot_s)
    policies = [(s, load_spec(s, catalog)) for s in specs]  # fail fast on bad params
    lb = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws)
    online = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws, online=True).total_usd
    if on_progress:
        on_progress("lower bound")

    def sim(policy) -> SimResult:
        return simulate(reqs, policy, catalog=catalog, settings=settings, seed=seed, trace_name=trace_name,
                        draws=draws)

    # The naive reference is the bill without budgets: what the trace would cost if nothing held it back.
    budgeted = bool(settings.budgets.specs)
    naive: SimResult | None = None
    runs: list[_Run] = []
    for spec, policy in policies:
        res = sim(policy)
        relaxed = lower_bound(reqs, catalog=catalog, settings=settings, draws=draws, relax=~res.met,
                              unserved=~res.served).total_usd  # a request a budget refused billed nothing
        runs.append(_Run(spec, res, relaxed))
        if spec.policy == "naive" and not spec.params and naive is None and not budgeted:
            naive = res
        if on_progress:
            on_progress(spec.name)
    if naive is None:
        free = settings.model_copy(update={"budgets": type(settings.budgets)()})
        naive = simulate(reqs, load_policy("naive", catalog), catalog=catalog, settings=free, seed=seed,
                         trace_name=trace_name, draws=draws)
    rows = [result_row(r.spec.name, r.spec.policy, r.spec.params, r.result, naive, lb.total_usd,
                       r.relaxed_bound, online) for r in runs]
    for row in rows:
        row["online_bound_usd"] = round(online, 6)
    return document(trace_name, len(reqs), seed, lb, rows,
                    [b.model_dump() for b in settings.budgets.specs] if budgeted else None)
