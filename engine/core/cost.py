"""The one cost model. Every dollar figure in smartbatch comes from these functions.

The rules and formulas are stated in docs/cost-model.md; this module is their only implementation (with
``engine.core._cost_cache``, the prompt cache's token counts).
Modes: ``sync`` (one call, list price), ``batch_api`` (provider batch API, discounted), ``gpu_batch``
(compatible jobs share one warm-up on a GPU-priced provider), ``reuse`` (served from our cache: free), ``flex``
(one call at the provider's flex tier: batch prices, a sync call's prompt cache, sometimes refused).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal, NamedTuple

from engine.core._cost_cache import (
    CacheSplit,
    cache_read_multiplier,
    cache_split,
    cached_blocks,
    call_marks,
    entry_marks,
    left_warm,
    mark_room,
    min_cacheable_tokens,
    shared_prefix_depths,
    shared_prefix_marks,
    warm_run,
)
from engine.core.body_tokens import sends_prompt, split_body
from engine.core.catalog import Catalog, ModelSpec, ProviderSpec
from engine.core.errors import CatalogError
from engine.core.request import Request

__all__ = [
    "MODES",
    "CacheSplit",
    "Mode",
    "Price",
    "cache_read_multiplier",
    "cache_split",
    "cached_blocks",
    "call_marks",
    "entry_marks",
    "gpu_share_price",
    "gpu_unit_seconds",
    "left_warm",
    "mark_room",
    "list_price_text",
    "min_cacheable_tokens",
    "mode_allowed",
    "mode_factor",
    "price_alone",
    "price_batch",
    "price_text",
    "price_usage",
    "reserve_bound",
    "shared_prefix_depths",
    "shared_prefix_marks",
    "token_prices",
    "warm_run",
]

Mode = Literal["sync", "batch_api", "gpu_batch", "reuse", "flex"]
MODES: tuple[Mode, ...] = ("sync", "batch_api", "gpu_batch", "reuse", "flex")
_M = 1e-6


class Price(NamedTuple):
    """USD of one request, split so a report can say where the money went."""

    total: float
    input: float = 0.0
    cached_input: float = 0.0
    cache_write: float = 0.0
    output: float = 0.0
    media: float = 0.0


def mode_factor(provider: ProviderSpec, mode: Mode) -> float:
    """What ``mode`` multiplies list prices by: one minus the batch API's (or the flex tier's) discount, else 1."""
    tier = provider.batch_api if mode == "batch_api" else provider.flex if mode == "flex" else None
    return 1.0 - tier.discount if tier is not None else 1.0


def token_prices(spec: ModelSpec, input_tokens: int = 0) -> tuple[float, float]:
    """List USD per input token and per output token of a text model, for a call of ``input_tokens`` (its
    whole prompt, cached tokens included): past the model's ``long_context`` tier the whole call costs more."""
    lc = spec.long_context
    if lc is not None and input_tokens > lc.above_input_tokens:
        return lc.input_per_mtok * _M, lc.output_per_mtok * _M
    return spec.input_per_mtok * _M, spec.output_per_mtok * _M  # type: ignore[operator]


def list_price_text(spec: ModelSpec, input_tokens: int, output_tokens: int, long_input_tokens: int = 0,
                    long_output_tokens: int = 0) -> float:
    """List (sync, uncached) USD of text tokens; ``long_*``: those of them in calls past the model's
    ``long_context`` tier (``engine.core.grouping.token_sums``), at its prices."""
    usd = (input_tokens * spec.input_per_mtok + output_tokens * spec.output_per_mtok) * _M  # type: ignore[operator]
    if (lc := spec.long_context) is None or not (long_input_tokens or long_output_tokens):
        return usd
    return usd + (long_input_tokens * (lc.input_per_mtok - spec.input_per_mtok)  # type: ignore[operator]
                  + long_output_tokens * (lc.output_per_mtok - spec.output_per_mtok)) * _M  # type: ignore[operator]


