"""One settings object, built once by the driver or CLI and passed down (never read at import time)."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from engine.core._budget_check import limit_problem
from engine.core._logkeys import masked_url
from engine.core._masked_repr import MaskedRepr
from engine.core._settings_env import ENV_PREFIX, check_env_names, env_names, explain
from engine.core._settings_providers import ProviderEndpoint, ProvidersSettings
from engine.core.budgets import BudgetSettings, BudgetSpec
from engine.core.errors import ConfigError
from engine.core.resilience import Resilience

__all__ = ["MAX_DEADLINE_S", "BudgetSettings", "CacheSettings", "DeadlineDefaults", "JournalSettings",
           "MetricsSettings", "ProviderEndpoint", "ProvidersSettings", "Resilience", "Settings", "SimSettings",
           "TurnaroundLearning", "check_redis_url", "default_settings", "load_settings", "masked_url", "with_budget"]

# A deadline further out changes nothing (batch windows are 24 h) and would make the lower bound's per-slot
# arrays span it; requests and the defaults below are refused past it.
MAX_DEADLINE_S = 366 * 86400.0


class DeadlineDefaults(BaseModel):
    """Deadline (seconds after arrival) of a request whose line sets none, by priority."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    urgent: float = Field(default=300.0, gt=0, le=MAX_DEADLINE_S)
    normal: float = Field(default=3600.0, gt=0, le=MAX_DEADLINE_S)
    background: float = Field(default=86400.0, gt=0, le=MAX_DEADLINE_S)

    @model_validator(mode="after")
    def _ordered(self) -> DeadlineDefaults:
        if not self.urgent <= self.normal <= self.background:
            raise ValueError(
                f"deadlines must grow as priority falls: urgent={self.urgent} <= normal={self.normal} "
                f"<= background={self.background}"
            )
        return self


