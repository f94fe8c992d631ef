"""The emulator's state and the one text/image generation rule that sync calls and batch members share."""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np

from engine.core.catalog import Catalog, ModelSpec, ProviderSpec
from engine.core.clock import ScaledClock
from engine.core.cost import CacheSplit, Price, price_alone, price_text
from engine.core.errors import ConfigError
from engine.core.latency import sync_latency_median
from engine.core.request import Request, validation_context
from engine.core.settings import Settings
from engine.emulator._bill import BilledItem, Ledger
from engine.emulator._cache import PromptCaches
from engine.emulator._schema import Answer
from engine.emulator._text import Prompt, natural_tokens
from engine.emulator._wire import ApiError, Dropped

_log = logging.getLogger("engine.emulator")
# Enough for a demo or a test to read every record back, and a few tens of MB at most (an Idempotency-Key's kept
# answer is the largest record: its whole reply body).
KEEP_RECORDS = 10_000
# An Idempotency-Key's answer is kept at least this long (emulator seconds), whatever keep_records says: six times
# an endpoint's default timeout_s (600 s), so an engine's retries of one key, which come within a call's timeout
# and its backoff, find it (an engine at the emulator's speed-up; a restart's resends, if they come within it).
KEEP_ANSWERS_S = 3600.0

__all__ = ["EMULATED_AUTO_QUALITY", "Core", "FileRecord", "TextCall"]

EMULATED_AUTO_QUALITY = "medium"  # the quality an image asked at "auto" (or at none) is made at, here

BillMode = Literal["sync", "batch_api", "flex"]


class TextCall(NamedTuple):
    provider: str
    model: str
    split: CacheSplit
    output_tokens: int
    text: str
    capped: bool
    price: Price
    thoughts: int = 0  # of output_tokens, those the model thought (billed as output; not in the text)
    args: str | None = None  # a forced tool call's arguments (JSON, billed as output), None without one

    @property
    def input_tokens(self) -> int:
        return self.split.read + self.split.write + self.split.plain

    def usage(self) -> dict[str, int | str]:
        u: dict[str, int | str] = {"input_tokens": self.input_tokens, "cache_read_tokens": self.split.read,
                                   "cache_write_tokens": self.split.write, "plain_input_tokens": self.split.plain,
                                   "output_tokens": self.output_tokens}
        if self.split.write_1h:
            u["cache_write_1h_tokens"] = self.split.write_1h
        return {**u, "thought_tokens": self.thoughts} if self.thoughts else u