def gpu_share_price(provider: ProviderSpec, unit_s: float, b: int) -> float:
    """USD of one job's share of a GPU batch of ``b`` jobs: its unit seconds at the batch's speed-up plus an
    equal share of the warm-up."""
    gb = provider.gpu_batching
    assert gb is not None  # ensured by ProviderSpec validation for GPU-priced models
    return gb.price_per_gpu_s * (gb.setup_s / b + unit_s / gb.speedup_at(b))


def mode_allowed(provider: ProviderSpec, spec: ModelSpec, mode: Mode) -> bool:
    """Whether ``mode`` exists for this model at this provider (capabilities are declared in the catalog)."""
    if mode in ("sync", "reuse"):
        return True
    if mode == "batch_api":
        return provider.supports_batch_api(spec.kind, spec)
    if mode == "flex":  # by value: a spec does not know its own name, and a runtime's view copies them
        return provider.flex is not None and any(provider.models.get(m) == spec for m in provider.flex.models)
    return spec.gpu_priced  # gpu_batch


def _check_mode(provider: ProviderSpec, spec: ModelSpec, model: str, mode: Mode) -> None:
    if not mode_allowed(provider, spec, mode):
        raise CatalogError(f"mode {mode!r} is not available for {provider.name}/{model}: {_missing(provider, spec, mode)}")


def _missing(provider: ProviderSpec, spec: ModelSpec, mode: Mode) -> str:
    """The declaration a refused mode lacks: the field an overlay would change (a provider that batches images
    but not Imagen was said to batch no images at all, a review)."""
    ba, fx = provider.batch_api, provider.flex
    if mode == "batch_api":
        if ba is None:
            return "the provider declares no batch_api"
        if spec.kind not in ba.kinds:
            return f"batch_api.kinds {list(ba.kinds)} does not list {spec.kind!r}"
        return f"batch_api.media_models {list(ba.media_models or ())} does not list it"
    if mode == "flex":
        return "the provider declares no flex tier" if fx is None else f"flex.models {list(fx.models)} does not list it"
    return "the model is not GPU-priced"


def price_text(provider: ProviderSpec, spec: ModelSpec, split: CacheSplit, output_tokens: int,
               mode: Mode) -> Price:
    """Price of a text call with its input split into cache read / write / plain tokens."""
    if mode == "reuse":
        return Price(0.0)
    pc = provider.cache_of(spec)
    f = mode_factor(provider, mode)
    p_in, p_out = token_prices(spec, split.read + split.write + split.plain)
    if pc is not None and (mode != "batch_api" or pc.stacks_with_batch):
        cached, plain = f * p_in * pc.read_multiplier * split.read, f * p_in * split.plain
        write = f * p_in * pc.write_multiplier * split.write  # a one-hour write adds its dearer multiplier's rest
        write += f * p_in * ((pc.write_1h_multiplier or pc.write_multiplier) - pc.write_multiplier) * split.write_1h
    else:
        cached, write, plain = 0.0, 0.0, f * p_in * (split.read + split.write + split.plain)
    out = f * p_out * output_tokens
    return Price(plain + cached + write + out, plain, cached, write, out)


def price_usage(req: Request, catalog: Catalog, mode: Mode, *, input_tokens: int, output_tokens: int,
                cache_read: int = 0, cache_write: int = 0) -> Price:
    """What a provider bills for a call that reported this usage: ``input_tokens`` counts every input token,
    the cached and cache-written ones included. Media: the catalog's unit price (one image or video), and the
    prompt's text tokens where the catalog prices them (``input_tokens``: as counted, else the estimate)."""
    provider = catalog.provider(req.provider)
    spec = catalog.model(req.provider, req.model)
    if spec.kind != "text":
        if spec.gpu_priced or not input_tokens:
            return price_alone(req, catalog, "sync" if mode == "gpu_batch" else mode)
        return _media_price(provider, spec, req, mode, input_tokens)
    read = max(min(cache_read, input_tokens), 0)
    write = max(min(cache_write, input_tokens - read), 0)
    return price_text(provider, spec, CacheSplit(read, write, input_tokens - read - write), output_tokens, mode)


