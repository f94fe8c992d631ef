"""What the engine needs to call providers over HTTP: the catalog it plans with and the keys, read once."""

from __future__ import annotations

import collections
import datetime
import os
from collections.abc import Iterable
from urllib.parse import urlsplit

from engine.core._catalog_errors import _closest
from engine.core._logkeys import get_logger, masked_url
from engine.core._masked_repr import is_variable_name
from engine.core._settings_providers import (
    PRESETS,
    add_endpoint,
    endpoint_setting,
    keep_defaults,
    loopback,
    misnamed,
    simulated_refusal,
)
from engine.core.catalog import Catalog
from engine.core.errors import ConfigError
from engine.core.provider_api import Secret
from engine.core.request import Request
from engine.core.settings import Settings

__all__ = ["check_simulated", "http_setup", "is_variable_name", "key_problems", "retiring", "speedup_problem",
           "with_hedge_lag"]

log = get_logger("smartbatch.providers")

RETIRING_DAYS = 30  # a model that shuts down within this many days is named at every start that calls it


def http_setup(catalog: Catalog, settings: Settings, *, need_keys: bool = True, speedup: float = 0.0,
               today: datetime.date | None = None) -> tuple[Catalog, dict[str, Secret]]:
    """The catalog the engine plans with when some providers are called over HTTP, and their keys. A live
    engine's clock runs at ``speedup`` (0: none, a plan): every hedge then comes its real-time lag earlier
    (``with_hedge_lag``).

    A real batch takes up to ``cancel_s`` to cancel, so for those providers the catalog's ``batch_api.cancel_s``
    becomes the endpoint's and every hedge falls back that much earlier. Keys are read here, from the
    driver's environment, and travel to the dispatchers inside a ``Secret`` (a cluster's workers need not have
    them); a missing key is a start-up error, not a run of 401s. The catalog's models that the provider has shut
    down, or shuts down within ``RETIRING_DAYS`` of ``today`` (UTC), are named in a warning (``retiring``)."""
    _check_fallbacks_real(settings)
    _check_endpoint_names(catalog, settings)
    if need_keys and (problem := speedup_problem(catalog, settings, speedup)) is not None:
        raise ConfigError(problem)
    keys: dict[str, Secret] = {}
    providers = dict(catalog.providers)
    for name in settings.providers.http_providers(catalog.providers):
        ep = settings.providers.endpoints[name]
        # Read into its Secret at once: a frame's locals are printed by error trackers (Secret's docstring)
        keys[name] = Secret(os.environ.get(ep.api_key_env, "") if need_keys else "unread")
        problem = _key_problem(settings, name, keys[name]) if need_keys else None  # a plan says it (key_problems)
        if problem is not None:
            raise ConfigError(problem)
        _warn_retiring(catalog, name, ep, today or datetime.datetime.now(datetime.timezone.utc).date())
        spec = providers[name]
        if spec.batch_api is not None and spec.batch_api.cancel_s != ep.cancel_s:
            providers[name] = spec = spec.model_copy(update={"batch_api": spec.batch_api.model_copy(
                update={"cancel_s": ep.cancel_s})})
        if spec.flex is not None and (spec.compat == "gemini" or not ep.serves_flex()):
            # A server that may not know the tier is sent flex decisions standard, at twice the flex price: the
            # policy plans without the tier there, batching what it would have sent at flex (docs/providers.md).
            providers[name] = spec.model_copy(update={"flex": None})
    if providers != catalog.providers:
        catalog = Catalog.model_validate({"schema_version": catalog.schema_version,
                                          "providers": {k: v.model_dump() for k, v in providers.items()}})
    return with_hedge_lag(catalog, settings.hedge_lag_s, speedup), (keys if need_keys else {})


def speedup_problem(catalog: Catalog, settings: Settings, speedup: float) -> str | None:
    """Why a start at ``speedup`` (engine seconds per real second; 0: a plan's) is refused: a provider called over
    HTTP away from this machine runs in real time. At 100x (``run``'s default) a deadline of an hour was 36 s of
    it, a batch was cancelled at its hedge within a minute and a flex call given up, maybe billed, after 9 s;
    the help's "higher only against simulated or emulated providers" was not held (a new user's tour)."""
    if speedup in (0.0, 1.0):
        return None
    for name in settings.providers.http_providers(catalog.providers):
        if not loopback(where := settings.providers.endpoints[name].address()):
            return (f"--speedup {speedup:g}: provider {name} is called at "
                    f"{masked_url(where) if where else 'its own API'}, which runs in real time: give --speedup 1 "
                    "(speedup=1.0), or point it at the emulator (smartbatch emulate --speedup N; --base-url) to "
                    "compress time")
    return None


