"""Which providers the live engine calls over HTTP, and whether the others may be simulated beside them
(``Settings.providers``; re-exported by ``engine.core.settings``)."""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from collections.abc import Mapping
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from engine.core._gemini import GEMINI_OPENAI_URL
from engine.core._logkeys import masked_url
from engine.core._masked_repr import MaskedRepr
from engine.core._settings_env import env_names
from engine.core.errors import ConfigError

# Where an endpoint without a base_url goes: the variable its SDK reads, else the provider's own API.
BASE_URL_ENV = {"openai": "OPENAI_BASE_URL", "anthropic": "ANTHROPIC_BASE_URL"}


class ProviderEndpoint(MaskedRepr, BaseModel):
    """How to reach one provider over HTTP. The key is read from the environment variable named here, by the
    driver, and handed to the dispatcher inside a ``Secret`` that never prints."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    masked_urls: ClassVar[tuple[str, ...]] = ("base_url",)  # its repr's (``MaskedRepr``)
    variable_names: ClassVar[tuple[str, ...]] = ("api_key_env",)
    api: Literal["openai", "anthropic"] = Field(description="wire format: openai (any OpenAI-compatible server: "
                                                "vLLM, Ollama, Together, Groq, a LiteLLM proxy) or anthropic")
    base_url: str | None = Field(default=None, description="None: the SDK's default (or OPENAI_BASE_URL / "
                                 "ANTHROPIC_BASE_URL)")
    api_key_env: str = Field(min_length=1, description="environment variable that holds the API key")
    timeout_s: float = Field(default=600.0, gt=0, description="real seconds before one HTTP call times out")
    connect_timeout_s: float = Field(default=5.0, gt=0, description=(
        "real seconds to open a connection (the SDKs' own default); timeout_s bounds the rest of the call. One "
        "timeout for both held an unreachable endpoint's every call timeout_s (10 min) before it failed over, and "
        "a short timeout_s took a slow connect for a call sent (possibly billed)"))
    cancel_s: float = Field(default=600.0, ge=0, description="engine seconds a batch cancel may take (real "
                            "batches sit in 'cancelling' up to 10 min); the hedge falls back this much earlier")
    poll_min_s: float = Field(default=30.0, gt=0, description="first wait between polls of a batch (engine s)")
    poll_max_s: float = Field(default=300.0, gt=0, description="longest wait between polls (engine s)")
    honours_idempotency_key: bool = Field(default=False, description=(
        "whether the server answers a call made again under the same Idempotency-Key with its first answer, "
        "billed once (the project's emulator does; OpenAI and Anthropic do not document the header). False: a "
        "sync call that got no answer and then succeeded on a retry also keeps the unanswered call's upper bound "
        "on its budget (possibly billed)"))
    remake_lost_veo_creates: bool = Field(default=False, description=(
        "whether a Veo create whose answer was lost (sent, then a read timeout, a cut connection, a proxy's 502 or "
        "504) is made again. Google documents no Idempotency-Key and no listing of Veo operations, so the lost one "
        "cannot be found, and it may have made a video Google bills. False: the request fails saying so, not paid "
        "twice. True: made again, a new video (both may be billed; the lost one's upper bound stays on the "
        "budget, possibly billed). A server that honours Idempotency-Key (honours_idempotency_key) is sent it "
        "again either way: it answers with the first operation"))
    flex_tier: bool | None = Field(default=None, description=(
        "whether the server takes OpenAI's service_tier 'flex' (the catalog's flex block): a flex decision is then "
        "sent at that tier. None: only OpenAI's own API (api.openai.com) and the project's emulator (a loopback "
        "address whose path is /openai/v1, as `smartbatch emulate` serves it) do; a wire-format-only server (vLLM, Groq) may not know the value, so the call goes at the standard "
        "tier and is billed standard"))

    strict_fields: bool | None = Field(default=None, description=(
        "whether the server refuses a top-level body field the openai SDK's params do not name, as OpenAI's own "
        "API does (a 400 'Unrecognized request argument supplied'): such a field is then refused per request, "
        "naming it, before anything is reserved or sent. None: only OpenAI's own API (api.openai.com) and the "
        "project's emulator (a loopback address whose path is /openai/v1, as `smartbatch emulate` serves it) "
        "do; a wire-format-only server (vLLM) takes fields of its own (top_k), sent as given"))

    @model_validator(mode="after")
    def _url(self) -> ProviderEndpoint:
        if self.base_url is not None and not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {masked_url(self.base_url)!r}")
        if self.poll_max_s < self.poll_min_s:
            raise ValueError(f"poll_max_s={self.poll_max_s} must be >= poll_min_s={self.poll_min_s}")
        return self

    def http_timeout(self, sdk: Any) -> Any:
        """The timeout of a client of ``sdk`` (the ``openai`` or ``anthropic`` module, each exporting its
        transport's ``Timeout``): ``connect_timeout_s`` to connect, ``timeout_s`` for each other phase."""
        return sdk.Timeout(self.timeout_s, connect=self.connect_timeout_s)

    def serves_flex(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether OpenAI's ``service_tier: "flex"`` goes to this server (``flex_tier``; unset: its address is
        OpenAI's own API or the project's emulator, which serves the tier: a README run against it planned no flex
        while the simulator row of the same run did)."""
        if self.flex_tier is not None:
            return self.flex_tier
        return self.at_openai(environ) or self.at_emulator(environ)

    def refuses_unknown_fields(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether an OpenAI-format server refuses a body field the openai SDK does not type (``strict_fields``;
        unset: its address is OpenAI's own API or the project's emulator)."""
        if self.strict_fields is not None:
            return self.strict_fields
        return self.at_openai(environ) or self.at_emulator(environ)

    def at_openai(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether its calls go to OpenAI's own API."""
        url = self.address(environ)
        return self.api == "openai" and (url is None or urlsplit(url).hostname == _OPENAI_HOST)

    def at_emulator(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether its calls go to the project's emulator as OpenAI: a loopback address whose path is
        ``/openai/v1``. Read from the address alone, not asked of the server: a request is checked before anything
        is sent, and a README run starts the emulator in the background just before it (a probe would race it).
        vLLM, Ollama and llama.cpp serve ``/v1``, so they keep their own fields."""
        url = self.address(environ)
        return self.api == "openai" and loopback(url) and urlsplit(url).path.rstrip("/") == _EMULATOR_OPENAI_PATH

    def address(self, environ: Mapping[str, str] | None = None) -> str | None:
        """Where its calls go: ``base_url``, else the SDK's variable (None: the provider's own API)."""
        env = os.environ if environ is None else environ
        return self.base_url or env.get(BASE_URL_ENV[self.api]) or None

    def refuse_variable_credentials(self, environ: Mapping[str, str] | None = None) -> None:
        """Refuse the SDK's variable (``OPENAI_BASE_URL``, ...) where it says where calls go and holds credentials
        (``refuse_url_credentials``): at the start, and in a dry run's words of it."""
        if not self.base_url and (where := self.address(environ)):
            refuse_url_credentials(where, f"the variable {BASE_URL_ENV[self.api]}", self.api_key_env)


_KNOWN_APIS = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY"}
# What an endpoint of a known name speaks, where and with which key unless told otherwise: google is Gemini through
# Google's OpenAI compatibility layer (not among the default endpoints: a run without a Gemini key still starts).
PRESETS: dict[str, dict[str, str]] = {
    **{name: {"api": name, "api_key_env": key} for name, key in _KNOWN_APIS.items()},
    "google": {"api": "openai", "base_url": GEMINI_OPENAI_URL, "api_key_env": "GEMINI_API_KEY"}}
_GOOGLE_HOST = "generativelanguage.googleapis.com"
_OPENAI_HOST = "api.openai.com"
_EMULATOR_OPENAI_PATH = "/openai/v1"  # engine.emulator serves each provider at /<provider>/v1


def _default_endpoints() -> dict[str, ProviderEndpoint]:
    return {name: ProviderEndpoint(api=name, api_key_env=key) for name, key in _KNOWN_APIS.items()}


class ProvidersSettings(BaseModel):
    """Which providers the live engine calls for real (``SMARTBATCH_PROVIDERS__MODE=http``). A provider without
    an endpoint (the GPU-priced and video providers of the default catalog, Gemini unless you add one) would be
    simulated in an HTTP run: its answers made up. That is refused per request unless ``simulate_others``, which
    by default holds only where every endpoint is on this machine (the emulator, a test server)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    mode: Literal["sim", "http"] = Field(default="sim", description="sim: every provider simulated; http: "
                                         "providers with an endpoint are called over HTTP")
    endpoints: dict[str, ProviderEndpoint] = Field(default_factory=_default_endpoints)
    replay: bool = Field(default=False, description="send each request at its recorded size (a trace replay: "
                         "a prompt of input_tokens, naming the recorded output length for the emulator); "
                         "set by `smartbatch run`")
    simulate_others: bool | None = Field(default=None, description=(
        "in an HTTP run, answer the requests of a provider without an endpoint from the simulator (placeholder "
        "text, a simulated cost; Result.real False). False: each such request is refused, naming the fix. None: "
        "true when every endpoint is on a loopback address (127.0.0.0/8, localhost, ::1: the emulator, a test "
        "server), false when one reaches a real API. An engine decides it once, at its start"))

    @field_validator("endpoints", mode="before")
    @classmethod
    def _known_api(cls, v: Any) -> Any:
        # An endpoint named openai or anthropic speaks that API with its usual key unless told otherwise, so
        # SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__BASE_URL alone points it elsewhere (a helper's tour: it was
        # refused, "api: Field required"); one named google is Gemini's OpenAI compatibility layer (PRESETS).
        if not isinstance(v, Mapping):
            return v
        for name, ep in v.items():
            _misspelt_preset(name, ep)
        return {name: {**PRESETS[name], **ep} if name in PRESETS and isinstance(ep, Mapping) else ep
                for name, ep in v.items()}

    @field_validator("endpoints", mode="before")
    @classmethod
    def _no_query(cls, v: Any) -> Any:
        # The SDKs put each route after the whole base_url, so one with a query misses on every call (a 404); and
        # Google's own API takes its key there (?key=...), which a user may carry over. Refused as ConfigError, not
        # ValueError: pydantic's error would quote the input, key and all (check_redis_url's way with a password).
        for name, ep in v.items() if isinstance(v, Mapping) else ():
            url = ep.get("base_url") if isinstance(ep, Mapping) else None
            if isinstance(url, str) and "?" in url:
                field = f"providers.endpoints.{name}.base_url"
                key_env = ep.get("api_key_env") or PRESETS.get(name, {}).get("api_key_env") or "its api_key_env"
                raise ConfigError(f"setting {field} = {masked_url(url.partition('?')[0]) + '?...'!r} (from "
                                  f"{env_names(field.split('.'))}) holds a query, which every call would miss (each "
                                  "route goes after the whole URL: a 404): give it without its query, and the key in "
                                  f"{key_env}, which is sent as a bearer token")
        return v

    @field_validator("endpoints", mode="before")
    @classmethod
    def _no_credentials(cls, v: Any) -> Any:
        # ConfigError, as _no_query's: pydantic's ValueError would quote the URL, password and all.
        for name, ep in v.items() if isinstance(v, Mapping) else ():
            url = ep.get("base_url") if isinstance(ep, Mapping) else None
            if isinstance(url, str):
                field = f"providers.endpoints.{name}.base_url"
                key_env = ep.get("api_key_env") or PRESETS.get(name, {}).get("api_key_env") or "its api_key_env"
                refuse_url_credentials(url, f"setting {field} (from {env_names(field.split('.'))})", key_env)
        return v

    @field_validator("endpoints")
    @classmethod
    def _google_whole(cls, v: dict[str, ProviderEndpoint]) -> dict[str, ProviderEndpoint]:
        # Half of Gemini's configuration reached no Gemini: its Anthropic wire, or Google's API without the
        # compatibility layer's path (the path of Google's first announcement, /v1beta/), answer every call 404.
        for name, ep in v.items():
            host = urlsplit(ep.base_url).hostname if ep.base_url else None
            if name != "google" and host != _GOOGLE_HOST:
                continue
            if ep.api != "openai":
                raise ValueError(f"providers.endpoints.{name}.api is {ep.api!r}: Google documents an OpenAI-"
                                 "compatible layer for Gemini, no other; give api openai (or leave it out)")
            if host == _GOOGLE_HOST and urlsplit(ep.base_url).path.rstrip("/") != "/v1beta/openai":
                raise ValueError(f"providers.endpoints.{name}.base_url {masked_url(ep.base_url)!r} is Google's API "
                                 "but not its "
                                 f"OpenAI compatibility layer: give {GEMINI_OPENAI_URL} (or leave base_url out)")
        return v

    def http_providers(self, catalog_providers) -> list[str]:
        """The providers called over HTTP in this configuration."""
        if self.mode != "http":
            return []
        return [p for p in catalog_providers if p in self.endpoints]

    def simulates_others(self, environ: Mapping[str, str] | None = None) -> bool:
        """Whether a provider without an endpoint is simulated beside the real ones (``simulate_others``; None:
        every endpoint on a loopback address). A real job's fake answers are worse than its refusals, so an
        endpoint with no base_url (the provider's own API, unless its SDK's variable names a loopback server)
        makes the answer no."""
        if self.simulate_others is not None or self.mode != "http":
            return self.simulate_others is not False
        return bool(self.endpoints) and all(loopback(ep.address(environ)) for ep in self.endpoints.values())

    def decided(self, environ: Mapping[str, str] | None = None) -> ProvidersSettings:
        """These settings with ``simulate_others`` decided and each endpoint's SDK variable (``OPENAI_BASE_URL``,
        ``ANTHROPIC_BASE_URL``) taken into its ``base_url`` (an engine's start: its drivers, its endpoint, its
        actors and a driver that attaches later then agree, whatever their own environment says). The actors'
        SDKs read their own process's variables, which a Ray started elsewhere does not have: a start checked
        at the emulator (its speed-up, the simulated others) called the providers' own APIs (a review)."""
        if self.mode != "http":
            return self
        for ep in self.endpoints.values():
            ep.refuse_variable_credentials(environ)
        endpoints = {name: ep if ep.base_url or not (where := ep.address(environ))
                     else ep.model_copy(update={"base_url": where}) for name, ep in self.endpoints.items()}
        return self.model_copy(update={"endpoints": endpoints, "simulate_others": self.simulates_others(environ)})

    def refuses(self, provider: str) -> bool:
        """Whether a request of ``provider`` is refused: an HTTP run would simulate it, and may not."""
        return self.mode == "http" and provider not in self.endpoints and not self.simulates_others()


def refuse_url_credentials(url: str, where: str, key_env: str) -> None:
    """A base URL holding ``user:password@`` (or a key as its user name) is refused: the SDKs' HTTP client (httpx)
    sends them as Basic auth in the Authorization header, and neither SDK's key goes with it (the openai SDK's
    bearer token is replaced, the anthropic SDK's x-api-key left out: seen on the wire, openai 3.63, anthropic
    2.17), so every call is a 401. Found as ``masked_url`` finds them, a password holding an unescaped "/", "?" or
    "#" too (URL parsing ends the host there: such a URL passed, and the SDK's "Invalid port: 'pa'" quoted the
    password's start, or the query's refusal did), and before an "@" of a URL without its scheme (whose refusal
    quoted it whole; a review)."""
    shown = masked_url(url)
    if shown == url and "@" not in urlsplit(url).netloc:
        before_query = url.partition("?")[0]
        if "://" in url or "@" not in before_query:
            return
        shown = "***" + url[before_query.rindex("@"):]  # up to the last "@": a password may hold one
    raise ConfigError(f"{where} = {shown!r} holds credentials before its host (user:password@), which "
                      "the SDKs' HTTP client sends as Basic auth in place of the API key, so no call would carry the "
                      f"key: give the URL without them, and the key in {key_env}")


def _misspelt_preset(name: Any, ep: Any) -> None:
    # A preset's name misspelt (SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__BASE_URL) is a new endpoint, which needs
    # its api and key: the refusal said to set SMARTBATCH_PROVIDERS__ENDPOINTS__OPNAI__API and __API_KEY_ENV, two
    # more variables for the typo (a helper's tour). Said where the endpoint lacks what a preset would give it.
    if not isinstance(name, str) or name in PRESETS or not isinstance(ep, Mapping) or ("api" in ep and
                                                                                        "api_key_env" in ep):
        return
    folded = {p.casefold(): p for p in PRESETS}
    near = difflib.get_close_matches(name.casefold(), list(folded), n=1, cutoff=0.75)
    if near and folded[near[0]] != name:
        meant = folded[near[0]]
        raise ConfigError(f"providers.endpoints.{name} (from {env_names(['providers', 'endpoints', name])}): did you "
                          f"mean {meant!r}? Name it SMARTBATCH_PROVIDERS__ENDPOINTS__{meant.upper()}__... (or "
                          f"{meant!r} in the JSON of SMARTBATCH_PROVIDERS__ENDPOINTS), which knows its api and key; "
                          "an endpoint of a new name needs its api and api_key_env")


def loopback(url: str | None) -> bool:
    """Whether ``url`` names a server on this machine (127.0.0.0/8, ::1, localhost); None (a provider's own
    API) does not. No name is looked up: the answer must not depend on the network."""
    if not url:
        return False
    try:
        host = urlsplit(url).hostname
    except ValueError:
        return False
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):  # RFC 6761: always this machine
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def simulated_refusal(provider: str, model: str, endpoints: Mapping[str, ProviderEndpoint] | None = None) -> str:
    """Why a request of ``model`` (served by ``provider``, which has no endpoint) is refused, and the fixes."""
    return (f"{model!r} is served by {provider}, which has no HTTP endpoint in this run (providers.mode=http): "
            f"its answers would be simulated (placeholder text, a simulated cost), not real; add an endpoint for "
            f"it ({add_endpoint(provider)}{keep_defaults(provider, endpoints)}{misnamed(provider, endpoints)}), "
            "or set SMARTBATCH_PROVIDERS__SIMULATE_OTHERS=true for a demo")