def gpu_unit_seconds(spec: ModelSpec, params: dict) -> float:
    """GPU seconds one job needs at batch size 1, without the warm-up. A diffusion job's time is linear in its
    sampler steps: the catalog's seconds are at ``gpu_steps``, so a job asking for more steps pays (and reserves,
    and is planned) for them. Read as the table alone, ``steps: 1000`` on flux-1-dev (28) was priced 36x low and a
    hard budget reserved a fraction of what a GPU-second bill charges."""
    if spec.gpu_s_per_image:
        unit = spec.gpu_s_per_image[str(params.get("size", spec.default_size))]
    elif spec.gpu_s_per_video_second:
        res = str(params.get("resolution", spec.default_resolution))
        unit = spec.gpu_s_per_video_second[res] * float(params.get("duration_s", spec.default_duration_s))
    else:
        raise CatalogError("model is not GPU-priced")
    steps = params.get("steps")
    return unit * steps / spec.gpu_steps if spec.gpu_steps and isinstance(steps, (int, float)) else unit


def _media_list_price(spec: ModelSpec, params: dict) -> float:
    """A hosted image is priced by its size and, where the catalog prices qualities, its quality: a quality it
    does not list ("auto": the provider picks) costs the dearest, so a reservation never guesses low. Priced at
    the default quality whatever it asked, a high-quality gpt-image-1 image cost 4x its figure."""
    if spec.per_image:
        size = str(params.get("size", spec.default_size))
        by_quality, quality = spec.per_image_quality or {}, params.get("quality")
        if quality is None or not by_quality:
            return spec.per_image[size]
        listed = (by_quality.get(str(quality)) or {}).get(size)
        return listed if listed is not None else max(t.get(size, spec.per_image[size]) for t in by_quality.values())
    if spec.per_second:
        res = str(params.get("resolution", spec.default_resolution))
        return spec.per_second[res] * float(params.get("duration_s", spec.default_duration_s))
    raise CatalogError("model has no per-unit price")


def price_alone(req: Request, catalog: Catalog, mode: Mode = "sync", *, warm_blocks: int = 0,
                write: bool = False, block_tokens: int = 512) -> Price:
    """Price of one request sent on its own under ``mode`` with ``warm_blocks`` of its prefix warm;
    ``write`` marks its whole prefix for caching at a provider with explicit caching."""
    provider = catalog.provider(req.provider)
    spec = catalog.model(req.provider, req.model)
    _check_mode(provider, spec, req.model, mode)
    if mode == "reuse":
        return Price(0.0)
    if spec.kind == "text":
        n = len(req.prefix_blocks)
        split = cache_split(provider, spec, req.input_tokens, n, warm_blocks, n if write else 0, block_tokens)
        return price_text(provider, spec, split, req.output_tokens, mode)
    if spec.gpu_priced:
        return price_batch([req], catalog, "gpu_batch" if mode == "sync" else mode, block_tokens=block_tokens)[0]
    return _media_price(provider, spec, req, mode, req.input_tokens)


def _media_price(provider: ProviderSpec, spec: ModelSpec, req: Request, mode: Mode, prompt_tokens: int) -> Price:
    """A hosted image or video: its unit price, and where the catalog prices it, its prompt's text tokens (an
    image's bill left them out: 27 % short for a 3,000-token prompt at gpt-image-1, a hunt)."""
    f = mode_factor(provider, mode)
    media = f * _media_list_price(spec, req.params)
    prompt = f * (spec.prompt_per_mtok or 0.0) * prompt_tokens / 1e6
    return Price(media + prompt, input=prompt, media=media)