def _key_problem(settings: Settings, name: str, key: Secret) -> str | None:
    """What is wrong with ``key``, the API key read for the endpoint ``name``, in the words of the start it
    stops (None: nothing). The key itself is never part of it."""
    ep = settings.providers.endpoints[name]
    if not is_variable_name(ep.api_key_env):  # not quoted: it may be the key itself, given in place of its variable
        say = endpoint_setting(name, "api_key_env", "OPENAI_API_KEY")
        return (f"providers.endpoints.{name}.api_key_env: give the name of the environment variable that holds the "
                f"API key (letters, digits and _), never the key itself ({say}, say)")
    if key.empty():
        others = [p for p in settings.providers.endpoints if p != name]
        only = endpoint_setting(others[0], "api", settings.providers.endpoints[others[0]].api) if others else ""
        alone = (f"; or call only {others[0]} ({only} names its endpoint alone: {name}'s requests are then "
                 "refused)") if len(others) == 1 else ""
        state = "set but empty" if ep.api_key_env in os.environ else "not set"  # OPENAI_API_KEY= (.env's blank)
        return (f"providers.endpoints.{name}: the environment variable {ep.api_key_env} holding the API key is "
                f"{state}; export it, or name another variable with {endpoint_setting(name, 'api_key_env')}, "
                f"or run with providers.mode=sim{alone}")
    # No header can carry it (a pasted newline, say): every call failed unsent, and was counted as possibly
    # billed at its upper bound (a helper's tour).
    if not key.fits_header():
        return (f"providers.endpoints.{name}: the API key in {ep.api_key_env} holds a space, a line break or "
                "another character an HTTP header cannot carry; set it again without them")
    return None


def key_problems(catalog: Catalog, settings: Settings) -> dict[str, str]:
    """For each provider called over HTTP whose key the start would refuse, the start's message (a dry run says
    them: it reads no key to plan, and a real run stopped at its start on what the plan had not said)."""
    said = {}
    for name in settings.providers.http_providers(catalog.providers):
        try:  # OPENAI_BASE_URL with user:password@, which the SDK sends in place of the key: the plan said nothing
            settings.providers.endpoints[name].refuse_variable_credentials()
        except ConfigError as exc:
            said[name] = str(exc)
            continue
        problem = _key_problem(settings, name, Secret(os.environ.get(settings.providers.endpoints[name].api_key_env,
                                                                     "")))
        if problem is not None:
            said[name] = problem
    return said


def _check_endpoint_names(catalog: Catalog, settings: Settings) -> None:
    # An endpoint is matched to the catalog's provider of its name, so one that names none is never called. A
    # misspelt "opnai" left openai without an endpoint, its requests simulated beside a loopback endpoint (fake
    # answers in an HTTP run) or refused naming only the fix for openai (a helper's tour): refused. One no slip
    # explains (local-vllm, its overlay given to another command; openai-eu beside openai's own) ran before, unused,
    # and is warned of: refusing it stopped `smartbatch demo`, which takes no overlay (a review). The preset names
    # (openai, anthropic, google) are left alone: the default pair stays set under a catalog without one of them.
    if settings.providers.mode != "http":
        return
    ends = settings.providers.endpoints
    for name in ends:
        if name in catalog.providers or name in PRESETS:
            continue
        near = _closest(name, list(catalog.providers))
        slip = near is not None and near not in ends
        said = (f"providers.endpoints.{name}: the catalog has no provider {name!r}, so this endpoint "
                + (f"would never be called; did you mean {near!r}? Rename the endpoint, or add" if slip else
                   "is not called in this run; add")
                + " the provider and its models to the catalog (--catalog-overlay, SMARTBATCH_CATALOG_OVERLAY; "
                f"docs/providers.md, \"Catalog overlay\"); the catalog's providers: {', '.join(catalog.providers)}")
        if slip:
            raise ConfigError(said)
        log.warning("%s", said)


def _check_fallbacks_real(settings: Settings) -> None:
    # A circuit that opens sends its requests to their fallback without the checks of a request's way in: one
    # to a provider with no endpoint was answered from the simulator, made-up text at a made-up cost (a hunt).
    for a, b in settings.resilience.fallbacks.items():
        provider, model = b.split("/", 1)
        if settings.providers.refuses(provider):
            raise ConfigError(f"resilience.fallbacks {a!r} -> {b!r}: the fallback would be simulated, not real: "
                              f"{simulated_refusal(provider, model, settings.providers.endpoints)}; or map it "
                              "to a model of a provider with an endpoint")


