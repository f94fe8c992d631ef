"""The provider prompt cache's part of the cost model (docs/cost-model.md): which input tokens a call reads from
the cache, writes to it or sends plain, and which prefix blocks it leaves warm. ``engine.core.cost`` prices
those splits; this module only counts tokens."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from engine.core._api_fields import MAX_CACHE_MARKS
from engine.core._body_checks import cache_blocks
from engine.core.catalog import ModelSpec, ProviderSpec
from engine.core.request import Request
from engine.core.responses_input import translates

__all__ = ["CacheSplit", "cache_read_multiplier", "cache_split", "cached_blocks", "call_marks", "entry_marks",
           "left_warm", "mark_room", "min_cacheable_tokens", "shared_prefix_depths", "shared_prefix_marks", "warm_run"]


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
    return [d[0] if d else 0 for d in shared_prefix_depths(reqs, block_tokens, min_tokens)]


def shared_prefix_depths(reqs: Sequence[Request], block_tokens: int = 512,
                         min_tokens: int = 0) -> list[tuple[int, ...]]:
    """For each member, every length of the prefix it shares with some later member, deepest first (the first is
    ``shared_prefix_marks``'). An explicit cache's entry is read only by a prompt that holds it whole, so one
    write at the deepest of them serves only the later members that reach it: a turn that parts from the member
    sooner (another branch of its conversation, an earlier and shorter turn) needs an entry of its own depth
    (``entry_marks``). A trie of the later members' whole blocks: O(blocks) a member, however large the batch."""
    root: list = [{}, 0]  # a node: [children by block id, how many later members' whole blocks end here]
    out: list[tuple[int, ...]] = [()] * len(reqs)
    for i in range(len(reqs) - 1, -1, -1):
        r = reqs[i]
        blocks, node, depths = r.prefix_blocks, root, []
        for k, b in enumerate(blocks):
            node = node[0].get(b)
            if node is None:
                break
            nxt = blocks[k + 1] if k + 1 < len(blocks) else None
            # Some later member holds these k + 1 blocks and not the next one of this member's: it parts here.
            if node[1] or len(node[0]) > (nxt in node[0]):
                depths.append(k + 1)
        out[i] = tuple(reversed(depths))
        # Only its whole blocks: a partial last block goes with its tail (the live body), so an entry ending
        # there is not one it holds, and a write marked for it was paid for nobody (a hypothesis case, a review).
        whole = min(len(blocks), r.input_tokens // block_tokens)
        if whole * block_tokens >= max(min_tokens, 1):
            node = root
            for b in blocks[:whole]:
                node = node[0].setdefault(b, [{}, 0])
            node[1] += 1
    return out


def entry_marks(depths: Sequence[int], read: int, whole: int, block_tokens: int, min_tokens: int,
                room: int = MAX_CACHE_MARKS) -> tuple[int, ...]:
    """Where an explicit-cache batch member that reads ``read`` leading blocks puts breakpoints beside the one at
    its read, for the later members that share ``depths`` of its prefix (``shared_prefix_depths``, deepest
    first), within its ``whole`` blocks: the deepest (its write), then shallower ones past its read, each a
    cacheable prefix, as many as ``room`` leaves (Anthropic takes four a request, one of them at the read). A
    write is billed once up to its last breakpoint and leaves an entry at each one (Anthropic's usage, the
    emulator's ``_explicit``), so the shallower entries cost nothing and serve the turns that part sooner:
    with one breakpoint they were sent plain. Empty when the member writes nothing (its deepest is no further
    than its read)."""
    marks: list[int] = []
    room -= 1 if read > 0 else 0
    for d in depths:  # deepest first: once one is no further than the read, or too short to cache, so are the rest
        d = min(d, whole)
        if d <= read or d * block_tokens < max(min_tokens, 1) or len(marks) >= room:
            break
        if d not in marks:
            marks.append(d)
    return tuple(marks)


def call_marks(write: object, read: int, whole: int, block_tokens: int, provider: ProviderSpec, spec: ModelSpec,
               room: int = MAX_CACHE_MARKS) -> tuple[int, ...]:
    """Where a call at an explicit cache that reads ``read`` leading blocks breaks when the policy names depths
    (``Decision.cache_write`` a tuple: where fallbacks expected after it part from its prefix, and its whole
    prefix when it writes for another reason): ``entry_marks`` of them, the first its write. Empty for a plain
    ``True`` or ``False`` (one write at its whole prefix, or none), as before such depths."""
    if not isinstance(write, tuple):
        return ()
    return entry_marks(write, read, whole, block_tokens, max(min_cacheable_tokens(provider, spec), 1), room)


def mark_room(body: dict | None) -> int:
    """The breakpoints an Anthropic body leaves the engine: four a request, less the ``cache_control`` marks the
    body carries (its system, tools or a top-level one). The room ``entry_marks`` fills, in the simulator and on
    the wire alike: counted against all four, a member's shallower entries were priced and marked read though the
    body kept only its furthest marks (a review of stop 86). None for a body of messages (a caller's own prompt,
    sent as written, so the engine marks nothing in it): priced as if its prefix blocks were marked, a read the
    wire never made (a review of stop 86)."""
    # Messages, given or a Responses body's (``as_messages``: one it cannot translate is refused, priced nothing);
    # asked of the translation, each price of a member translated its whole ``input`` (a review of ``fid86``).
    if body and ("messages" in body or translates(body, "anthropic", "chat")):
        return 0
    own = sum(isinstance(b, dict) and b.get("cache_control") is not None for _, b in cache_blocks(body or {}))
    return max(MAX_CACHE_MARKS - own, 0)