class FileRecord(NamedTuple):
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: float

    def view(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": len(self.data), "created_at": int(self.created_at),
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


class Core:
    """State shared by every route: clock, seeded draws, caches, ledger, files and batches.

    ``lock`` guards all of it; a handler takes it for bookkeeping and never while it sleeps a latency.
    """

    def __init__(self, catalog: Catalog, *, speedup: float, seed: int, default_output_tokens: int,
                 latency_scale: float, stopping: threading.Event, validating_s: float = 1.0,
                 finalizing_s: float = 1.0, cancel_s: float = 30.0, keep_records: int = KEEP_RECORDS):
        if keep_records < 0:
            raise ConfigError(f"keep_records must be >= 0 (how many call records, billed items and "
                              f"Idempotency-Key answers the emulator keeps), got {keep_records}")
        self.keep_records = keep_records
        if speedup <= 0:
            raise ConfigError(f"speedup must be > 0 (emulator seconds per real second), got {speedup}")
        if latency_scale < 0:
            raise ConfigError(f"latency_scale must be >= 0 (0: sync calls answer at once), got {latency_scale}")
        self.catalog = catalog
        self.seed = seed
        self.default_output_tokens = default_output_tokens
        self.latency_scale = latency_scale
        for name, v in (("validating_s", validating_s), ("finalizing_s", finalizing_s), ("cancel_s", cancel_s)):
            if v < 0:
                raise ConfigError(f"{name} must be >= 0 emulator seconds, got {v}")
        self.validating_s, self.finalizing_s, self.cancel_s = validating_s, finalizing_s, cancel_s
        self.stopping = stopping
        wall = time.time()
        # Emulator time is a virtual unix time: it starts at the wall clock and runs `speedup` times faster,
        # so timestamps look real and a compressed replay sees compressed latencies, turnarounds and TTLs.
        self.clock = ScaledClock(epoch=wall, speedup=speedup, offset=wall)
        self.lock = threading.RLock()
        self._draws = None
        self._world = None  # a TurnaroundWorld to follow (engine.core.draws), with the draws
        self.members_together = False
        self._settings = Settings()
        self.reset()

    def reset(self) -> None:
        with self.lock:
            self.caches = PromptCaches()
            self.ledger = Ledger(self.keep_records)
            self._told_dropped: set[str] = set()
            self.files: dict[str, FileRecord] = {}
            self.batches: dict[str, Any] = {}
            self.videos: dict[str, Any] = {}  # the Videos API's jobs by id (``_videos``), newest last
            # Each batch's own "run what is due by t" step, so one call can bring every batch up to date.
            self.advancers: dict[str, Callable[[float], None]] = {}
            self._lat_rng = np.random.default_rng([self.seed, 3])
            self.batch_rng = np.random.default_rng([self.seed, 2])
            self._ids = itertools.count(1)

    def now(self) -> float:
        return self.clock.now()

    def advance_batches(self) -> None:
        """Bring every batch up to now (running and billing the members that finished)."""
        with self.lock:
            now = self.now()
            for step in list(self.advancers.values()):
                step(now)

    def follow(self, clock, draws, world=None) -> None:
        """Run on ``clock`` (an engine's clock) and take batch turnarounds from ``draws`` (an
        ``engine.core.draws.Draws``) by submission time, with every member finishing at the batch's end, as the
        simulator does: a live run over HTTP then faces the batches its simulated twin faces, so their bills
        compare."""
        with self.lock:
            self.clock, self._draws, self._world = clock, draws, world
            self.members_together = True

    def draw_turnaround(self, provider: ProviderSpec) -> float:
        """A batch's turnaround (in_progress to its last member), from the catalog's lognormal."""
        assert provider.batch_api is not None
        with self.lock:
            if self._draws is not None:
                return self._draws.turnaround(provider.name, provider.batch_api, max(self.now(), 0.0), self._world)
            u = float(self.batch_rng.random())
        return provider.batch_api.turnaround_quantile(u)

    def new_id(self, prefix: str) -> str:
        with self.lock:
            n = next(self._ids)
        return f"{prefix}{self.seed:04x}{n:020x}"

    # -- models ----------------------------------------------------------------------------------------------
    def model(self, provider: str, name: Any, kind: str) -> tuple[ProviderSpec, ModelSpec]:
        p = self.catalog.provider(provider)
        if not isinstance(name, str) or not name:
            raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
        spec = p.models.get(name)
        if spec is None:
            raise ApiError(404, f"The model `{name}` does not exist at {provider}; it offers {sorted(p.models)}",
                           param="model", code="model_not_found")
        if spec.kind != kind:
            raise ApiError(400, f"model {name!r} generates {spec.kind}, not {kind}", param="model")
        return p, spec

    # -- text ------------------------------------------------------------------------------------------------
    def text_call(self, provider: ProviderSpec, spec: ModelSpec, model: str, prompt: Prompt, cap: Any,
                  cap_param: str, mode: BillMode, at: float | None = None, thoughts: int = 0,
                  answer: Answer = Answer()) -> TextCall:
        """Count, cache and price one text call made at emulator time ``at`` (default: now). The cache is
        updated at once, as a provider caches the prompt at prefill. ``thoughts``: tokens the model thinks
        first, within the cap (as Gemini's maximum output counts them), billed as output. ``answer``: what the
        model writes (lorem text, JSON of a schema, a forced tool call: ``_schema``), billed as the tokens it is."""
        given = cap if isinstance(cap, int) and not isinstance(cap, bool) else 0  # a cap counts if asked
        if cap is None:
            cap = spec.max_output_tokens
        elif isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ApiError(400, f"{cap_param} must be an integer >= 1, got {cap!r}", param=cap_param)
        elif cap > spec.max_output_tokens:
            raise ApiError(400, f"{cap_param} is too large: {cap}. {model} supports at most "
                           f"{spec.max_output_tokens} output tokens", param=cap_param)
        # The window is checked before the cache is touched: the provider refuses the call at once.
        need = prompt.tokens + given
        if (spec.max_input_tokens is not None and prompt.tokens > spec.max_input_tokens) or (
                spec.context_window is not None and need > spec.context_window):
            raise ApiError(400, f"This model's maximum context length is {spec.context_window} tokens (input at most "
                           f"{spec.max_input_tokens or spec.context_window}). However, you requested {need} tokens "
                           f"({prompt.tokens} of input, {given} of {cap_param}). Please reduce the length of the "
                           f"messages or {cap_param}.", code="context_length_exceeded")
        natural = natural_tokens(prompt.last_user, self.default_output_tokens)
        thoughts = min(thoughts, cap - 1)
        written = answer.write(prompt.text, natural, cap - thoughts)
        pc = provider.cache_of(spec)
        use_cache = pc is not None and (mode != "batch_api" or pc.stacks_with_batch)
        with self.lock:
            split = (self.caches.use(provider, spec, model, prompt, self.now() if at is None else at) if use_cache
                     else CacheSplit(0, 0, prompt.tokens))
        price = price_text(provider, spec, split, written.tokens + thoughts, mode)
        return TextCall(provider.name, model, split, written.tokens + thoughts, written.text, written.capped, price,
                        thoughts, written.args)

    def bill_text(self, call: TextCall, mode: BillMode, route: str, request_id: str,
                  custom_id: str | None = None, idempotency_key: str | None = None) -> None:
        self.bill(BilledItem(provider=call.provider, model=call.model, mode=mode, route=route,
                             request_id=request_id, custom_id=custom_id, idempotency_key=idempotency_key,
                             usage=call.usage(), cost_usd=call.price.total))

    def bill(self, item: BilledItem) -> None:
        with self.lock:
            if self.ledger.add(item):
                self.dropped("billed items (bill().items)")

    def dropped(self, what: str, older: str = "") -> None:
        """Say once (until ``reset``) that the oldest ``what`` are no longer kept: a reader of the records alone
        would otherwise take a long run's last records for all of it. ``older``: which older ones go, and what
        follows (for the answers, a key sent again bills again), in place of the totals' word."""
        with self.lock:
            if what in self._told_dropped:
                return
            self._told_dropped.add(what)
        _log.warning("the emulator keeps the latest %d %s and drops older ones %s(keep_records, `smartbatch emulate "
                     "--keep-records`)%s", self.keep_records, what, f"{older} " if older else "",
                     "" if older else "; its totals and counts (bill(), count(), counters(), GET /_emulator/bill, "
                     "GET /_emulator/counts) still cover every one")

    # -- images ----------------------------------------------------------------------------------------------
    def image_request(self, provider: ProviderSpec, model: str, prompt: str, size: str,
                      quality: str | None = None) -> Request:
        spec = provider.models[model]
        if quality in (None, "auto"):  # the provider picks: the emulator always picks medium
            quality = EMULATED_AUTO_QUALITY if spec.per_image_quality else None
        params = {"size": size} if quality is None else {"size": size, "quality": quality}
        return Request.model_validate(
            {"id": "emulator", "arrival_s": 0.0, "provider": provider.name, "model": model, "kind": "image",
             "prompt": prompt, "params": params},
            context=validation_context(self.catalog, self._settings))

    def video_request(self, provider: ProviderSpec, model: str, prompt: str, resolution: str,
                      duration_s: float) -> Request:
        return Request.model_validate(
            {"id": "emulator", "arrival_s": 0.0, "provider": provider.name, "model": model, "kind": "video",
             "prompt": prompt, "params": {"resolution": resolution, "duration_s": duration_s}},
            context=validation_context(self.catalog, self._settings))

    def image_price(self, req: Request, mode: BillMode = "sync") -> Price:
        """Price of one image, from the cost model (per-image list price and its prompt's tokens, or GPU time for
        GPU-priced models), in ``mode`` (a batch line's at the batch API's discount)."""
        return price_alone(req, self.catalog, mode)

    # -- latency ---------------------------------------------------------------------------------------------
    def text_latency_s(self, provider: ProviderSpec, model: str, call: TextCall) -> float:
        req = Request.model_validate(
            {"id": "emulator", "arrival_s": 0.0, "provider": provider.name, "model": model, "kind": "text",
             "input_tokens": call.input_tokens, "output_tokens": call.output_tokens},
            context=validation_context(self.catalog, self._settings))
        return self._draw(sync_latency_median(provider, provider.models[model], req), provider.sync_latency.sigma)

    def image_latency_s(self, provider: ProviderSpec, req: Request) -> float:
        ml = provider.media_latency
        sigma = ml.sigma if ml is not None else provider.sync_latency.sigma
        return self._draw(sync_latency_median(provider, provider.models[req.model], req), sigma)

    def _draw(self, median: float, sigma: float) -> float:
        with self.lock:
            z = float(self._lat_rng.standard_normal())
        return median * math.exp(sigma * z)

    def wait(self, virtual_s: float) -> None:
        """Sleep ``virtual_s`` emulator seconds (scaled by ``latency_scale``); raise Dropped if stopping."""
        real = self.clock.real_delay(virtual_s) * self.latency_scale
        if real > 0 and self.stopping.wait(real):
            raise Dropped("emulator stopping")
        if self.stopping.is_set():
            raise Dropped("emulator stopping")

    # -- files -----------------------------------------------------------------------------------------------
    def add_file(self, filename: str, purpose: str, data: bytes) -> FileRecord:
        rec = FileRecord(self.new_id("file-"), filename, purpose, data, self.now())
        with self.lock:
            self.files[rec.id] = rec
        return rec

    def drop_file(self, file_id: str) -> FileRecord:
        rec = self.file(file_id)
        with self.lock:
            self.files.pop(file_id, None)
        return rec

    def file(self, file_id: str) -> FileRecord:
        with self.lock:
            rec = self.files.get(file_id)
        if rec is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id", code="file_not_found")
        return rec