def reserve_bound(req: Request, catalog: Catalog, mode: Mode, output_tokens: int | None = None) -> float:
    """An upper bound of what ``req`` can be billed when dispatched in ``mode``: what a budget reserves.

    Text: every input token at the dearer of the plain and cache-write prices (a cache read only lowers the
    bill), and the request's ``max_output_tokens`` cap, else ``output_tokens`` when given, else the model's
    maximum output, at the output price; the batch API's discount (the flex tier's) applies to both. Media: the price alone, which for GPU-priced work is one warm-up per job, the
    most a GPU batch share can cost.
    """
    if mode not in MODES:  # a misspelt mode would otherwise be priced as sync, silently
        raise ValueError(f"unknown mode {mode!r}: one of {MODES}")
    provider, spec = catalog.provider(req.provider), catalog.model(req.provider, req.model)
    _check_mode(provider, spec, req.model, mode)  # else a budget reserves a discount that no call gets
    if mode in ("reuse", "flex"):  # a flex call the tier does not serve reserves the standard price again
        return 0.0 if mode == "reuse" else reserve_bound(req, catalog, "sync", output_tokens) * mode_factor(provider, mode)
    if spec.kind != "text":
        if spec.per_image_quality and req.params.get("quality") is None:
            # Sent without a quality, the image is made at the provider's default, "auto": the provider picks,
            # and it may pick the dearest (a helper's fault hunt: reserved at medium, billed up to 4x that).
            req = req.model_copy(update={"params": {**req.params, "quality": "auto"}})
        if spec.prompt_per_mtok and not spec.gpu_priced:  # its prompt at most one token per byte, as text's
            return _media_price(provider, spec, req, mode, input_bound(req, spec)).total
        return price_alone(req, catalog, "sync" if mode == "gpu_batch" else mode).total
    f = mode_factor(provider, mode)
    pc = provider.cache_of(spec)
    w = max(1.0, pc.write_multiplier) if pc is not None and (mode != "batch_api" or pc.stacks_with_batch) else 1.0
    out = (req.max_output_tokens if req.max_output_tokens is not None
           else spec.max_output_tokens if output_tokens is None else output_tokens)
    n_in = input_bound(req, spec)
    p_in, p_out = token_prices(spec, n_in)  # the bound past a long-prompt tier: reserved at its prices
    return f * (p_in * w * n_in + p_out * out)


def input_bound(req: Request, spec: ModelSpec) -> int:
    """At most this many input tokens for a request whose text is sent as it is: a token holds at least one byte
    of its text (byte-level BPE), so the UTF-8 bytes of its text (``prompt``, which is a body's text) bound that
    part, where ``input_tokens``, estimated at ``chars_per_token``, does not: Chinese text, digits and code come
    denser, and a budget reserved on the estimate was overrun threefold (a helper's fault hunt; a bare prompt
    too, found by the next hunt). Added to the estimate (which holds a body's images and tools), capped at what
    the model accepts. A bare prompt of fewer characters than its token count is no text but a recorded size's
    stand-in (a trace replay sends ``input_tokens`` of filler, ``actors.providers._wire.message_parts``): its
    count stands. Beside a body with text of its own, a prompt is a label and counts nothing."""
    if req.body is None and len(req.prompt) < req.input_tokens:  # fewer characters than tokens: no real text
        return req.input_tokens
    cap = spec.max_input_tokens or spec.context_window or 1 << 62
    text = len(req.prompt.encode()) if sends_prompt(req.body, req.kind) else 0  # else the prompt is a label
    if req.body:
        text += len(split_body(req.body)[0].encode())
    return max(req.input_tokens, min(req.input_tokens + text, cap))