def misnamed(provider: str, endpoints: Mapping[str, Any] | None) -> str:
    """A word on an endpoint whose name is close to ``provider``'s (``opnai``), for a refusal of its requests: beside
    a real API they are refused before the start's check of endpoint names, which named the slip (a review)."""
    near = [e for e in endpoints or () if e != provider and e not in PRESETS
            and difflib.get_close_matches(e.casefold(), [provider.casefold()], n=1)]
    return f"; an endpoint is named {near[0]!r}: if it is meant for {provider}, name it {provider!r}" if near else ""


def add_endpoint(provider: str) -> str:
    """The variables that give ``provider`` an endpoint."""
    var = f"SMARTBATCH_PROVIDERS__ENDPOINTS__{provider.upper()}"
    if provider == "google":
        return (f"{var}__API_KEY_ENV=GEMINI_API_KEY for Gemini through Google's OpenAI compatibility layer (and "
                "Veo through the Gemini API's own routes), with the key in GEMINI_API_KEY")
    if provider in _KNOWN_APIS:
        return f"{var}__API_KEY_ENV={_KNOWN_APIS[provider]} for its own API, or {var}__BASE_URL=URL"
    if _shell_name(provider):
        return f"{var}__API=openai, {var}__BASE_URL=URL of its OpenAI-compatible API and {var}__API_KEY_ENV=VAR"
    # No variable names it (a dash no shell exports, capitals read lower case): the JSON form does.
    return (f'SMARTBATCH_PROVIDERS__ENDPOINTS=\'{{"{provider}": {{"api": "openai", "base_url": URL, '
            '"api_key_env": VAR}, ...}\'')


