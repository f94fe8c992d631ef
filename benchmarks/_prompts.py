"""Prompts of a realistic length for the benchmarks: the synthetic trace's prompts are a sentence, real ones run
to thousands of characters (a system prompt, a document, a conversation), and the cache's near-duplicate work
grows with them."""

from __future__ import annotations

__all__ = ["padded"]

_FILLER = "Summarise the attached report section by section, keeping every figure and its unit. "


def padded(prompt: str, chars: int) -> str:
    """``prompt`` followed by a fixed text, to about ``chars`` characters (unchanged when it is as long)."""
    if len(prompt) >= chars:
        return prompt
    return (prompt + " " + _FILLER * (chars // len(_FILLER) + 1))[:chars]