def price_batch(reqs: Sequence[Request], catalog: Catalog, mode: Mode, *,
                warm: Iterable[int] = (), block_tokens: int = 512, failed: Iterable[int] = (),
                warmed: list[int] | None = None, left: list[tuple[int, ...]] | None = None) -> list[Price]:
    """Price of each member of one dispatch of ``reqs`` (same provider and model) under ``mode``.

    ``batch_api``/``sync``: members run in the given order; a prefix written by an earlier member is read
    by later ones when the provider's cache stacks with the mode. At a provider with explicit caching a
    member marks only the prefix a later member starts with, so no write is paid that nobody reads, and puts a
    breakpoint too where a later member parts from it sooner (``entry_marks``: the entry it reads, at no cost).
    ``failed``: positions of members whose attempt fails. They are billed nothing, so they write nothing
    either: a later member does not read a prefix only a failed one would have written (its own marks were
    set at submission, and stand). A member leaves warm only the blocks it read or wrote, not the rest of its
    prefix: ``warmed``, when given, receives that count per member (0 for a failed one), and ``left`` the
    blocks that stay warm as ``warm`` names them (``left_warm``: at an explicit cache, the ends of its entries).
    ``gpu_batch``: members share one warm-up, ``setup_s + sum(unit) / speedup(b)`` GPU seconds, each paying
    its own unit share plus an equal share of the warm-up.
    """
    if not reqs:
        return []
    first = reqs[0]
    provider = catalog.provider(first.provider)
    spec = catalog.model(first.provider, first.model)
    for r in reqs:
        if (r.provider, r.model) != (first.provider, first.model):
            raise CatalogError(f"one batch holds one model; got {first.provider}/{first.model} "
                               f"and {r.provider}/{r.model}")
    _check_mode(provider, spec, first.model, mode)
    if mode == "reuse":
        return [Price(0.0)] * len(reqs)
    if spec.gpu_priced:
        gb = provider.gpu_batching
        assert gb is not None  # ensured by ProviderSpec validation
        b = len(reqs)
        if mode == "gpu_batch" and b > gb.max_batch:
            raise CatalogError(f"a GPU batch holds at most gpu_batching.max_batch={gb.max_batch} jobs, got {b}")
        out = []
        for r in reqs:
            unit = gpu_unit_seconds(spec, r.params)
            p = gpu_share_price(provider, unit, b) if mode == "gpu_batch" else gb.price_per_gpu_s * (gb.setup_s + unit)
            out.append(Price(p, media=p))
        return out
    if spec.kind != "text":
        if warmed is not None:  # no prompt cache: one count per member all the same (the simulator zips them)
            warmed.extend([0] * len(reqs))
        if left is not None:
            left.extend([()] * len(reqs))
        return [price_alone(r, catalog, mode) for r in reqs]
    pc = provider.cache_of(spec)
    use_cache = pc is not None and (mode != "batch_api" or pc.stacks_with_batch)
    warm_set = set(warm) if use_cache else set()
    least = min_cacheable_tokens(provider, spec)
    depths = shared_prefix_depths(reqs, block_tokens, least) if use_cache else [()] * len(reqs)
    gone = set(failed)
    prices = []
    automatic = pc is not None and pc.automatic
    for k, (r, shared) in enumerate(zip(reqs, depths)):
        # An explicit cache's entry is read by a prompt that holds it whole: its partial last block is its own.
        whole = r.prefix_blocks if automatic else r.prefix_blocks[:r.input_tokens // block_tokens]
        room = automatic or mark_room(r.body)  # none left: the wire reads and writes none of its blocks
        n_warm = warm_run(whole, warm_set.__contains__, automatic) if room else 0
        # The live body marks at most its last whole block: a partial one goes with the tail (automatic: unread).
        mark = min(shared[0] if shared else 0, r.input_tokens // block_tokens) if room else 0
        split = cache_split(provider, spec, r.input_tokens, len(r.prefix_blocks), n_warm, mark, block_tokens)
        prices.append(price_text(provider, spec, split, r.output_tokens, mode))
        kept = use_cache and k not in gone
        cached = cached_blocks(split.read, split.write, block_tokens) if kept else 0
        ends = left_warm(r, split.read, split.write, block_tokens, automatic) if kept else ()
        if kept and split.write and not automatic:  # the shallower entries its breakpoints leave (``entry_marks``)
            extra = entry_marks(shared, n_warm, len(whole), block_tokens, least, mark_room(r.body))[1:]
            ends = tuple(sorted(set(ends) | {r.prefix_blocks[d - 1] for d in extra}, key=r.prefix_blocks.index))
        warm_set.update(ends)
        if warmed is not None:
            warmed.append(cached)
        if left is not None:
            left.append(ends)
    return prices