class SimSettings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    seed: int = 0
    max_attempts: int = Field(default=4, ge=1, description="tries per request before it resolves as failed")
    backoff_base_s: float = Field(default=1.0, ge=0, description="retry k waits backoff_base_s * 2**(k-1)")
    near_floor: float = Field(
        default=0.85, ge=0, le=1,
        description="no near-duplicate hit below this cosine is granted, whatever a policy asks; the lower "
                    "bound counts every guarded match at or above it as free",
    )
    batch_slot_s: float = Field(
        default=60.0, gt=0,
        description="batches submitted in the same slot of this length share one drawn turnaround "
                    "(the provider's queue load at that time)",
    )
    turnaround_scale: float = Field(
        default=1.0, gt=0,
        description="the simulated providers' true batch turnaround as a multiple of the catalog's (which "
                    "stays the policy's prior): 3 is a world 3x slower than the catalog says",
    )
    turnaround_scale_by_hour: tuple[float, ...] = Field(
        default=(),
        description="empty, or 24 further multipliers, one per hour of day of engine time (from day_origin_s): "
                    "a batch queue whose load follows the time of day",
    )
    day_origin_s: float | None = Field(
        default=None, ge=0, lt=86400,
        description="the time of day at engine time 0, in seconds after UTC midnight: hour of day is "
                    "(day_origin_s + t) // 3600 % 24, for the world above and the learned turnaround's hours. "
                    "Unset: the simulator takes the trace's (a trace built from timestamps keeps its first "
                    "arrival's; else 0), a live engine the wall clock's when its clock starts",
    )

    @field_validator("turnaround_scale_by_hour")
    @classmethod
    def _day(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if v and (len(v) != 24 or min(v) <= 0):
            raise ValueError(f"give 24 multipliers > 0 (one per hour of day) or none, got {len(v)}: {v}")
        return v


class TurnaroundLearning(BaseModel):
    """How the runtime learns a provider's batch turnaround from the batches it follows to their end
    (``engine.runtime.turnaround``); a policy declares it (``smart``'s ``turnaround`` parameter), so the
    simulator and every grouper learn alike. The estimate is per provider, model and hour of day."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    enabled: bool = Field(default=True, description="learn; off: the catalog's turnaround, always")
    epoch_s: float = Field(default=300.0, gt=0, description="observations take effect only at epochs of this "
                           "much engine time, so a decision never depends on when a message arrived")
    guard_s: float = Field(default=60.0, ge=0, description="an observation counts from the first epoch that "
                           "starts at least this long after its batch ended: its time to reach every grouper")
    prior_weight: float = Field(default=4.0, gt=0, description="the catalog's turnaround counts as this many "
                                "observed batches")
    hour_weight: float = Field(default=4.0, gt=0, description="an hour of day starts from the estimate over "
                               "all hours, counted as this many of its own batches")
    half_life_s: float = Field(default=6 * 3600.0, gt=0, description="engine seconds over which an "
                               "observation's weight halves, so the estimate follows today's turnaround")
    by_hour: bool = Field(default=True, description="keep an estimate per hour of day of engine time")
    doubt_z: float = Field(default=2.0, ge=0, description="move off the catalog's median (and an hour off the "
                           "day's) only by what lies beyond this many standard errors of the fit: a right catalog "
                           "stays as it is, a wrong one shows at once; 0: the plain fit")


class CacheSettings(MaskedRepr, BaseModel):
    """The result cache of the live engine (``SMARTBATCH_CACHE__REDIS_URL=redis://host:6379/0`` and so on)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    masked_urls: ClassVar[tuple[str, ...]] = ("redis_url",)  # its repr's: a password (``MaskedRepr``)
    memory_max_entries: int = Field(default=100_000, ge=1, description="entries kept in the process")
    memory_max_mb: float = Field(default=512.0, gt=0, description="bytes kept in the process, in MiB")
    ttl_s: float = Field(default=7 * 86400.0, gt=0, description="how long a result may be reused, per entry")
    redis_url: str | None = Field(default=None, description="None: memory only; else a redis:// URL")
    redis_prefix: str = Field(default="smartbatch", min_length=1, description="namespace of every key")
    redis_cluster: bool = Field(default=False, description="redis_url is a node of a Redis Cluster (docs/cache.md, "
                                "Redis Cluster)")
    redis_timeout_s: float = Field(default=0.25, gt=0, description="a slower Redis answer counts as down")
    redis_retry_s: float = Field(default=5.0, gt=0, description="wait before trying a down Redis again")
    blob_dir: Path | None = Field(default=None, description="blob store directory (None: <tmp>/smartbatch-blobs)")
    blob_min_kb: float = Field(default=64.0, ge=0, description="outputs larger than this go to the blob store")
    share_across_tenants: bool = Field(default=False, description="let one tenant reuse another's results")
    warm_max_entries: int = Field(default=200_000, ge=0, description="entries read from Redis at start-up")
    near_max_entries: int = Field(default=200_000, ge=1, description="rows of the near-duplicate index; the "
                                  "oldest leave first")
    near_max_mb: float = Field(default=256.0, gt=0, description="prompt text and vectors in the near-duplicate "
                               "index, in MiB; the oldest rows leave first")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return check_redis_url(v, "cache.redis_url")


class MetricsSettings(BaseModel):
    """Where the engine serves Prometheus metrics (``SMARTBATCH_METRICS__HOST``, ``SMARTBATCH_METRICS__PORT``) and
    how many tenants get a label value of their own (``SMARTBATCH_METRICS__MAX_TENANTS``): callers name tenants
    freely, and every value is a series kept for the life of the hub and sent at every scrape."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    host: str = Field(default="127.0.0.1", min_length=1, description="address to bind; 0.0.0.0 to be scraped from "
                      "other machines")
    port: int | None = Field(default=0, ge=0, le=65535, description="0: a free port; None: not served")
    max_tenants: int = Field(default=100, ge=0, description="distinct tenant label values a hub shard exports; "
                             "tenants seen later count under tenant=\"_other\" (0: every tenant does)")


class JournalSettings(MaskedRepr, BaseModel):
    """Where the engine journals what must survive an actor's restart (``SMARTBATCH_JOURNAL__REDIS_URL``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    masked_urls: ClassVar[tuple[str, ...]] = ("redis_url",)  # its repr's: a password (``MaskedRepr``)
    redis_url: str | None = Field(default=None, description="None: the budgets' or the cache's Redis when one is "
                                  "set, else the result hub's memory")
    redis_cluster: bool = Field(default=False, description="journal.redis_url is a node of a Redis Cluster (the "
                                "budgets' or the cache's setting goes with their URL)")
    in_memory: bool = Field(default=False, description="keep the journal in the result hub's memory even where a "
                            "Redis is set (the engine sets it when the cache's Redis, which it would fall back "
                            "to, may evict keys)")
    dir: Path | None = Field(default=None, description="a directory on this machine where the dispatchers journal "
                             "their provider batches and calls, in files that outlive every process of the engine "
                             "(the engine must run on this machine): a job's crash insurance (``take_back``; "
                             "``smartbatch batch`` sets it beside its output file for ``--resume``)")
    take_back: bool = Field(default=True, description="with dir, real providers: an engine a driver starts first "
                            "collects what one killed on that directory left (its batches cancelled and read, the "
                            "answers its driver had), and answers the same requests submitted again from it")
    archive_s: float = Field(default=3 * 86400.0, gt=0.0, description="with journal.dir: how long the record of a "
                             "provider batch that ended is kept (its output can be read again after a crash; a "
                             "service's journal would grow without a bound)")
    ledger_wait_s: float = Field(default=10.0, ge=0.0, le=3600.0, allow_inf_nan=False, description="at an engine's "
                                 "stop, real seconds it waits for a Redis budget ledger that is away to take the "
                                 "settlements and charges waiting for it; what is left then is kept in ledger_dir")
    ledger_dir: Path | None = Field(default=None, description="where a stop keeps what a Redis budget ledger had not "
                                    "taken, for the next engine on that ledger to send (None: <dir>/.budget-outbox "
                                    "with journal.dir, else $XDG_STATE_HOME/smartbatch/budget-outbox, "
                                    "~/.local/state/smartbatch/budget-outbox by default)")
    recover_wait_s: float = Field(default=60.0, ge=0.0, description="real seconds a restarted dispatcher keeps "
                                  "trying to read an unreadable journal (work waits meanwhile) before it sends "
                                  "the members of its open batches again, which may bill them twice")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        return check_redis_url(v, "journal.redis_url")


class Settings(BaseSettings):
    """Environment: ``SMARTBATCH_<FIELD>``, nested with ``__`` (``SMARTBATCH_DEADLINES__URGENT=60``)."""

    model_config = SettingsConfigDict(env_prefix="SMARTBATCH_", env_nested_delimiter="__", frozen=True,
                                      extra="forbid")
    catalog_path: Path | None = None
    deadlines: DeadlineDefaults = DeadlineDefaults()
    sim: SimSettings = SimSettings()
    cache: CacheSettings = CacheSettings()
    budgets: BudgetSettings = BudgetSettings()
    resilience: Resilience = Resilience()
    providers: ProvidersSettings = ProvidersSettings()
    metrics: MetricsSettings = MetricsSettings()
    journal: JournalSettings = JournalSettings()
    catalog_overlay: Path | None = Field(default=None, description="YAML merged over the catalog: adds or "
                                         "overrides providers, models and prices")
    # At least 1: a token holds at least a character, and the bound a budget reserves for a prompt's bytes
    # (``cost.input_bound``) tells a real prompt from a trace's placeholder by it (a review).
    chars_per_token: float = Field(default=4.0, ge=1.0, description="token estimate for a line without counts")
    batch_results_max_mb: float = Field(default=512.0, gt=0, description=(
        "MiB of images one provider batch's results may hold, as a dispatcher reads them: an image dispatch to a "
        "batch API goes as batches whose results lines' bounds sum to at most this (a line: its image at the size "
        "and format asked, stored uncompressed, a png at 4 bytes a pixel of RGBA, in base64: over 8 MiB at "
        "1536x1024, so 62 such images a batch); a dispatcher reads one such batch at a time, and beside it, batches "
        "past their hedges within this much more; text is not cut by it"))
    # A try of a results read is bounded by its file's size bound at this rate (``ResultsReads._read_bound_s``):
    # a server that trickles a byte inside the endpoint's timeout_s, for ever, held the read and its members.
    batch_results_min_kib_s: float = Field(default=64.0, gt=0, description=(
        "KiB a second below which a try at reading an ended provider batch's results is given up and made again "
        "(the file stays at the provider; reading it again is free, its members are never sent again): a try may "
        "take its calls' timeout_s and its results' size bound at this rate"))
    batch_results_read_max_s: float = Field(default=3600.0, gt=0, description=(
        "engine seconds past an ended batch's hedge (or the first read, if later) that tries at reading its "
        "results too slowly are made again; then every member fails, possibly billed (its budget keeps its bound), "
        "with an error naming the batch and its results file, to fetch by hand: it ran, and sent again it would be "
        "paid twice"))
    default_output_tokens: int = Field(default=256, ge=0, description="output estimate for a text line without one")
    prefix_block_tokens: int = Field(default=512, ge=1, description="tokens per prefix block id in traces")
    actor_hang_s: float = Field(default=30.0, ge=0, description=(
        "seconds an engine actor may leave every health check unanswered before the driver that started the engine "
        "kills it, so Ray restarts it and its open work is re-admitted (a hung actor would hold it forever); "
        "0 turns it off"))
    actor_restart_wait_s: float = Field(default=600.0, ge=0, description=(
        "real seconds an engine actor may stay restarting (Ray cannot place it: on a cluster, no live node offers "
        "its resources, such as a dispatcher's provider:<name>) before the driver counts it gone and fails the "
        "open requests with the reason, as for an actor that died; long enough for an autoscaler's new node; "
        "0 waits for ever. Requests whose calls a restarting ingest refuses wait for it the longer of this and "
        "120 s before they fail"))
    hedge_lag_s: float = Field(default=0.5, ge=0, description=(
        "real seconds a live engine's hedge takes beyond what its figures in engine time count (the cancel's "
        "round trip, the members' way back through the grouper, the fallback's dispatch): at speed-up k the "
        "engine plans every batch API's cancel_s k times this longer, so a time-compressed replay keeps its "
        "deadlines; the simulator has no such lag"))
    stop_drain_s: float = Field(default=600.0, ge=0, description=(
        "real seconds a driver that started the engine waits, when its with block is left on an error or Ctrl-C "
        "(not a SIGTERM) or `smartbatch run` gets Ctrl-C with work under way, for the cancelled provider batches "
        "to end, so what they finished (billed) is answered and counted; a second Ctrl-C leaves at once; 0 leaves "
        "at once, those members billed and not read"))
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="WARNING", description="the level from which the actors' log lines reach the drivers' logging "
        "(loggers smartbatch.*)")

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _budget_redis_url(self) -> Settings:
        check_redis_url(self.budgets.redis_url, "budgets.redis_url")
        check_env_names(type(self).model_fields)
        return self

    def journal_redis_url(self) -> str | None:
        """The Redis the journal uses: its own setting, else the budgets', else the cache's (None: memory)."""
        if self.journal.in_memory:
            return None
        return self.journal.redis_url or self.budgets.redis_url or self.cache.redis_url

    def journal_redis_cluster(self) -> bool:
        """Whether the journal's Redis (``journal_redis_url``) is a Redis Cluster: the setting beside that URL."""
        if self.journal.redis_url:
            return self.journal.redis_cluster
        return self.budgets.redis_cluster if self.budgets.redis_url else self.cache.redis_cluster


def check_redis_url(url: str | None, setting: str) -> str | None:
    """A Redis URL redis-py can use (``redis://``, ``rediss://`` or ``unix://``), checked when the settings are
    built. It raises ``ConfigError`` itself rather than a ``ValueError``, so pydantic lets it through as is:
    ``Settings()``, and so ``Engine.start``, fail with it before any actor starts (a bad URL used to surface
    later as ``ActorDiedError``). The message never shows a password."""
    if url is None:
        return None
    env = f"{ENV_PREFIX}{setting.replace('.', '__').upper()}"
    shown = masked_url(url)
    fix = (f"set {setting} ({env}) to redis://HOST:6379/0, rediss://HOST:6380/0 (TLS) or "
           "unix:///path/to/redis.sock, or leave it unset")
    try:
        parts = urlsplit(url)
        port = parts.port  # raises on a port that is not a number in 0..65535
    except ValueError:  # its words quote what it took for the port or host: a piece of a password, maybe
        raise ConfigError(f"setting {setting} = {shown!r} is not a Redis URL (its port is not a number in 0..65535, "
                          "or its host part cannot be read; a password's /, ? and # are written %2F, %3F and %23); "
                          f"{fix}") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        why = f"scheme {parts.scheme!r} is not redis, rediss or unix" if parts.scheme else "it has no scheme"
        raise ConfigError(f"setting {setting} = {shown!r} is not a Redis URL: {why}; {fix}")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"setting {setting} = {shown!r} names no socket path; {fix}")
        return url
    db = parts.path.strip("/")
    if not parts.hostname or (db and not db.isdigit()) or port == 0:
        why = "names no host" if not parts.hostname else ("has port 0" if port == 0 else
                                                           f"has database {db!r}, not a number")
        raise ConfigError(f"setting {setting} = {shown!r} {why}; {fix}")
    return url


