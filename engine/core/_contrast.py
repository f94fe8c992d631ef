"""The ``contrast`` guard's reading: what turns a text into its opposite while its words stay nearly the same.

A helper's adversarial hunt (stop 38) served 81 of 324 pairs of different asks as near duplicates at the
default settings, every guard passing: opposites ("ascending" / "descending", "left" / "right", "maximum" /
"minimum"), negation by a prefix or a verb ("legal" / "illegal", "lacks"), direction ("an email to my boss" /
"from my boss"), the question word ("why did Rome fall" / "when did Rome fall") and language names the tokens
drop ("C" / "C#"). The cosine of such a pair is 0.93-0.99: one word of many changed. Word lists miss new words
(precision first: they still close most of it), and on the real paraphrase pairs these rules refuse 6 held-out
QQP hits labelled right (5 of them read as different asks) and no GPTCache hit (docs/cache.md).
"""

from __future__ import annotations

import functools
import re

__all__ = ["contrast_between", "directions", "languages", "negating_words", "stem"]

# Groups of opposites: classes split by "/", synonyms inside a class. A word only in one text and a word of
# another class of its group only in the other is a contrast.
_GROUPS = """increase raise grow/decrease reduce lower shrink|rise/fall drop|before/after|above/below|over/under|
up/down|upper/lower|buy bought/sell sold|import/export|maximum maximize maximise highest most/minimum
minimize minimise lowest least|pro/con|encrypt encryption/decrypt decryption|upload/download|ascend/descend|
high higher/low lower|positive/negative|win won winner/lose lost loser|gain/loss lose|push/pull|
add/remove delete|open/close|start/stop|accept/reject|success succeed/failure fail|strength/weakness|
earliest first/latest last|upstream/downstream|toward towards/away|into/out|onto/off|inside/outside|left/right|
day/night|morning/afternoon/evening/night|sunrise/sunset|dawn/dusk|summer/winter/spring/autumn|young/old|
new/old|small tiny/large big huge|short/long|shortest/longest|cheap cheapest/expensive|fast faster fastest/slow
slower slowest|hot/cold|warm/cool|heavy/light|thick/thin|wide/narrow|full/empty|wet/dry|safe/dangerous|
easy easiest/hard hardest difficult|good best better/bad worst worse|happy/sad|love/hate|like/dislike|
formal/casual informal|beginner/expert advanced|junior/senior|guilty/innocent|outperform/underperform|
past/future/present|previous/next upcoming/current|yesterday/today/tomorrow|weekend/week/month/year|
male/female|man men/woman women|boy/girl|husband/wife|father/mother/son/daughter|parent/child|teacher/student|
buyer/seller|employer manager/employee|landlord/tenant|north/south|east/west|front/back rear|top/bottom|
forward/backward reverse|input/output|send/receive|give/receive|lend/borrow|enter/exit|arrive arrival/depart
departure|include/exclude|allow/deny|more/less|many/few|plus/minus|add/subtract|multiply/divide|true/false|
uppercase/lowercase|light/dark|compress/decompress|inflation/deflation|singular/plural|odd/even|asleep/awake|
alive/dead|online/offline|inbound/outbound|internal/external|public/private|global/local|horizontal/vertical|
clockwise/counterclockwise anticlockwise|brief briefly/detailed|optimistic/pessimistic|
python/java/javascript/rust/ruby/golang/kotlin/swift/php/perl/scala/haskell/typescript/bash/powershell|
json/yaml/xml/csv/markdown/html/toml|km kilometer kilometre/mile/meter metre/foot feet/inch/yard|
kg kilogram/lb lbs pound/gram/ounce oz/ton tonne|dollar usd/euro eur/gbp sterling/yen/rupee|
celsius/fahrenheit/kelvin|teaspoon tsp/tablespoon tbsp/cup|second/minute/hour/day/week/month/year/decade"""
# Prefixes that negate the word they precede ("legal" / "illegal", "agree" / "disagree", "safe" / "unsafe").
_PREFIXES = ("un", "in", "im", "il", "ir", "dis", "non", "de", "mis")
# Words that negate without the negation guard's "not"-words.
_NEGATING = frozenset("lack lacks lacking lacked fail fails failed failing refuse refuses refused refusing hardly "
                      "barely scarcely seldom rarely unable".split())  # not "instead": "rather than" says it too
