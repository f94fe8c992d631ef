"""Provider prompt caches, per model, as each provider documents them.

Automatic (OpenAI-style, ``prompt_cache.automatic``): after a call every prefix of its prompt is warm for
``ttl_s``; a call reads the longest warm prefix, rounded down to ``block_tokens``, if it reaches the minimum.
Explicit (Anthropic-style): only prefixes ending at a ``cache_control`` breakpoint are entries; a call reads
the longest warm one that ends at one of its breakpoints or at one of the ``LOOKBACK_BLOCKS`` block ends before
a breakpoint (Anthropic's look-back), refreshing it, and writes the prefix up to its last breakpoint beyond
that (an entry at each of its breakpoints past the read).
The split is priced by ``engine.core.cost.price_text``; these classes only decide how many tokens fall where.
"""

from __future__ import annotations

import hashlib

from engine.core.catalog import ModelSpec, ProviderSpec
from engine.core.cost import CacheSplit, min_cacheable_tokens
from engine.emulator._text import CHARS_PER_TOKEN, Prompt, tokens

__all__ = ["PrefixTree", "PromptCaches"]

_PRUNE_EVERY = 1024
HOUR_TTL_S = 3600.0  # Anthropic's one-hour entry (``cache_control.ttl: "1h"``)
LOOKBACK_BLOCKS = 20  # Anthropic checks for a hit at the block ends up to about 20 blocks before a breakpoint


class _Node:
    __slots__ = ("edges", "expiry")

    def __init__(self, expiry: float):
        self.edges: dict[str, tuple[str, _Node]] = {}
        # The latest expiry of any prompt through this node, so every character above it is warm until then.
        self.expiry = expiry


def _common(label: str, text: str, start: int) -> int:
    """Length of the common prefix of ``label`` and ``text[start:]`` (C-speed comparisons, no char loop)."""
    if text.startswith(label, start):
        return len(label)
    lo, hi = 0, min(len(label), len(text) - start)
    while lo < hi:  # largest k with label[:k] == text[start:start+k]
        mid = (lo + hi + 1) // 2
        if text.startswith(label[:mid], start):
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixTree:
    """A radix tree of prompts with an expiry per node: the warm prefix of a text in one walk, and shared
    prefixes stored once (a per-prefix hash table would hold one entry per block of every prompt)."""

    def __init__(self) -> None:
        self._root = _Node(float("inf"))
        self._inserts = 0

    def warm_chars(self, text: str, now: float) -> int:
        node, i = self._root, 0
        while i < len(text):
            edge = node.edges.get(text[i])
            if edge is None:
                break
            label, child = edge
            if child.expiry <= now:
                break
            k = _common(label, text, i)
            i += k
            if k < len(label):
                break
            node = child
        return i

    def insert(self, text: str, expiry: float) -> None:
        node, i = self._root, 0
        while i < len(text):
            c = text[i]
            edge = node.edges.get(c)
            if edge is None:
                node.edges[c] = (text[i:], _Node(expiry))
                break
            label, child = edge
            k = _common(label, text, i)
            if k < len(label):  # split the edge where the texts part
                mid = _Node(child.expiry)
                mid.edges[label[k]] = (label[k:], child)
                node.edges[c] = (label[:k], mid)
                child = mid
            child.expiry = max(child.expiry, expiry)
            i += k
            node = child
        self._inserts += 1

    def prune(self, now: float) -> None:
        stack = [self._root]
        while stack:
            node = stack.pop()
            for c, (_, child) in list(node.edges.items()):
                if child.expiry <= now:
                    del node.edges[c]
                else:
                    stack.append(child)

    @property
    def inserts(self) -> int:
        return self._inserts


class PromptCaches:
    """Every model's cache of one emulator. Not thread-safe: the emulator calls it under its lock."""

    def __init__(self) -> None:
        self._trees: dict[tuple[str, str], PrefixTree] = {}
        self._entries: dict[tuple[str, str], dict[bytes, float]] = {}
        self._hour: set[tuple[tuple[str, str], bytes]] = set()  # the entries written for an hour: a hit refreshes them for an hour
        self._writes = 0

    def use(self, provider: ProviderSpec, spec: ModelSpec, model: str, prompt: Prompt, now: float) -> CacheSplit:
        """Split the prompt's tokens into read / written / plain and update the cache as the call does."""
        total = prompt.tokens
        pc = provider.cache_of(spec)
        if pc is None:
            return CacheSplit(0, 0, total)
        min_tokens = max(min_cacheable_tokens(provider, spec), 1)
        key = (provider.name, model)
        if pc.automatic:
            tree = self._trees.setdefault(key, PrefixTree())
            block = pc.block_tokens
            read = tree.warm_chars(prompt.text, now) // CHARS_PER_TOKEN // block * block
            read = read if read >= min_tokens else 0
            cacheable = len(prompt.text) // CHARS_PER_TOKEN // block * block
            # As engine.core.cost.cache_split: an automatic cache writes the whole cold cacheable prefix.
            write = cacheable - read if cacheable >= min_tokens and cacheable > read else 0
            tree.insert(prompt.text, now + pc.ttl_s)
            if tree.inserts % _PRUNE_EVERY == 0:
                tree.prune(now)
            return CacheSplit(read, write, total - read - write)
        return self._explicit(key, prompt, now, pc.ttl_s, min_tokens, total)

    def _explicit(self, key: tuple[str, str], prompt: Prompt, now: float, ttl: float, min_tokens: int,
                  total: int) -> CacheSplit:
        bps = sorted(set(prompt.breakpoints))
        if not bps:
            return CacheSplit(0, 0, total)
        entries = self._entries.setdefault(key, {})
        # Where a hit is looked for: each breakpoint and the block ends up to LOOKBACK_BLOCKS before it.
        ends = sorted(set(prompt.bounds) | set(bps))
        at = {e: k for k, e in enumerate(ends)}
        looked = sorted({ends[j] for bp in bps for j in range(max(at[bp] - LOOKBACK_BLOCKS, 0), at[bp] + 1)})
        h = hashlib.sha256()
        digest, prev = {}, 0
        for end in looked:  # one pass over the text: each digest names the prefix up to its end
            h.update(prompt.text[prev:end].encode())
            digest[end] = h.copy().digest()
            prev = end
        hit = next((end for end in reversed(looked) if entries.get(digest[end], 0.0) > now), 0)
        read = tokens(hit)
        last = tokens(bps[-1])
        write = last - read if bps[-1] > hit and last >= min_tokens else 0
        if hit:  # a hit refreshes the entry, for its own TTL
            entries[digest[hit]] = now + (HOUR_TTL_S if (key, digest[hit]) in self._hour else ttl)
        hour, prev = 0, hit
        if write:
            for bp in bps:
                if bp > hit and tokens(bp) >= min_tokens:
                    # Each entry's own tokens (from the one before it) are written at its TTL's price.
                    long = bp in prompt.hour_marks
                    entries[digest[bp]] = now + (HOUR_TTL_S if long else ttl)
                    if long:
                        self._hour.add((key, digest[bp]))
                        hour += tokens(bp) - tokens(prev)
                    prev = bp
        self._writes += 1
        if self._writes % _PRUNE_EVERY == 0:
            for k in [k for k, exp in entries.items() if exp <= now]:
                del entries[k]
                self._hour.discard((key, k))
        return CacheSplit(read, write, total - read - write, min(hour, write))

    def clear(self) -> None:
        self._trees.clear()
        self._entries.clear()
        self._hour.clear()