def endpoint_setting(provider: str, field: str, value: str | None = None) -> str:
    """The variable that sets ``providers.endpoints.<provider>.<field>`` (to ``value``, if given), or, for a name no
    shell exports (``local-vllm``: a dash), the JSON form of ``SMARTBATCH_PROVIDERS__ENDPOINTS`` that does."""
    if _shell_name(provider):
        return f"SMARTBATCH_PROVIDERS__ENDPOINTS__{provider.upper()}__{field.upper()}" + (f"={value}" if value else "")
    return f'"{field}": {json.dumps(value or "...")} in its entry of SMARTBATCH_PROVIDERS__ENDPOINTS (JSON)'


def _shell_name(provider: str) -> bool:
    # A variable's name is read lower case: ..._TOGETHER__API makes the endpoint "together", which an overlay's
    # provider "Together" never reaches, so one with capitals was told the variables that left it without (a review).
    return provider.isascii() and provider == provider.lower() and provider.replace("_", "").isalnum()


def keep_defaults(provider: str, endpoints: Mapping[str, ProviderEndpoint] | None) -> str:
    """What to add to ``add_endpoint``'s variables while the endpoints are the default pair: endpoints named in
    the environment replace it, and OpenAI's and Anthropic's requests would be refused next."""
    if provider in _KNOWN_APIS or dict(endpoints or {}) != _default_endpoints():
        return ""
    return "; naming endpoints in the environment replaces the default openai and anthropic ones: name them too"
