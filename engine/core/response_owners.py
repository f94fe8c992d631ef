"""Whose a stored response is: a provider's response id (and a conversation id) belongs to the tenant whose request
produced it, as OpenAI scopes them to the project whose key made them.

Every tenant of an engine shares its one OpenAI project. A body for a model called through the Responses API
(``api: responses`` in a catalog overlay) went to OpenAI as it was, so a tenant holding another tenant's response
id (it is in the raw body that tenant got) could send it as ``previous_response_id`` and continue that tenant's
conversation, reading its context back (a helper's hunt). Now a ``previous_response_id`` or ``conversation`` is
refused, per request, unless an answer carrying that id was seen for the caller's tenant; the refusal is OpenAI's
own for an unknown id ("Previous response with id '...' not found."), the same whether the id is another
tenant's or nobody's, so it tells a caller nothing of other tenants. An ``item_reference`` in ``input`` names
one item of a stored response (an output message, call or reasoning), which OpenAI reads back alike: it is held
to the same rule, each output item of an answer its tenant's (a review: the id of another tenant's answer message,
in the same raw body as its response id, read that answer back).

The record is bounded: the ``kept`` ids learnt or used most lately (the least lately used forgotten first, as an
engine runs for days); a forgotten id is refused as unknown, as OpenAI refuses a stored response past its
retention, and the caller sends the conversation's turns in ``input`` instead. An id never changes hands: the first
tenant seen with it keeps it. Thread-safe: a driver learns on its pull thread and checks on its submitters'.

An input item given back whole with its ``id`` (``[*input, *response.output, ...]``) names a stored item too. A
reasoning item is read back by that id (OpenAI's 404 "Item with id 'rs_...' not found" when it was not stored, a
reasoning item no client can write itself): strict, as an ``item_reference``. Any other (a message, a function
call, a tool's output) brings its content with it, and its id may be one nobody stored: the client's own, or one
the engine made (an answer from the cache or a simulated provider, ``msg_<hash>``): refused only when it is known to
be another tenant's, the endpoint too, as refusing an unknown one broke the next turn after a copy from the cache.

Several drivers share one engine: each result hub shard learns the ids of the answers it hands out
(``actors._hub_owners``) and a driver asks them about an id it does not know (``unknown``, ``known``).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

from engine.core.errors import ConfigError

__all__ = ["NOT_FOUND_CODES", "RESPONSES_KEPT", "Refusal", "ResponseOwners", "answer_refs", "refs_of"]

# How long a driver takes "no shard knows this id" for an answer (real seconds): a shard is taught ids it never
# pushed (an endpoint started on its state directory, a script on ``journal.dir``, a driver's rewire), so a
# driver asks again past this; within it, it lets the id go as it would before the teaching.
NOBODY_FOR_S = 10.0
RESPONSES_KEPT = 100_000  # ids kept (32 MB measured, ids of 53 characters): each answer its own, its output items'
# A body field naming a stored object -> (the kind of id, OpenAI's words for an unknown one, the error's code).
_FIELDS = {"previous_response_id": ("response", "Previous response with id {!r} not found.",
                                    "previous_response_not_found"),
           "conversation": ("conversation", "Conversation with id {!r} not found.", "conversation_not_found")}
# An input item ``{"type": "item_reference", "id": ...}`` names an item OpenAI stored with a response (its output's
# messages, calls, reasoning): OpenAI reads it back as it reads a previous response's.
_ITEM = ("item", "Item with id {!r} not found.", "item_not_found")
_READ_BACK = frozenset({"item_reference", "reasoning"})  # input items OpenAI reads back by their id: strict
NOT_FOUND_CODES = frozenset(code for _, _, code in (*_FIELDS.values(), _ITEM))  # the endpoint's 404s


class Refusal(NamedTuple):
    """Why a body may not go: the field (``body.previous_response_id``), the message, OpenAI's code, and the
    (kind, id) refused."""

    field: str
    message: str
    code: str
    ref: tuple[str, str] | None = None


def refs_of(body: Mapping[str, Any] | None) -> list[tuple[str, str, str]]:
    """The stored objects ``body`` names: (its field, the kind of id, the id) for each of ``previous_response_id``
    and ``conversation`` (a string, or an object with an ``id``) that is given, each ``item_reference`` of its
    ``input`` and each other input item given with an ``id`` (field ``input[k].id``). A value of another type
    stands as its text: it names nothing the caller owns, and is refused as unknown."""
    return [ref[:3] for ref in _refs(body)]


def _refs(body: Mapping[str, Any] | None) -> list[tuple[str, str, str, bool]]:
    """``refs_of``, each with whether an id nobody is known to own is refused (at a strict check)."""
    out = []
    for name, (kind, _, _) in _FIELDS.items():
        value = (body or {}).get(name)
        if isinstance(value, Mapping) and name == "conversation":
            value = value.get("id")
        if value is not None:
            out.append((name, kind, _text(value), True))
    items = (body or {}).get("input")
    for k, item in enumerate(items if isinstance(items, list) else ()):
        if not isinstance(item, Mapping):
            continue
        kind = item.get("type")
        if kind == "item_reference" or item.get("id") is not None:
            # (a type that is no string, a client's bug, reads back nothing: hashed, it raised and failed the batch)
            out.append((f"input[{k}].id", _ITEM[0], _text(item.get("id")), isinstance(kind, str) and kind in _READ_BACK))
    return out


def _text(value: Any) -> str:
    return value if isinstance(value, str) else repr(value)[:200]


def answer_refs(answer: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The (kind, id) a Responses answer's body makes its caller's: its own ``id``, its ``conversation``'s and
    each of its ``output`` items' (what an ``item_reference`` names). Any other body (a chat completion, an
    image) makes none."""
    if not isinstance(answer, Mapping) or answer.get("object") != "response":
        return []
    out = [("response", answer["id"])] if isinstance(answer.get("id"), str) and answer["id"] else []
    conv = answer.get("conversation")
    conv = conv.get("id") if isinstance(conv, Mapping) else conv
    if isinstance(conv, str) and conv:
        out.append(("conversation", conv))
    output = answer.get("output")
    out += [(_ITEM[0], item["id"]) for item in (output if isinstance(output, list) else ())
            if isinstance(item, Mapping) and isinstance(item.get("id"), str) and item["id"]]
    return out


