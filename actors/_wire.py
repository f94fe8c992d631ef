"""The wire format of messages between actors: a list of records travels as columns.

Actors hand each other lists: requests, jobs (a request and its engine bookkeeping), batches of jobs, results.
Pickled as they are, every pydantic model in a list pays pydantic's ``__getstate__``/``__setstate__`` and a
dict of its own per hop, about 3 us to pickle and 3 to unpickle a ``Job`` here. ``pack`` turns such a list into
one column per field (numpy arrays for the numbers, lists for the rest), which pickles in about a third of that;
the receiver gets back a plain list of equal records, so no actor code changes.

Only records that were already validated travel (a ``Request`` is checked once, where it enters the engine), so
the receiver rebuilds models without validating them again, with the same field values and the same
``model_fields_set``. Anything ``pack`` does not recognise travels as it is.
"""

from __future__ import annotations

import pickle
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from engine.core.request import Request
from engine.core.result import Result

if TYPE_CHECKING:
    import numpy as np

__all__ = ["ARRAY_MIN_ROWS", "PACK_MIN_ROWS", "pack", "pack_args"]

# Models that travel as columns. Both are frozen: nothing assigns to their fields after validation.
_MODELS: tuple[type[BaseModel], ...] = (Request, Result)
_NUMERIC = (int, float)
# Below this many rows a column of numbers stays a list: Ray hands each numpy array over as a buffer of its
# own, which costs more than it saves for a few values (a sync dispatch is a batch of one).
ARRAY_MIN_ROWS = 64
# Below this many records a list travels as it is: measured through Ray, columns of a batch of one cost more
# than the record (430 against 240-330 us a call), and break even near ten.
PACK_MIN_ROWS = 12


class _Models:
    """A list of one model type as columns; unpickles to the list."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: type[BaseModel], items: list[BaseModel]):
        self.kind, self.items = kind, items

    def __reduce__(self):
        names = tuple(self.kind.model_fields)
        dicts = [m.__dict__ for m in self.items]
        cols = [_column([d[n] for d in dicts]) for n in names]
        # Rows usually share one set of explicitly given fields: send each distinct set once, and an index.
        sets: dict[frozenset, int] = {}
        which = [sets.setdefault(frozenset(m.__pydantic_fields_set__), len(sets)) for m in self.items]
        return _models, (self.kind, names, cols, tuple(sets), which)


def _models(kind: type[BaseModel], names: tuple[str, ...], cols: list, sets: tuple[frozenset, ...],
            which: list[int]) -> list[BaseModel]:
    new, put = object.__new__, object.__setattr__
    out = []
    for row, k in zip(zip(*cols), which):
        m = new(kind)
        put(m, "__dict__", dict(zip(names, row)))
        put(m, "__pydantic_fields_set__", set(sets[k]))
        put(m, "__pydantic_extra__", None)
        put(m, "__pydantic_private__", None)
        out.append(m)
    return out


class _Rows:
    """A list of one tuple type (a NamedTuple such as ``Job``, or plain tuples of one length) as columns, each
    column packed in turn; unpickles to the list."""

    __slots__ = ("items", "kind")

    def __init__(self, kind: type[tuple], items: list[tuple]):
        self.kind, self.items = kind, items

    def __reduce__(self):
        cols = [_packed_column(list(c)) for c in zip(*self.items)]
        return _rows, (self.kind, cols)


def _rows(kind: type[tuple], cols: list) -> list[tuple]:
    rows = zip(*cols)
    if kind is tuple:
        return list(rows)
    new = tuple.__new__
    return [new(kind, r) for r in rows]


class _Array:
    """A column of plain ints or floats as one numpy array (a buffer on the wire); unpickles to the list, before
    the records that hold it are rebuilt."""

    __slots__ = ("arr",)

    def __init__(self, arr: np.ndarray):
        self.arr = arr

    def __reduce__(self):
        return _tolist, (self.arr,)


def _tolist(arr: np.ndarray) -> list:
    return arr.tolist()


def _column(col: list) -> Any:
    """A column as it travels: numbers of one Python type as an array (bools, which are ints, and mixed
    columns stay lists, so every value comes back with its own type)."""
    if len(col) >= ARRAY_MIN_ROWS and type(col[0]) in _NUMERIC:
        t = type(col[0])
        if all(type(v) is t for v in col):
            # numpy on first use: every actor imports this module, and numpy cost each worker about 90 ms of CPU
            # at start, though a column this long is rare (a batch call); the receiver's unpickling imports it.
            import numpy as np

            try:
                return _Array(np.array(col, dtype=np.float64 if t is float else np.int64))
            except OverflowError:  # an int beyond 64 bits travels as it is
                pass
    return col


def _packed_column(col: list) -> Any:
    """A column of records is packed as a list of records; a column of lists of records (a batch's jobs)
    packs each list."""
    p = _packed(col)
    if p is not col:
        return p
    if col and type(col[0]) is list:
        return [_packed(c) for c in col]
    return _column(col)


class _Blob:
    """Packed columns pickled to bytes by the C pickler. Ray's serializer consults a Python hook for every
    object it meets, to find object refs and actor handles. Records hold neither (a body is checked to be JSON
    where it enters; the C pickler would copy a ref without Ray's reference counting); handing it one bytes object
    instead of the columns' thousands cut a call carrying 1,000 jobs from 8.0-8.8 ms to 5.9-6.4 (11-12 ms as
    records), a round trip through an idle actor here."""

    __slots__ = ("x",)

    def __init__(self, x: Any):
        self.x = x

    def __reduce__(self):
        try:
            return pickle.loads, (pickle.dumps(self.x, protocol=5),)
        except Exception:  # something only Ray knows how to send: let it
            return _same, (self.x,)


def _same(x: Any) -> Any:
    return x


def _packed(x: Any) -> Any:
    """The columns of ``x``, or ``x`` itself when it is no list of one record type."""
    if type(x) is not list or len(x) < PACK_MIN_ROWS:
        return x
    t = type(x[0])
    if t in _MODELS:
        return _Models(t, x) if all(type(v) is t for v in x) else x
    if issubclass(t, tuple) and (t is not tuple or len(x[0]) > 0):
        n = len(x[0])
        if all(type(v) is t and len(v) == n for v in x):
            return _Rows(t, x)
    return x


def pack(x: Any) -> Any:
    """``x`` ready for the wire: a list of one model type, or of one tuple type, as columns; anything else as
    it is. The receiver unpickles the same list (equal records, fresh objects)."""
    p = _packed(x)
    return x if p is x else _Blob(p)


def pack_args(args: tuple) -> tuple:
    return tuple(pack(a) for a in args)