_DIRECTIONS = frozenset(("to", "from", "into"))
_DETERMINERS = frozenset("a an the my your his her our their this that these those".split())
_QUESTION = frozenset(("why", "when", "where"))
_ASKS = _QUESTION | {"how", "what", "who", "which"}
# save_to_disk is a name, not "to disk". Anchored at a word's start: unanchored, a long run of letters in a text
# with an underscore anywhere was scanned from each of its letters (a review: 20 s on a 100 kB prompt).
_IDENTIFIER = re.compile(r"\b\w*_\w*")
_LANGUAGE = re.compile(r"(?<![A-Za-z])([CcFfJj])(\+\+|#)")  # C++, C#, F#, J#: the tokens read "C", "F", "J"


@functools.lru_cache(maxsize=1 << 16)
def stem(w: str) -> str:
    """A light stem, so "raising" meets "raise" and "descending" meets "descend" (the table goes through it
    too): plural and -ing/-ed endings off, a doubled final consonant and a final "e" dropped."""
    if len(w) <= 3:
        return w
    if w.endswith("ing") and len(w) > 5:
        w = w[:-3]
    elif w.endswith("ed") and len(w) > 4:
        w = w[:-2]
    elif w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    elif w.endswith(("sses", "ches", "shes", "xes", "zes")):
        w = w[:-2]
    elif w.endswith("s") and not w.endswith("ss"):
        w = w[:-1]
    if len(w) > 3 and w[-1] == w[-2] and w[-1] not in "lsz":
        w = w[:-1]
    if len(w) > 3 and w.endswith("e"):
        w = w[:-1]
    return w


def _opposites() -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {}
    for group in _GROUPS.replace("\n", " ").split("|"):
        classes = [{stem(w) for w in c.split()} for c in group.split("/")]
        for i, ci in enumerate(classes):
            others = {x for j, cj in enumerate(classes) if j != i for x in cj}
            for w in ci:
                out.setdefault(w, set()).update(others - {w})
    return {w: frozenset(v) for w, v in out.items()}


_OPPOSITES = _opposites()


def negating_words(lowered: list[str]) -> int:
    return sum(w in _NEGATING for w in lowered)


def directions(text: str, lowered: list[str], tokenize) -> frozenset[tuple[str, str]]:
    """(word, "to"/"from"/"into") for each word a direction governs ("an email to my boss": ("boss", "to")).
    ``lowered``: the text's words, read again by ``tokenize`` only where an identifier holds a direction."""
    words = [w.lower() for w in tokenize(_IDENTIFIER.sub(" ", text))] if "_" in text else lowered
    out: dict[str, str] = {}
    for k, w in enumerate(words):
        if w in _DIRECTIONS:
            j = k + 1
            while j < len(words) and words[j] in _DETERMINERS:
                j += 1
            if j < len(words):
                out.setdefault(words[j], w)
    return frozenset(out.items())


def languages(text: str) -> frozenset[str]:
    return frozenset(m.group(0).lower() for m in _LANGUAGE.finditer(text)) if ("#" in text or "++" in text) \
        else frozenset()


def contrast_between(sa: frozenset[str], sb: frozenset[str], nega: int, negb: int,
                     da: frozenset[tuple[str, str]], db: frozenset[tuple[str, str]],
                     la: frozenset[str], lb: frozenset[str]) -> str | None:
    """Why two texts ask opposite things (``sa``/``sb``: their stems; ``nega``/``negb``: negating words;
    ``da``/``db``: directions; ``la``/``lb``: language names), or None."""
    if la != lb:
        return f"languages differ: {sorted(la ^ lb)}"
    oa, ob = sa - sb, sb - sa
    if oa and ob:
        for x in oa:
            hit = _OPPOSITES.get(x)
            if hit is not None and not hit.isdisjoint(ob):
                return f"opposites: {x} / {sorted(hit & ob)[0]}"
        for lo, hi, lo_all in ((oa, ob, sa), (ob, oa, sb)):
            for y in hi:
                for p in _PREFIXES:
                    # "non-profit" reads as "non" and "profit": the same word as "nonprofit", not its negation.
                    if y.startswith(p) and len(y) - len(p) >= 3 and y[len(p):] in lo and p not in lo_all:
                        return f"one negates the other by a prefix: {y[len(p):]} / {y}"
        qa, qb = oa & _QUESTION, ob & _QUESTION
        if (qa and ob & _ASKS) or (qb and oa & _ASKS):
            return f"question words differ: {sorted((oa | ob) & _ASKS)}"
    if nega != negb:
        return "a negating word differs (lacks, fails, hardly, ...)"
    if da != db:
        ga, gb = dict(da), dict(db)
        for w in ga.keys() & gb.keys():
            if ga[w] != gb[w]:
                return f"direction differs: {ga[w]} / {gb[w]} {w}"
    return None