class ResponseOwners:
    """(kind, id) -> the tenant it belongs to, the ``kept`` most lately learnt or used."""

    def __init__(self, kept: int = RESPONSES_KEPT, nobody_for_s: float = NOBODY_FOR_S,
                 now: Callable[[], float] = time.monotonic) -> None:
        if isinstance(kept, bool) or not isinstance(kept, int) or kept < 1:
            raise ConfigError(f"kept must be an integer >= 1 (the response ids remembered), got {kept!r}")
        self.kept, self.nobody_for_s, self._now = kept, nobody_for_s, now
        self._owner: OrderedDict[tuple[str, str], str] = OrderedDict()
        # Ids the engine's record was asked about and knew no owner of (``asked``), and when: not asked again for
        # ``nobody_for_s``, as a hub learns the ids it pushes before any driver can hold them (``actors._hub_owners``).
        # Not for good: a shard is also taught ids it never pushed, and a driver that kept "nobody's" for as long
        # as its record kept the id let another tenant continue it (a review). Bounded alike.
        self._nobody: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ResponseOwners(known={len(self._owner)}, kept={self.kept})"

    def __len__(self) -> int:
        return len(self._owner)

    def learn(self, tenant: str, answer: Mapping[str, Any] | None) -> list[tuple[str, str]]:
        """Record the ids ``answer`` (a Responses body answered for ``tenant``) carries; returns those that are
        ``tenant``'s (all, unless one was another's already)."""
        return self.add(tenant, answer_refs(answer))

    def add(self, tenant: str, refs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Record each (kind, id) of ``refs`` as ``tenant``'s, unless it is another's already; returns those that
        are ``tenant``'s, learnt now or before."""
        mine = []
        with self._lock:
            for ref in refs:
                if self._owner.setdefault(ref, tenant) == tenant:
                    self._owner.move_to_end(ref)
                    mine.append(ref)
            while len(self._owner) > self.kept:
                self._owner.popitem(last=False)
        return mine

    def refusal(self, tenant: str, body: Mapping[str, Any] | None, *, strict: bool = True) -> Refusal | None:
        """Why ``body`` may not go for ``tenant`` (the first id it names that is not ``tenant``'s), or None.
        ``strict=False`` refuses only an id known to be another tenant's: a driver script continues responses an
        earlier process of its own got, which no record of this one holds (the endpoint, a gateway shared by
        tenants, is strict; an input item that brings its own content, not read back, is judged so even there)."""
        for name, kind, ident, read_back in _refs(body):
            with self._lock:
                owner = self._owner.get((kind, ident))
                if owner == tenant or (owner is None and not (strict and read_back)):
                    if owner is not None:
                        self._owner.move_to_end((kind, ident))
                    continue
            _, words, code = _FIELDS.get(name, _ITEM)
            return Refusal(f"body.{name}", words.format(ident) + f" No answer with this id was given to tenant "
                           f"{tenant!r} here (an id belongs to the tenant whose request made it, and is kept for "
                           f"its latest {self.kept:,}): continue it as that tenant, or send the conversation's "
                           "turns in input and leave the field out", code, (kind, ident))
        return None

    def unknown(self, refs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """The (kind, id) of ``refs`` no tenant is known here to own, once each, and not ``asked`` in the last
        ``nobody_for_s``: what a driver asks its engine."""
        since = self._now() - self.nobody_for_s
        with self._lock:
            return [ref for ref in dict.fromkeys(refs)
                    if ref not in self._owner and self._nobody.get(ref, since) <= since]

    def asked(self, refs: Iterable[tuple[str, str]]) -> None:
        """Record that the engine knew no owner of these of ``refs`` not known here: ``unknown`` leaves them out."""
        now = self._now()
        with self._lock:
            for ref in refs:
                if ref not in self._owner:
                    self._nobody[ref] = now
                    self._nobody.move_to_end(ref)
            while len(self._nobody) > self.kept:
                self._nobody.popitem(last=False)

    def known(self, refs: Iterable[tuple[str, str]]) -> list[tuple[str, str, str]]:
        """(kind, id, tenant) of each of ``refs`` known here, each now the most lately used: a hub's answer."""
        out = []
        with self._lock:
            for ref in dict.fromkeys(refs):
                if (tenant := self._owner.get(ref)) is not None:
                    self._owner.move_to_end(ref)
                    out.append((*ref, tenant))
        return out

    def rows(self) -> list[tuple[str, str, str]]:
        """(kind, id, tenant) of every id kept, least lately used first: what ``load`` takes back."""
        with self._lock:
            return [(kind, ident, tenant) for (kind, ident), tenant in self._owner.items()]

    def load(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Take back ``rows`` (``rows()``, or an append-only log of them: later rows count as more lately used)."""
        for kind, ident, tenant in rows:
            self.add(tenant, [(kind, ident)])
