"""Near-duplicate admissibility: cosine of feature vectors plus guards against look-alikes.

A near-duplicate cache is only worth having if it is rarely wrong, so a match above the threshold is still
refused when the two texts differ in something that changes the output: numbers, negation, colours, named
entities, or the order of the same words ("cat chasing dog" / "dog chasing cat").
"""

from __future__ import annotations

import re
from typing import NamedTuple

__all__ = ["GUARDS", "Guards", "guard_reason"]

GUARDS = ("numbers", "negation", "colours", "entities", "word_order")

_TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion first second third fourth fifth half double triple single dozen pair couple".split())
_NEGATIONS = frozenset(
    "not no never without none nor nothing nobody neither cannot can't don't doesn't didn't isn't aren't "
    "wasn't weren't won't wouldn't shouldn't couldn't mustn't hasn't haven't hadn't avoid except exclude "
    "excluding".split())
_COLOURS = frozenset(
    "red blue green yellow orange purple violet pink brown black white grey gray gold golden silver teal cyan "
    "magenta beige maroon navy turquoise crimson scarlet amber".split())
_STOP = frozenset(
    "a an the of to in on at for with and or by from as is are was were be been this that these those it its "
    "please can could would you your me my i we our what how which who whom whose do does did".split())


class Guards(NamedTuple):
    numbers: bool = True
    negation: bool = True
    colours: bool = True
    entities: bool = True
    word_order: bool = True


def _tokens(text: str) -> list[str]:
    return _TOKEN.findall(text)


def _entities(tokens: list[str]) -> set[str]:
    # Capitalised words that do not open a sentence; the first token is skipped because any sentence opens
    # with a capital. Lowercased so "Paris" == "paris" counts as the same entity.
    return {t.lower() for t in tokens[1:] if t[0].isupper() and not t.isupper() or (len(t) > 1 and t.isupper())}


def guard_reason(a: str, b: str, guards: Guards = Guards()) -> str | None:
    """Why ``a`` must not be served for ``b`` (or vice versa), or None when no guard objects."""
    ta, tb = _tokens(a), _tokens(b)
    la, lb = [t.lower() for t in ta], [t.lower() for t in tb]
    if guards.numbers:
        na = {t for t in la if t[0].isdigit() or t in _NUMBER_WORDS}
        nb = {t for t in lb if t[0].isdigit() or t in _NUMBER_WORDS}
        if na != nb:
            return f"numbers differ: {sorted(na ^ nb)}"
    if guards.negation:
        ga = sum(t in _NEGATIONS or t.endswith("n't") for t in la)
        gb = sum(t in _NEGATIONS or t.endswith("n't") for t in lb)
        if ga != gb:
            return "negation differs"
    if guards.colours:
        ca, cb = {t for t in la if t in _COLOURS}, {t for t in lb if t in _COLOURS}
        if ca != cb:
            return f"colours differ: {sorted(ca ^ cb)}"
    if guards.entities:
        ea, eb = _entities(ta), _entities(tb)
        if ea != eb:
            return f"named entities differ: {sorted(ea ^ eb)}"
    if guards.word_order:
        ca = [t for t in la if t not in _STOP]
        cb = [t for t in lb if t not in _STOP]
        if ca != cb and sorted(ca) == sorted(cb):
            return "same words in another order (swapped roles?)"
    return None
