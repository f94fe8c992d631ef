"""The top-level body fields each provider route takes, read from the installed SDKs' typed params (their
``TypedDict`` keys, bases included), so they follow the SDK's version rather than a list typed here. The real APIs
refuse any other field with a 400 (OpenAI: "Unrecognized request argument supplied" or "Unknown parameter";
Anthropic: "Extra inputs are not permitted"): the engine refuses a body that holds one before anything is
reserved or sent (``_api_fields``), and the emulator answers it as the API does (``engine.emulator._fields``).

``_BEYOND_SDK`` adds what an API takes that the SDK's types do not name, each with where it was read. A route
whose params the installed SDK lacks (an older SDK than the route) has no set, and its fields are not checked; so
has a route whose params lack a field the engine itself sends or checks there (``_CANARIES``): the SDK is older than
the API the engine calls (pyproject lets ``openai>=1.60`` and ``anthropic>=0.45`` in, whose params name no
``prompt_cache_key`` or ``thinking``), and its set would refuse what the API takes.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from engine.core._checks import FieldProblem

if TYPE_CHECKING:
    from engine.core.catalog import ModelSpec

__all__ = ["check_openai_fields", "sdk_fields"]

# Per route: the SDK params whose keys it takes ("module:Class"; the streaming twins for the ``stream`` key the SDK
# sends itself).
_SDK_PARAMS: dict[str, tuple[str, ...]] = {
    "chat.completions": ("openai.types.chat.completion_create_params:CompletionCreateParamsNonStreaming",
                         "openai.types.chat.completion_create_params:CompletionCreateParamsStreaming"),
    "responses": ("openai.types.responses.response_create_params:ResponseCreateParamsNonStreaming",
                  "openai.types.responses.response_create_params:ResponseCreateParamsStreaming"),
    "images.generations": ("openai.types.image_generate_params:ImageGenerateParamsNonStreaming",
                           "openai.types.image_generate_params:ImageGenerateParamsStreaming"),
    "videos": ("openai.types.video_create_params:VideoCreateParams",),
    "files.create": ("openai.types.file_create_params:FileCreateParams",),
    "batches.create": ("openai.types.batch_create_params:BatchCreateParams",),
    "messages": ("anthropic.types.message_create_params:MessageCreateParamsNonStreaming",
                 "anthropic.types.message_create_params:MessageCreateParamsStreaming"),
    # the beta route's, which the engine does not call (its fields are named as beta ones when refused)
    "messages.beta": ("anthropic.types.beta.message_create_params:MessageCreateParamsNonStreaming",),
    "messages.count_tokens": ("anthropic.types.message_count_tokens_params:MessageCountTokensParams",),
    "messages.batches.create": ("anthropic.types.messages.batch_create_params:BatchCreateParams",),
    "messages.batches.request": ("anthropic.types.messages.batch_create_params:Request",),
}
# What an API takes beyond the SDK's types. Anthropic's sampling keys temperature, top_p and top_k: anthropic 2.x's
# MessageCreateParams no longer names them, but the Messages API takes them (its create-message request schema lists
# them, and the SDK for Ruby still types them: both read on 2026-12-06; the models that think adaptively only refuse
# them at a value but the default, a check of a field the API knows, not an extra input).
_BEYOND_SDK: dict[str, frozenset[str]] = {
    "messages": frozenset({"temperature", "top_p", "top_k"}),
}

# Per route: fields the engine sends itself (``prompt_cache_key``, ``service_tier`` at the provider's own address) or
# takes from a request and checks (``thinking``). Params that lack one are of an SDK older than the API the engine
# calls: with openai 1.60 the emulator refused the engine's own prompt_cache_key (every call sharing a prefix failed)
# and with anthropic 0.45 the engine refused a request's thinking, cache_control or service_tier (a review).
_CANARIES: dict[str, frozenset[str]] = {
    "chat.completions": frozenset({"prompt_cache_key", "service_tier", "max_completion_tokens"}),
    "responses": frozenset({"prompt_cache_key", "service_tier", "max_output_tokens"}),
    "messages": frozenset({"service_tier", "thinking", "cache_control"}),
    "messages.count_tokens": frozenset({"thinking"}),
}


def _keys(cls: type) -> set[str]:
    """A TypedDict's keys, its bases' included (``__required_keys__`` and ``__optional_keys__`` hold them all; the
    ``__annotations__`` of each class of its ``__mro__`` too)."""
    keys = set(getattr(cls, "__required_keys__", ())) | set(getattr(cls, "__optional_keys__", ()))
    for base in cls.__mro__:
        keys |= set(vars(base).get("__annotations__", {}))
    return keys


_IMPORTING = threading.Lock()


def _import(module: str) -> Any:
    # The emulator's handler threads read a route's params on its first call, several at once under a burst, and an
    # import of the SDK's submodules from two threads at once raised KeyError for their package (a loaded run's batch
    # create answered 500 "KeyError: 'openai.types'"): one at a time, and once more should another import have
    # raced it (the modules are in ``sys.modules`` by then).
    with _IMPORTING:
        try:
            return importlib.import_module(module)
        except KeyError:
            return importlib.import_module(module)


@functools.cache
def sdk_fields(route: str) -> frozenset[str] | None:
    """The top-level fields ``route`` takes (a name of ``_SDK_PARAMS``), or None where the installed SDK has none of
    its params, or params too old to name the fields the engine sends there (``_CANARIES``)."""
    keys: set[str] = set()
    found = False
    for path in _SDK_PARAMS.get(route, ()):
        module, _, cls = path.partition(":")
        try:
            keys |= _keys(getattr(_import(module), cls))
        except (ImportError, AttributeError):
            continue
        found = True
    keys |= _BEYOND_SDK.get(route, frozenset())
    return frozenset(keys) if found and _CANARIES.get(route, frozenset()) <= keys else None


def _openai_route(spec: ModelSpec) -> tuple[str, str]:
    """The route a model of OpenAI's is called at: its name here and its path."""
    if spec.kind == "image":
        return "images.generations", "/v1/images/generations"
    if spec.kind == "video":
        return "videos", "/v1/videos"
    return ("responses", "/v1/responses") if spec.api == "responses" else ("chat.completions", "/v1/chat/completions")


def check_openai_fields(body: Mapping[str, Any], where: str, spec: ModelSpec) -> None:
    """Raise ``FieldProblem`` for a top-level field of ``body`` (as it goes on the wire) that OpenAI's route for
    ``spec`` does not take: OpenAI answers it 400 for that call alone, after the request was accepted, reserved for
    and perhaps batched (the emulator took any field until stop 71, so none was seen failing)."""
    route, path = _openai_route(spec)
    known = sdk_fields(route)
    unknown = sorted(k for k in body if known is not None and k not in known)
    if not unknown:
        return
    key = unknown[0]
    anthropic = sdk_fields("messages") or frozenset()
    why = (" (it is a field of Anthropic's Messages API)" if key in anthropic else
           " (it is a field of OpenAI's Responses API)" if key in (sdk_fields("responses") or ()) else
           " (it is a field of OpenAI's chat completions)" if key in (sdk_fields("chat.completions") or ()) else "")
    raise FieldProblem(f"{where}.{key}", f"{where}.{key} is not a field of OpenAI's {path}{why}, which refuses any "
                       "field it does not know (\"Unrecognized request argument supplied\"): check its spelling, or "
                       "leave it out")
