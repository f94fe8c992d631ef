"""Checks of a request's raw values: valid Unicode, a body that is JSON, the types and ranges of the well-known
generation parameters in it (a chat body's messages and tools: ``engine.core._body_checks``, imported here; a
media request's priced params: ``engine.core._media_checks``). They raise ``FieldProblem``, which names the field to fix; ``engine.core.request`` runs them while filling
defaults."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Annotated, Any

from engine.core._body_checks import cache_blocks, check_messages, check_tools, no_text_problem
from engine.core._field_problem import FieldProblem
from engine.core._tenant_name import tenant_ends_problem

if TYPE_CHECKING:
    from pydantic import TypeAdapter


__all__ = ["GENERATION_PARAMS", "FieldProblem", "cache_blocks", "check_generation", "check_json", "check_messages",
           "check_params", "check_route", "check_text", "check_tools", "no_text_problem", "tenant_problem"]


def check_text(value: Any, where: str) -> None:
    """Strings must be valid Unicode: a lone surrogate (what json.loads gives for an escaped half pair) cannot
    be encoded for any provider, so it is refused here, per request, rather than failing a whole batch later.
    Walked with a stack, not recursion, so a deeply nested body cannot exhaust Python's stack. The message names
    the string's path and the character (the field stays ``where``): one of fifty messages is found at once.
    The path is made only then, from the containers walked (their parent and key): made for every item pushed,
    a body of 160 KB (a key of 100,000 characters over 20,000 numbers) took 2 GB and 1.4 s (a review)."""
    if isinstance(value, str):
        _utf8(value, where, [], -1, None)
    if not isinstance(value, (dict, list, tuple)):
        return
    stack: list[tuple[int, Any, Any]] = [(-1, None, value)]  # containers: (the container it is in, its key, it)
    walked: list[tuple[int, Any, bool]] = []  # per container: (the container it is in, its key there, a list?)
    while stack:
        up, key, v = stack.pop()
        is_list = not isinstance(v, dict)
        walked.append((up, key, is_list))
        me = len(walked) - 1
        for k, item in (enumerate(v) if is_list else v.items()):  # strings here, at once: most items are
            if isinstance(item, str):
                _utf8(item, where, walked, me, k)
            elif isinstance(item, (dict, list, tuple)):
                stack.append((me, k, item))
            if not is_list and isinstance(k, str):
                _utf8(k, where, walked, me, _A_KEY)


def _utf8(text: str, where: str, walked: list[tuple[int, Any, bool]], up: int, key: Any) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise FieldProblem(where, f"{_path(where, walked, up, key)} is not valid Unicode (a lone surrogate, "
                           f"{text[exc.start]!r} at character {exc.start}); send UTF-8 text") from None


_A_KEY = object()  # the key of a stack's item that is a dict's key, not one of its values


def _path(where: str, walked: list[tuple[int, Any, bool]], up: int, key: Any) -> str:
    """``where`` and the keys from it down to ``key`` of container ``up``: ``body.messages[3].content``; a key
    that is itself the bad string is ``(a key)``, and each key is shown encodable and at most 40 characters."""
    parts = [" (a key)"] if key is _A_KEY else []
    while up >= 0:
        if key is not _A_KEY:
            parts.append(f"[{key}]" if walked[up][2] else f".{_shown_key(key)}")
        up, key, _ = walked[up]
    return where + "".join(reversed(parts))


def _shown_key(key: Any) -> str:
    text = str(key).encode("utf-8", "backslashreplace").decode()  # a key with a lone surrogate prints as \udcff
    return text if len(text) <= 40 else text[:37] + "..."


MAX_DEPTH = 100  # levels of a request's body: a JSON schema in response_format nests a few dozen at most


def check_json(body: dict, where: str) -> None:
    """The body is sent as JSON, fingerprinted as JSON and carried between processes: anything else (a
    number as an object key, a set, a generator, NaN) is refused here, per request, rather than failing the
    call that carries its neighbours. Walked with a stack, as ``check_text``; nested at most ``MAX_DEPTH``: the
    fingerprint's ``json.dumps`` and Ray's pickling recurse, and a body the reader took at depth 950 failed there,
    in the actor that carried its neighbours (a review)."""
    stack: list[tuple[str, Any, int]] = [(where, body, 0)]
    while stack:
        path, v, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise FieldProblem(path, f"{path} is nested more than {MAX_DEPTH} levels deep; send a flatter body")
        if isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise FieldProblem(path, f"{path} has the key {k!r} ({type(k).__name__}); JSON object keys "
                                       f"are strings: write it as {str(k)!r}")
                stack.append((f"{path}.{k}", item, depth + 1))
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{path}[{n}]", item, depth + 1) for n, item in enumerate(v))
        elif isinstance(v, float) and not math.isfinite(v):
            raise FieldProblem(path, f"{path} is {v!r}, which JSON cannot carry; send a finite number")
        elif v is not None and not isinstance(v, (str, int, float, bool)):
            raise FieldProblem(path, f"{path} is a {type(v).__name__}, not JSON; send strings, numbers, true/"
                               "false, null, lists and objects")


def _between(lo: float, hi: float) -> Callable[[Any], bool]:
    return lambda v: type(v) in (int, float) and lo <= v <= hi  # type(), not isinstance: True is not 1


def _whole_from(lo: int | None) -> Callable[[Any], bool]:
    return lambda v: type(v) is int and (lo is None or v >= lo)  # 100.0 too is refused by the APIs


def _strings(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


# The well-known generation parameters of the providers' bodies: (check, what every provider that reads the
# key accepts, the fix). Temperature: OpenAI and Gemini take up to 2, Anthropic up to 1 (``_API_RULES``). A
# wrong value is refused here, per request, where the provider would refuse only the call, after the request was
# accepted and perhaps batched with others. Only these: the providers' whole schemas stay theirs to check. JSON
# null ("not set") passes.
_DEFAULT_FIX = "fix it, or leave it out for the provider's default"
_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    # (Anthropic's narrower range named here too: checked before the provider is known, a Claude request's 3 was
    # told "between 0 and 2", and its 1.8 then refused again by Anthropic's range; a helper's tour.)
    "temperature": (_between(0, 2), "a number between 0 and 2 (0 and 1 at Anthropic)", _DEFAULT_FIX),
    "top_p": (_between(0, 1), "a number between 0 and 1", _DEFAULT_FIX),
    "frequency_penalty": (_between(-2, 2), "a number between -2 and 2", _DEFAULT_FIX),
    "presence_penalty": (_between(-2, 2), "a number between -2 and 2", _DEFAULT_FIX),
    "max_tokens": (_whole_from(1), "a whole number >= 1", _DEFAULT_FIX),
    "max_completion_tokens": (_whole_from(1), "a whole number >= 1", _DEFAULT_FIX),
    "max_output_tokens": (_whole_from(1), "a whole number >= 1", _DEFAULT_FIX),
    "n": (lambda v: type(v) is int and v == 1, "1", "one request makes one output here: submit n requests with "
          "ids of their own"),
    "seed": (_whole_from(None), "a whole number", _DEFAULT_FIX),
    "stop": (lambda v: isinstance(v, str) or _strings(v), "a string or a list of strings", _DEFAULT_FIX),
    "stop_sequences": (_strings, "a list of strings", _DEFAULT_FIX),
    # The engine reads a whole answer, and a batch API has no streams: a streamed sync call is generated and
    # billed, then cannot be read (a batch file's line or a driver's body reached the provider with it; only the
    # endpoint's chat route refused it).
    "stream": (lambda v: v is False, "false", "the engine answers with the whole output once it is ready: leave "
               "it out"),
    # OpenAI Responses' background mode answers at once with a queued response, no output and no usage, and
    # runs (and bills) the call later, out of the engine's sight: it would be read as an empty answer at $0.
    # An image's background ("transparent", "opaque", "auto") is a string and passes.
    "background": (lambda v: v is not True, "false, or for an image 'transparent', 'opaque' or 'auto'",
                   "the engine already waits for the answer (and batches it) on its own: leave it out"),
    # A json_schema format without its json_schema object passed, rode its deadline (a batch window: hours), and
    # the provider refused the call ("Missing required parameter: 'response_format.json_schema'"; a hunt).
    "response_format": (lambda v: isinstance(v, dict) and v.get("type") in ("text", "json_object", "json_schema")
                        and (v["type"] != "json_schema" or isinstance(v.get("json_schema"), dict)),
                        "an object whose type is 'text', 'json_object' or 'json_schema', the last with its "
                        "json_schema object ({'name': ..., 'schema': {...}})", _DEFAULT_FIX),
    # Bookkeeping fields an app sets on every call: a wrong type passed, rode its deadline, and the provider
    # refused the call (a hunt of ``serve`` with the SDKs). Types only: their limits differ by provider.
    "user": (lambda v: isinstance(v, str), "a string (an opaque id of your user)", "send it as a string"),
    "store": (lambda v: type(v) is bool, "true or false", "fix it, or leave it out"),
    # The tier is the policy's: smart sends OpenAI's flex tier itself where it pays (docs/policies.md); priority
    # is billed at prices the catalog does not list.
    "service_tier": (lambda v: v in ("auto", "default", "standard_only"), "'auto' or 'default' (OpenAI), "
                     "'auto' or 'standard_only' (Anthropic)", "the policy picks the tier (smart sends OpenAI's "
                     "flex tier itself where the deadline allows), and priority is billed at prices the catalog "
                     "does not list: leave it out"),
}
# An images body's response_format: told apart from a chat one's, as the image refusal was told "an object whose
# type is 'text', ..." and to send a chat format (a hunt with the SDK's images.generate).
_IMAGE_FORMATS = ("b64_json", "url")
GENERATION_PARAMS: Mapping[str, tuple[Callable[[Any], bool], str, str]] = MappingProxyType(_RULES)
# Narrower ranges of one wire format, checked once the request's provider is known.
_API_RULES: dict[str, dict[str, tuple[Callable[[Any], bool], str, str]]] = {
    "anthropic": {
        "temperature": (_between(0, 1), "a number between 0 and 1 (Anthropic's range)", _DEFAULT_FIX),
        # Anthropic's top_k is an integer >= 0; 40.0, "40" or -1 passed here and the provider refused the call
        # (a tour, since stop 64). Only Anthropic's: an OpenAI-compatible server may take -1.
        "top_k": (_whole_from(0), "a whole number >= 0 (Anthropic's top_k)", _DEFAULT_FIX),
        # "each stop sequence must contain non-whitespace": OpenAI's stop: "\n", renamed by the endpoint, was
        # accepted, reserved for and batched, and Anthropic refused the call (a review).
        "stop_sequences": (lambda v: _strings(v) and all(s.strip() for s in v),
                           "a list of strings, each with a character other than whitespace (Anthropic's rule)",
                           "leave the blank ones out: Anthropic stops on no whitespace-only sequence"),
    },
}


def check_route(body: dict, where: str, api: str, route: str) -> None:
    """A body in the shape of another OpenAI endpoint than the model is called through (``route``: the catalog's
    ``api`` of the model, "chat" or "responses"): refused here, per request, rather than dispatched, reserved for
    and failed by the SDK ("Missing required arguments ... 'messages'"). A Responses body for chat completions or
    Messages goes as messages (``engine.core.responses_input``)."""
    if api != "openai":
        return
    if route == "responses" and "messages" in body and "input" not in body:
        raise FieldProblem(f"{where}.messages", f"{where}.messages is a /v1/chat/completions field, and this model "
                           "is called through /v1/responses: give input")


def check_generation(body: dict, where: str, api: str | None = None) -> None:
    """The well-known generation parameters of ``body`` (``GENERATION_PARAMS``) have their types and ranges;
    with ``api`` (the provider's wire format), only that format's narrower ranges. One dict lookup per key of
    the body: it runs for every request."""
    rules = _RULES if api is None else _API_RULES.get(api)
    if not rules:
        return
    for key, value in body.items():
        rule = rules.get(key)
        if rule is not None and value is not None and not rule[0](value):
            if key == "response_format" and value in _IMAGE_FORMATS:
                raise FieldProblem(f"{where}.{key}", f"{where}.{key} {value!r} is the engine's to set on an image "
                                   "call (it takes the image as the provider gives it, b64_json or url, and "
                                   "answers it so): leave it out")
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} must be {rule[1]}, got {shown}; {rule[2]}")


def check_params(params: dict, kind: str, model: str, known: tuple[str, ...]) -> None:
    """Unknown params are refused (a typo would otherwise be billed as the default), and so are values of the
    wrong type (``known``: the kind's own); the priced ones are checked against the catalog by the caller."""
    for key, value in params.items():
        if key not in known:
            if not known:
                raise FieldProblem(f"params.{key}", f"{kind} requests take no params; provider fields such as "
                                   f"{key!r} go in 'body' (or at the top level of the line)")
            raise FieldProblem(f"params.{key}", f"{model!r} ({kind}) has no parameter {key!r}; the known ones "
                               f"are {list(known)}")
        numeric = key in ("steps", "seed", "fps", "duration_s")
        if numeric and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise FieldProblem(f"params.{key}", f"params.{key} must be a number, got {value!r}")
        if not numeric and not isinstance(value, str):
            raise FieldProblem(f"params.{key}", f"params.{key} must be a string, got {value!r}")
        if key == "steps" and (not isinstance(value, int) or not 1 <= value <= 1000):
            raise FieldProblem("params.steps", f"params.steps must be a whole number in [1, 1000], got {value!r}")
        if key == "seed" and not isinstance(value, int):
            raise FieldProblem("params.seed", f"params.seed must be a whole number, got {value!r}")
        if key == "fps" and not 0 < value <= 240:
            raise FieldProblem("params.fps", f"params.fps must be in (0, 240], got {value!r}")


def tenant_problem(tenant: str) -> str | None:
    """What is wrong with ``tenant`` as a request's tenant (pydantic's words), or None. For one tenant that sets
    many requests (a CLI flag, a header): checked in each, it was reported against each, as a field of theirs."""
    from pydantic import ValidationError

    try:
        _tenant_rule().validate_python(tenant)
    except ValidationError as exc:
        return exc.errors()[0]["msg"]
    return tenant_ends_problem(tenant) if tenant != tenant.strip() else None


@functools.cache
def _tenant_rule() -> TypeAdapter:  # built once: the endpoint checks a tenant header on every call
    from pydantic import TypeAdapter

    from engine.core.request import Request

    return TypeAdapter(Annotated[(str, *Request.model_fields["tenant"].metadata)])
