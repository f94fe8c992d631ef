"""The top-level body fields each provider route takes, read from the installed SDKs' typed params (their
``TypedDict`` keys, bases included), so they follow the SDK's version rather than a list typed here. The real APIs
refuse any other field with a 400 (OpenAI: "Unrecognized request argument supplied" or "Unknown parameter";
Anthropic: "Extra inputs are not permitted"): the engine refuses a body that holds one before anything is
reserved or sent (``_api_fields``), and the emulator answers it as the API does (``engine.emulator._fields``).

``_BEYOND_SDK`` adds what an API takes that the SDK's types do not name, each with where it was read. A route
whose params the installed SDK lacks (an older SDK than the route) has no set, and its fields are not checked.
"""

from __future__ import annotations

import functools
import importlib

__all__ = ["sdk_fields"]

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
    "messages.count_tokens": ("anthropic.types.message_count_tokens_params:MessageCountTokensParams",),
    "messages.batches.create": ("anthropic.types.messages.batch_create_params:BatchCreateParams",),
    "messages.batches.request": ("anthropic.types.messages.batch_create_params:Request",),
}
# What an API takes beyond the SDK's types. Anthropic's sampling keys temperature, top_p and top_k: anthropic 2.x's
# MessageCreateParams no longer names them, but the Messages API takes them (the SDK for Ruby still types them, read
# on rubydoc.info on 2026-12-06; and the models that think adaptively only refuse them at a value but the default,
# a check of a field the API knows, not an extra input).
_BEYOND_SDK: dict[str, frozenset[str]] = {
    "messages": frozenset({"temperature", "top_p", "top_k"}),
}


def _keys(cls: type) -> set[str]:
    """A TypedDict's keys, its bases' included (``__required_keys__`` and ``__optional_keys__`` hold them all; the
    ``__annotations__`` of each class of its ``__mro__`` too)."""
    keys = set(getattr(cls, "__required_keys__", ())) | set(getattr(cls, "__optional_keys__", ()))
    for base in cls.__mro__:
        keys |= set(vars(base).get("__annotations__", {}))
    return keys


@functools.cache
def sdk_fields(route: str) -> frozenset[str] | None:
    """The top-level fields ``route`` takes (a name of ``_SDK_PARAMS``), or None where the installed SDK has none of
    its params."""
    keys: set[str] = set()
    found = False
    for path in _SDK_PARAMS.get(route, ()):
        module, _, cls = path.partition(":")
        try:
            keys |= _keys(getattr(importlib.import_module(module), cls))
        except (ImportError, AttributeError):
            continue
        found = True
    return frozenset(keys | _BEYOND_SDK.get(route, frozenset())) if found else None
