"""Settings whose repr masks their credentials: a URL's password or user name (``masked_url``: a key is often
passed as one, ``https://sk-...@host``), and a key pasted where a variable's name was asked for. A settings object
is a local of every frame of a start, and error trackers (Sentry captures each frame's locals), ``rich.traceback``'s
``show_locals``, ``pytest -l`` and ``TracebackException(capture_locals=True)`` print each local by its repr, which
showed them whole (keys85). pydantic's ``repr``, ``str`` and rich's pretty printing all read ``__repr_args__``;
the values themselves (``model_dump``, what the actors are given) are unchanged."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, ClassVar

from engine.core._logkeys import masked_url

__all__ = ["MaskedRepr", "is_variable_name"]

_VAR = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # an environment variable's name (OpenAI's and Anthropic's keys hold a -)


def is_variable_name(text: str) -> bool:
    """Whether ``text`` can name an environment variable: where a key's variable is asked for, anything else may be
    the key itself, pasted in its place, and is refused without being quoted."""
    return _VAR.fullmatch(text) is not None


class MaskedRepr:
    """A pydantic model's mixin (first among its bases): the fields named in ``masked_urls`` shown through
    ``masked_url``, those in ``variable_names`` as ``***`` unless they name a variable."""

    masked_urls: ClassVar[tuple[str, ...]] = ()
    variable_names: ClassVar[tuple[str, ...]] = ()

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():  # type: ignore[misc]
            if isinstance(value, str) and name in self.masked_urls:
                value = masked_url(value)
            elif isinstance(value, str) and name in self.variable_names and not is_variable_name(value):
                value = "***"
            yield name, value
