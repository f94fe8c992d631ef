"""Near-duplicate admissibility: cosine of feature vectors plus guards against look-alikes.

A near-duplicate cache is only worth having if it is rarely wrong, so a match above the threshold is still
refused when the two texts differ in something that changes the output: numbers, negation, colours, named
entities, the order of the same words ("cat chasing dog" / "dog chasing cat"), a contrast (opposite words,
negation by a prefix or a verb, direction, the question word: ``engine.core._contrast``), or a qualifier one text adds
("lose weight" / "lose weight fast", "IP address" / "my IP address"; measured on QQP, these are most of the
wrong hits left above 0.9), or a long shared context around words that differ ("List the risks in the report
below: <report>" / "List the opportunities ...": the shared part carries the cosine to 0.96-1.0 whatever
differs, so the cosine no longer measures the ask).

Texts are read the same way for every guard: typographic apostrophes become ``'``; a clitic that names no
content ("what's", "I'm", "party's") reads as its word; a closing "or not" tag asks the same yes/no question
and negates nothing; number words up to ninety read as their digits ("seven" == "7"), and "one", which is as
often a pronoun ("how can one learn"), is no number.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from engine.core._contrast import contrast_between, directions, languages, negating_words, stem

__all__ = ["CONTEXT_RATIO", "CONTEXT_WORDS", "GUARDS", "Guards", "Traits", "guard_between", "guard_reason", "traits"]

GUARDS = ("numbers", "negation", "colours", "entities", "word_order", "qualifiers", "contrast", "context", "symbols")
# The ``context`` guard: two different asks followed by one shared document score 0.96-1.0 from 100-200
# characters of it on (stop words and punctuation are shared too). Measured over 9 asks and 0-780 characters of
# a report (benchmarks/bench_context_guard.py), different asks score above 0.925 from a shared part of about
# 4x the differing one on, so the guard refuses from 3x, once the shared part is long (12 content words: the
# real pairs are questions that rarely share as many). On the real pairs it alone refuses 6 GPTCache and 18 QQP
# pairs of 31,140, texts where a word or two of a long text changed.
CONTEXT_WORDS = 12
CONTEXT_RATIO = 3

_TOKEN = re.compile(r"[A-Za-z]+(?:'[a-z]+)?|\d+(?:[.,]\d+)*")
# Operators, signs and currencies, which the words leave out: "3 + 4 * 2" / "3 * 4 + 2", "a < b" / "a > b",
# "-5" / "5" and "$5" / "€5" read the same words (a helper's hunt). Read as operators only where they stand
# beside a number or a one-letter name, or alone between spaces ("a < b"): a dash, a slash or an ampersand
# between words ("well-known", "and/or", "Q&A") and an exclamation are prose.
_SPACED = re.compile(r"(?<![A-Za-z]{2})\s*([-+*/%<>=&|^~]+)\s*(?![A-Za-z]{2})")  # "a+b" reads as "a + b"
_SYMBOLS = re.compile(r"(?:(?<=[\d\s(])|^)[-+*/%<>=&|^~]+(?=\s*[\d(]|\s*\b[A-Za-z]\b)|(?<=\b[A-Za-z0-9] )[-+*/%<>=&|^~]+"
                      r"(?= )|[$€£¥]")
# One-letter names where code stands them (between brackets, commas or operators): "print(a)" / "print(i)" or
# "f(x, y)" / "f(y, x)" read as stop words ("a", "I") or as no word at all (a helper's hunt). Not a letter before
# a dot ("e.g.", "i.e.") nor one a hyphen joins to a word ("N-dimensional").
_NAMES = re.compile(r"(?:(?<=[(\[,=;+*/%<>])|(?<=(?<![A-Za-z])-))\s*([A-Za-z])\s*(?=[)\],=\[(;:+*/%<>]|-(?![A-Za-z]))")
_SENTENCE = re.compile(r"[.!?]+\s+|\n+")  # "1.5" and "U.S." stay inside a sentence
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'"})
_OR_NOT = re.compile(r"\bor not\s*(?=[?.!]|$)", re.IGNORECASE)  # "Is it safe or not?" asks "Is it safe?"
_CLITICS = ("'s", "'re", "'ve", "'ll", "'d", "'m")  # n't is kept: it is a negation
_NUMBER_WORDS = frozenset(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand million "
    "billion first second third fourth fifth half double triple single dozen pair couple".split())
_DIGITS = {w: str(k) for k, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_DIGITS.update({w: str(10 * k) for k, w in enumerate("thirty forty fifty sixty seventy eighty ninety".split(), 3)})
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
# Stop words as content goes, but whose they are changes the answer: "What is IP address?" asks a definition,
# "What is my IP address?" a lookup. The qualifiers guard counts them.
_POSSESSIVES = frozenset("my your his her our their".split())


class Guards(NamedTuple):
    numbers: bool = True
    negation: bool = True
    colours: bool = True
    entities: bool = True
    word_order: bool = True
    qualifiers: bool = True
    contrast: bool = True
    context: bool = True
    symbols: bool = True

    @staticmethod
    def of(names: tuple[str, ...] | list[str]) -> Guards:
        """Guards with exactly ``names`` switched on (a policy parameter lists them)."""
        unknown = sorted(set(names) - set(GUARDS))
        if unknown:
            raise ValueError(f"unknown near-duplicate guard(s) {unknown}; choose from {list(GUARDS)}")
        return Guards(**{g: g in names for g in GUARDS})


def _word(token: str) -> str:
    """The token without a clitic that names no content ("what's" -> "what", "I'm" -> "I")."""
    if "'" in token:
        for c in _CLITICS:
            if token.endswith(c) and len(token) > len(c):
                return token[: -len(c)]
    return token


def _read(text: str) -> tuple[list[str], set[str], set[str]]:
    """Tokens of ``text``; (lowercased) the words that open a sentence: the first, and the first after . ! ?
    and a space, or a line break, where a capital says nothing about a name; and the entities: capitalised
    words elsewhere and acronyms, lowercased so "Paris" == "paris" counts as the same entity."""
    tokens: list[str] = []
    openers: set[str] = set()
    entities: set[str] = set()
    if "\u2019" in text or "\u2018" in text or "\u02bc" in text:
        text = text.translate(_APOSTROPHES)
    if "ot" in text or "OT" in text:  # a cheap test before the regex: most texts hold no "or not"
        text = _OR_NOT.sub("", text)
    for sentence in _SENTENCE.split(text):  # runs for every match above the threshold: regexes, no char loop
        words = [_word(w) if "'" in w else w for w in _TOKEN.findall(sentence)]
        if not words:
            continue
        openers.add(words[0].lower())
        tokens += words
        for k, t in enumerate(words):
            if t[0].isupper() and ((len(t) > 1 and t.isupper()) or (k and not t.isupper())):
                entities.add(t.lower())
    return tokens, openers, entities


class Traits(NamedTuple):
    """What the guards compare, read once per text (an index keeps them beside its rows)."""

    numbers: frozenset[str]
    negations: int
    colours: frozenset[str]
    entities: frozenset[str]
    content: tuple[str, ...]
    openers: frozenset[str] = frozenset()  # lowercased words that open a sentence
    words: frozenset[str] = frozenset()  # every word, lowercased
    possessives: frozenset[str] = frozenset()
    stems: frozenset[str] = frozenset()  # every word's stem (``_contrast.stem``)
    negating: int = 0  # negating words the negation guard does not count ("lacks", "hardly")
    directions: frozenset[tuple[str, str]] = frozenset()  # (word, "to"/"from"/"into")
    languages: frozenset[str] = frozenset()  # "c#", "c++", "f#"
    symbols: tuple[str, ...] = ()  # operators, signs and currencies, in order
    names: tuple[str, ...] = ()  # one-letter names where code stands them, in order


def traits(text: str) -> Traits:
    tokens, openers, entities = _read(text)
    numbers, colours, possessives, content = set(), set(), set(), []
    negations = 0
    lowered = [t.lower() for t in tokens]
    for t in lowered:  # one pass: this runs for every candidate above the threshold
        if (t[0].isdigit() or t in _NUMBER_WORDS) and t != "one":
            numbers.add(_DIGITS.get(t, t))
        if t in _NEGATIONS or t.endswith("n't"):
            negations += 1
        if t in _COLOURS:
            colours.add(t)
        if t in _POSSESSIVES:
            possessives.add(t)
        if t not in _STOP:
            content.append(t)
    words = frozenset(lowered)
    return Traits(frozenset(numbers), negations, frozenset(colours), frozenset(entities), tuple(content),
                  frozenset(openers), words, frozenset(possessives), frozenset(stem(w) for w in words),
                  negating_words(lowered), directions(text, lowered, _TOKEN.findall), languages(text),
                  tuple(_SYMBOLS.findall(_SPACED.sub(r" \1 ", text))), tuple(_NAMES.findall(text)))


def guard_between(a: Traits, b: Traits, guards: Guards = Guards()) -> str | None:
    """``guard_reason`` on texts already read by ``traits``."""
    if guards.numbers and a.numbers != b.numbers:
        return f"numbers differ: {sorted(a.numbers ^ b.numbers)}"
    if guards.symbols and a.symbols != b.symbols:
        return f"operators or signs differ: {' '.join(a.symbols) or '(none)'} / {' '.join(b.symbols) or '(none)'}"
    if guards.symbols and a.names != b.names:
        return f"one-letter names differ: {' '.join(a.names) or '(none)'} / {' '.join(b.names) or '(none)'}"
    if guards.negation and a.negations != b.negations:
        return "negation differs"
    if guards.colours and a.colours != b.colours:
        return f"colours differ: {sorted(a.colours ^ b.colours)}"
    if guards.entities:
        # An entity is one the other text lacks as a word in any case: "Google" / "google", or a name one text
        # has only at a sentence start ("Fingerprints are computed..." / "...used to compute Fingerprints"),
        # is the same word in both.
        differ = (a.entities - b.words) | (b.entities - a.words)
        if differ:
            return f"named entities differ: {sorted(differ)}"
    ca, cb = a.content, b.content
    if guards.word_order and ca != cb and sorted(ca) == sorted(cb):
        return "same words in another order (swapped roles?)"
    if guards.qualifiers:
        sa, sb = set(ca) | a.possessives, set(cb) | b.possessives
        if sa != sb and (sa < sb or sb < sa):
            return f"one adds words the other lacks: {sorted(sa ^ sb)}"
    if guards.contrast:
        why = contrast_between(a.stems, b.stems, a.negating, b.negating, a.directions, b.directions, a.languages,
                               b.languages)
        if why is not None:
            return why
    if guards.context:
        return _context_differs(ca, cb)
    return None


def _context_differs(ca: tuple[str, ...], cb: tuple[str, ...]) -> str | None:
    """The two texts share a long context at their start and end (a document, a conversation, a system prompt:
    ``CONTEXT_WORDS`` content words or more, and ``CONTEXT_RATIO`` times the longer of the parts between), and
    those parts differ in their words, so the cosine measures the context, not the ask. Rewordings in stop
    words and order pass ("How do I..." / "How can I..."); a short paraphrase of the ask over a long shared
    context is refused, as precision comes first."""
    n = min(len(ca), len(cb))
    if n < CONTEXT_WORDS or ca == cb:
        return None
    p = 0
    while p < n and ca[p] == cb[p]:
        p += 1
    s = 0
    while s < n - p and ca[-1 - s] == cb[-1 - s]:
        s += 1
    if p + s < max(CONTEXT_WORDS, CONTEXT_RATIO * (max(len(ca), len(cb)) - p - s)):
        return None
    differ = set(ca[p:len(ca) - s]) ^ set(cb[p:len(cb) - s])
    if not differ:
        return None
    shown = sorted(differ)
    return (f"they share {p + s} words of context but ask something else: "
            f"{shown[:6]}{' ...' if len(shown) > 6 else ''}")


def guard_reason(a: str, b: str, guards: Guards = Guards()) -> str | None:
    """Why ``a`` must not be served for ``b`` (or vice versa), or None when no guard objects."""
    return guard_between(traits(a), traits(b), guards)