@functools.cache
def default_settings() -> Settings:
    """The process's settings from the environment, read once (``load_settings`` on first use). What validates
    a ``Request`` without a context: reading ``SMARTBATCH_*`` costs milliseconds, a request microseconds. An
    engine or a simulation reads its own settings once and passes them down; ``default_settings.cache_clear()``
    reads the environment again."""
    return load_settings()


def load_settings(**values: Any) -> Settings:
    """``Settings(**values)`` on top of the environment, with any problem raised as one ``ConfigError`` that
    names the setting, the ``SMARTBATCH_*`` variable it came from and what to change (the CLI's way in;
    pydantic's own report runs to dozens of lines)."""
    try:
        return Settings(**values)
    except ValidationError as exc:
        errors = exc.errors()
        parts = [explain(e, Settings) for e in errors[:3]]
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        raise ConfigError("; ".join(parts) + more) from exc
    except SettingsError as exc:  # a nested setting that is not valid JSON
        m = re.search(r'field "([^"]+)"', str(exc))
        name = m.group(1) if m else "?"
        cause = f" ({exc.__cause__})" if exc.__cause__ else ""
        raise ConfigError(f"setting {name} (from {env_names([name])}): cannot parse its value{cause}; write it "
                          "as JSON, e.g. SMARTBATCH_BUDGETS__SPECS='[{\"max_budget\": 50}]'") from exc


