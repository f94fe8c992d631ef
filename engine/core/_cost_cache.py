"""The provider prompt cache's part of the cost model (docs/cost-model.md): which input tokens a call reads from
the cache, writes to it or sends plain, and which prefix blocks it leaves warm. ``engine.core.cost`` prices
those splits; this module only counts tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from engine.core.catalog import ModelSpec, ProviderSpec
from engine.core.request import Request

__all__ = ["CacheSplit", "cache_read_multiplier", "cache_split", "cached_blocks", "left_warm", "min_cacheable_tokens",
           "shared_prefix_marks", "warm_run"]


class CacheSplit(NamedTuple):
    """How a text request's input tokens are billed: read from the provider cache, written to it, or plain."""

    read: int
    write: int
    plain: int
    write_1h: int = 0  # of ``write``, the tokens written to a one-hour entry (``write_1h_multiplier``)


def min_cacheable_tokens(provider: ProviderSpec, spec: ModelSpec) -> int:
    """The shortest prefix the provider caches for this model (0: no prompt cache)."""
    pc = provider.cache_of(spec)
    return 0 if pc is None else pc.min_tokens


def cache_read_multiplier(provider: ProviderSpec, spec: ModelSpec) -> float:
    """The share of the input price a cache read costs (1.0: no prompt cache)."""
    pc = provider.cache_of(spec)
    return 1.0 if pc is None else pc.read_multiplier


def cache_split(provider: ProviderSpec, spec: ModelSpec, input_tokens: int, n_blocks: int, warm_blocks: int,
                mark_blocks: int, block_tokens: int) -> CacheSplit:
    """Split ``input_tokens`` of a request whose prompt starts with ``n_blocks`` prefix blocks of
    ``block_tokens`` tokens, the first ``warm_blocks`` of them warm at the provider.

    Reads are rounded down to the provider's cache granularity and need at least the minimum cacheable
    prefix. A provider with automatic caching writes the whole cold prefix (at the model's ``write_multiplier``:
    1.0 at OpenAI before the GPT-5.6 family, 1.25 from it on); one with explicit caching writes only up to the
    breakpoint the caller marks (``mark_blocks`` leading blocks), and only if that prefix is cacheable.
    Where an automatic cache's write costs more than plain input, the whole prompt it did not read is written,
    rounded down to its granularity, shared blocks or none: so the provider writes it (OpenAI's usage counts
    nearly all of a cold prompt in ``cache_write_tokens``), and so the emulator bills it. Counted as the
    prefix's alone, a cold gpt-6.2-sol call of 4,000 tokens was priced 14 % under its bill (a review). At 1x
    the split of the rest is no matter to a bill, and stays as the recorded traces' decisions were made.
    """
    pc = provider.cache_of(spec)
    whole = pc is not None and pc.automatic and pc.write_multiplier != 1.0
    if pc is None or (n_blocks == 0 and not whole):
        return CacheSplit(0, 0, input_tokens)
    prefix = min(n_blocks * block_tokens, input_tokens)
    min_tokens = max(min_cacheable_tokens(provider, spec), 1)
    if prefix < min_tokens and not whole:
        return CacheSplit(0, 0, input_tokens)
    read = min(warm_blocks * block_tokens, prefix)
    read -= read % pc.block_tokens
    if read < min_tokens:
        read = 0
    upto = (input_tokens - input_tokens % pc.block_tokens if whole else prefix) if pc.automatic else \
        min(mark_blocks * block_tokens, prefix)
    write = upto - read if upto >= min_tokens and upto > read else 0
    return CacheSplit(read, write, input_tokens - read - write)


def cached_blocks(read: int, write: int, block_tokens: int) -> int:
    """How many leading prefix blocks a call leaves in the provider's cache: those it read or wrote, not the
    rest of its prefix (the simulator's warmth and the live engine's belief of it follow this one rule)."""
    return -(-(read + write) // block_tokens)


def warm_run(blocks: Sequence[int], is_warm: Callable[[int], bool], automatic: bool) -> int:
    """How many leading prefix blocks of a prompt a call can read. An automatic cache keeps every prefix of a
    prompt it saw: the leading run of warm blocks. An explicit cache keeps entries that end where a write ended
    (Anthropic: at a ``cache_control`` breakpoint; the emulator, ``engine.emulator._cache``), so a call reads
    the longest entry its prompt holds whole, and ``is_warm`` names the blocks that end a live entry: read
    block by block, a shorter turn read the leading blocks of a longer turn's write, which no provider serves."""
    if automatic:
        return next((k for k, b in enumerate(blocks) if not is_warm(b)), len(blocks))
    return next((k for k in range(len(blocks), 0, -1) if is_warm(blocks[k - 1])), 0)


def left_warm(r: Request, read: int, write: int, block_tokens: int, automatic: bool) -> tuple[int, ...]:
    """The prefix blocks a call of ``r`` that read ``read`` and wrote ``write`` tokens leaves warm, as
    ``warm_run`` reads them: at an automatic cache every block it read or wrote; at an explicit cache the last
    block of the entry it read (a hit refreshes it) and of the one it wrote, each at a whole block, since the
    engine renders a prompt's partial last block with its tail (``WarmNote.of``, ``anthropic_http.body``)."""
    cached = cached_blocks(read, write, block_tokens)
    if automatic:
        return tuple(r.prefix_blocks[:cached])
    whole = min(r.input_tokens // block_tokens, len(r.prefix_blocks))
    ends = {min(cached_blocks(read, 0, block_tokens), whole), min(cached, whole)}
    return tuple(r.prefix_blocks[k - 1] for k in sorted(ends) if k > 0)


def shared_prefix_marks(reqs: Sequence[Request], block_tokens: int = 512, min_tokens: int = 0) -> list[int]:
    """For each member, how many leading prefix blocks some later member also starts with and can read.

    Block ids name a whole prefix up to and including that block (as Mooncake's ``hash_ids`` do), so a block
    id found in a later member is a prefix that member shares. A later member reads only the blocks its input
    reaches, and nothing when that prefix is shorter than ``min_tokens`` (``cache_split``): counted anyway, a
    write was marked that nobody read, and the batch cost more than its members alone (a hunt).
    """
    later: set[int] = set()
    marks = [0] * len(reqs)
    for i in range(len(reqs) - 1, -1, -1):
        r = reqs[i]
        k = 0
        for b in r.prefix_blocks:
            if b not in later:
                break
            k += 1
        marks[i] = k
        # Only its whole blocks: a partial last block goes with its tail (the live body), so an entry ending
        # there is not one it holds, and a write marked for it was paid for nobody (a hypothesis case, a review).
        whole = min(len(r.prefix_blocks), r.input_tokens // block_tokens)
        if whole * block_tokens >= max(min_tokens, 1):
            later.update(r.prefix_blocks[:whole])
    return marks