def check_simulated(requests: Iterable[Request], settings: Settings) -> None:
    """Refuse, before anything is sent, requests an HTTP run would answer from the simulator (their provider has
    no endpoint) where ``settings.providers`` does not let it (``simulate_others``): a ``ConfigError`` that counts
    them per provider and names the fixes. A trace's replay refused them one by one, after sending the others."""
    prov = settings.providers
    if prov.mode != "http" or prov.simulates_others():
        return
    counts = collections.Counter(r.provider for r in requests if r.provider not in prov.endpoints)
    if not counts:
        return
    models: dict[str, str] = {}
    for r in requests:
        models.setdefault(r.provider, r.model)
    ranked = sorted(counts.items(), key=lambda x: (-x[1], x[0]))
    said = "; ".join(f"{n:,} of {p} (e.g. {models[p]!r}): {add_endpoint(p)}{misnamed(p, prov.endpoints)}"
                     for p, n in ranked)
    raise ConfigError(f"providers.mode=http: {sum(counts.values()):,} request(s) are for providers with no HTTP "
                      f"endpoint in this run, whose answers would be simulated (placeholder text, a simulated cost), "
                      f"not real, so nothing is sent: {said}{keep_defaults(ranked[0][0], prov.endpoints)}. Add an "
                      "endpoint for each as shown, leave those requests out, or set "
                      "SMARTBATCH_PROVIDERS__SIMULATE_OTHERS=true for a demo")


def retiring(catalog: Catalog, provider: str, today: datetime.date,
             within_days: int = RETIRING_DAYS) -> list[tuple[str, datetime.date]]:
    """The models of ``provider`` whose ``shutdown`` day is past or within ``within_days`` of ``today``, by day."""
    spec = catalog.providers[provider]
    soon = today + datetime.timedelta(days=within_days)
    return sorted(((m, s.shutdown) for m, s in spec.models.items() if s.shutdown is not None and s.shutdown <= soon),
                  key=lambda x: (x[1], x[0]))


# The providers' own API hosts: an endpoint set to one (Gemini's preset names Google's; OPENAI_BASE_URL may name
# OpenAI's) calls the provider's lineup, and was not warned of it (a helper's tour: Veo's previews, shut down,
# passed unsaid at Google's address).
_PROVIDER_HOSTS = frozenset({"api.openai.com", "api.anthropic.com", "generativelanguage.googleapis.com"})


def _warn_retiring(catalog: Catalog, name: str, ep, today: datetime.date) -> None:
    # The dates are the provider's own: a server the user named (vLLM, a proxy, the emulator) keeps its own
    # lineup, so only the provider's default address is warned about. From the day, each call for the model
    # fails there (model_not_found) and a batch of it is refused: nothing is billed, but a job's requests for it
    # all fail, which a start can say ahead.
    address = ep.address()
    if address is not None and urlsplit(address).hostname not in _PROVIDER_HOSTS:
        return
    gone = retiring(catalog, name, today)
    if gone:
        models = catalog.providers[name].models
        notes = {m: [f"in {(d - today).days} days"] * (d > today)
                 + [f"successor: {models[m].successor}"] * bool(models[m].successor) for m, d in gone}
        said = "; ".join(f"{m} {'shut down on' if d <= today else 'shuts down on'} {d}"
                         + (f" ({'; '.join(notes[m])})" if notes[m] else "") for m, d in gone)
        later = [m for m, s in catalog.providers[name].models.items() if s.shutdown is None and s.kind == "text"]
        others = f"the catalog also prices {', '.join(later)}; " if later else ""
        log.warning("%s: %s, by the provider's deprecations page: requests for them fail from that day; %sname "
                    "their successors and prices in a catalog (--catalog-overlay or --catalog; docs/providers.md, "
                    "\"Retired models\")", name, said, others)


def with_hedge_lag(catalog: Catalog, lag_s: float, speedup: float) -> Catalog:
    """``catalog`` with every batch API's ``cancel_s`` longer by ``lag_s`` real seconds at ``speedup``.

    A live engine's hedge costs real time its engine-time figures do not count: the cancel's round trip, the
    members' way back through the grouper, the sync fallback's dispatch. At speed-up 1 that is well inside the
    hedge's margin; at 100x, 0.3 s of it is 30 engine seconds, and fallbacks came back late (docs/benchmarks.md,
    "Stop 42"). Planning the cancel that much longer moves every hedge and checkpoint earlier by it."""
    extra = lag_s * speedup  # negative: the catalog it was added to (``run_live`` judges a run without it)
    if extra == 0:
        return catalog
    providers = {name: spec.model_copy(update={"batch_api": spec.batch_api.model_copy(
        update={"cancel_s": max(spec.batch_api.cancel_s + extra, 0.0)})}) if spec.batch_api is not None else spec
        for name, spec in catalog.providers.items()}
    return Catalog.model_validate({"schema_version": catalog.schema_version,
                                   "providers": {k: v.model_dump() for k, v in providers.items()}})