def with_budget(settings: Settings, total_usd: float | None = None,
                tenants: Mapping[str, float] | None = None, duration: str | None = None,
                horizon_s: float | None = None) -> Settings:
    """``settings`` plus a hard budget over everything (``total_usd``) and per tenant, each over
    ``duration`` (None: the whole run, paced over ``horizon_s`` seconds when given)."""
    for what, usd in (("budget_usd (--budget)", total_usd),
                      *((f"the budget of tenant {t!r} (--tenant-budget)", u) for t, u in (tenants or {}).items())):
        if usd is not None and (isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd < math.inf):
            raise ConfigError(f"{what} must be a number of US dollars >= 0, got {usd!r}")
        # Past the bound the start refuses it (``check_budgets``), which named the settings for a flag's budget.
        if usd is not None and (why := limit_problem(usd, "leave it out")) is not None:
            raise ConfigError(f"{what} = {usd!r}: {why}")
    specs = list(settings.budgets.specs)
    horizon = horizon_s if duration is None and horizon_s and horizon_s > 0 else None
    added = []
    if total_usd is not None:
        added.append(("budget_usd (--budget)", BudgetSpec(max_budget=total_usd, budget_duration=duration,
                                                          horizon_s=horizon)))
    for tenant, usd in (tenants or {}).items():
        added.append((f"the budget of tenant {tenant!r} (--tenant-budget)",
                      BudgetSpec(tenant=tenant, max_budget=usd, budget_duration=duration, horizon_s=horizon)))
    for what, spec in added:
        # Said here, naming both sources: the settings' own check came out as "--budget-duration None: two
        # budgets cover ['global']", a flag not given, and not where the other budget came from (a new user's tour).
        if any(s.name == spec.name for s in specs):
            raise ConfigError(f"{what} covers {spec.name!r}, as a budget of settings.budgets.specs "
                              f"(SMARTBATCH_BUDGETS__SPECS) already does; give that budget in one place")
        specs.append(spec)
    budgets = BudgetSettings.model_validate({**settings.budgets.model_dump(), "specs": specs})
    return settings.model_copy(update={"budgets": budgets})
