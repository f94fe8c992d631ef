"""What one provider's wire format refuses that another's takes (``check_api_body``): checked once the request's
provider is known, per request, where the provider would refuse the call after the request was accepted,
reserved for and perhaps batched (a helper's hunt of the emulator, whose answers now match)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from engine.core._checks import FieldProblem, cache_blocks
from engine.core._gemini import check_gemini_body
from engine.core._sdk_fields import sdk_fields

if TYPE_CHECKING:
    from engine.core.catalog import ModelSpec

__all__ = ["ANTHROPIC_BLOCKS", "MAX_CACHE_MARKS", "MIN_THINKING_BUDGET", "anthropic_block", "anthropic_role_problem",
           "check_api_body"]

# OpenAI fields that Anthropic's Messages API does not take ("Extra inputs are not permitted"): each with its
# fix. Sent, they reached the provider as extra body keys and the call was refused after the request was
# accepted and perhaps batched (a helper's hunt of the emulator).
_NOT_ANTHROPIC = {
    "stop": "Anthropic's is stop_sequences, a list of strings",
    "max_completion_tokens": "Anthropic's is max_tokens",
    "max_output_tokens": "Anthropic's is max_tokens",
    "response_format": "Anthropic's structured output is output_config",
    "n": "one request makes one output: submit n requests with ids of their own",
    "user": "Anthropic's is metadata.user_id",
    "reasoning_effort": "Anthropic's is thinking",
    "parallel_tool_calls": "Anthropic's is tool_choice.disable_parallel_tool_use",
    **dict.fromkeys(("seed", "frequency_penalty", "presence_penalty", "logit_bias", "logprobs", "top_logprobs",
                     "prompt_cache_key"), "Anthropic has no such field: leave it out"),
}
# Content parts of the other wire format, each with its own format's counterpart: a body written for one provider
# and sent to a model of the other (a model swapped in a driver script) was refused by the provider after.
_IMAGE_AT_ANTHROPIC = "Anthropic's image is {'type': 'image', 'source': {'type': 'url', 'url': ...}} (or base64)"
_FOREIGN_PARTS = {
    "anthropic": {"image_url": _IMAGE_AT_ANTHROPIC, "input_image": _IMAGE_AT_ANTHROPIC,
                  "input_text": "give {'type': 'text', 'text': ...}", "output_text": "give {'type': 'text', ...}",
                  "file": "Anthropic's is a document block", "input_file": "Anthropic's is a document block",
                  "input_audio": "Anthropic takes no audio", "refusal": "give the assistant's text as a text block"},
    "openai": {"image": "OpenAI's image is {'type': 'image_url', 'image_url': {'url': ...}}",
               "document": "OpenAI's is {'type': 'file', 'file': ...}",
               "tool_use": "OpenAI's are an assistant message's tool_calls",
               "tool_result": "OpenAI's is a message of role 'tool' with its tool_call_id",
               "thinking": "leave it out", "redacted_thinking": "leave it out"},
}
# The content blocks a message takes (the SDK's ContentBlockParam, compaction, a beta one, and tool_reference, of a
# tool_result's content), and any server
# tool's result (``*_tool_result``, a family that grows): a block of another type is "Input tag ... does not
# match any of the expected tags" (a tour, since stop 64).
ANTHROPIC_BLOCKS = frozenset({
    "text", "image", "document", "search_result", "thinking", "redacted_thinking", "tool_use", "tool_result",
    "server_tool_use", "container_upload", "compaction", "tool_reference"})
MIN_THINKING_BUDGET = 1024  # Anthropic's floor of thinking.budget_tokens
# The roles of Anthropic's messages; a message of role system is taken only mid-conversation, at few models
# (``_check_system_message``).
_ANTHROPIC_ROLES = ("user", "assistant")
MAX_CACHE_MARKS = 4  # cache_control blocks in one Anthropic request
# The output caps each OpenAI endpoint takes, the one to give last.
_CAPS = {"chat": ("max_tokens", "max_completion_tokens"), "responses": ("max_output_tokens",)}
_CAPS_ALL = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def check_api_body(body: dict, where: str, api: str, spec: ModelSpec, compat: str | None = None) -> None:
    """What the provider's wire format refuses that another's takes (``body`` as it goes on the wire): a cap under
    another endpoint's name; the other API's content parts; at an OpenAI reasoning model, ``max_tokens``, an effort
    it does not take (``efforts``) and a temperature or top_p other than 1; at a Claude model that thinks adaptively
    only, a manual thinking budget and a sampling parameter but its default, and a forced tool where the model refuses one
    (``forced_tool_choice``); at Gemini's OpenAI-compatible layer (``compat``), what it does not document
    (``check_gemini_body``); at Anthropic, OpenAI's fields, roles and metadata keys, a system message among the
    messages where the model takes none there (``_check_system_message``), a non-text one, the ``fast`` speed
    (priced apart from the catalog's) and a fifth cache mark. Each was accepted, reserved for and sent, and the
    provider answered 400 for that call alone (a helper's hunt)."""
    # A cap under another endpoint's name is no cap there: the budget reserved for it, and the call ran to the
    # model's maximum (a lenient server ignores the key; a helper's hunt: a hard budget overrun tenfold).
    own = _CAPS.get(spec.api) if api == "openai" else None
    for key in _CAPS_ALL if own else ():
        if key in body and key not in own:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is not a cap of this model's endpoint "
                               f"(/v1/{'chat/completions' if spec.api == 'chat' else 'responses'}): give {own[-1]}")
    if api == "openai" and spec.reasoning:
        if body.get("max_tokens") is not None:
            # Given with max_completion_tokens (an app moving to the new cap), "give max_completion_tokens" named
            # the fix already made (a hunt with the SDK).
            fix = ("leave it out: max_completion_tokens, given too, is the cap" if
                   body.get("max_completion_tokens") is not None else
                   "give max_completion_tokens (it also counts the model's reasoning tokens)")
            raise FieldProblem(f"{where}.max_tokens", f"{where}.max_tokens is refused by OpenAI for reasoning models; "
                               + fix)
        effort = spec.effort(body)
        if spec.efforts is not None and effort not in spec.efforts:
            key = "reasoning_effort" if body.get("reasoning_effort") else "reasoning.effort"
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} {str(effort)[:20]!r} is refused by OpenAI for "
                               f"{body.get('model') or 'this model'}: give one of {', '.join(spec.efforts)}")
        for key in ("temperature", "top_p") if spec.fixed_sampling(body) else ():
            if body.get(key) not in (None, 1):
                none = (" unless the reasoning effort is 'none'" if spec.effort_default is not None
                        and "none" in (spec.efforts or ("none",)) else "")
                raise FieldProblem(f"{where}.{key}", f"{where}.{key} must be 1 or left out: OpenAI's reasoning "
                                   f"models take no other value{none}, got {body[key]!r}")
    _check_parts(body, where, api)
    # The provider's own OpenAI-compatible layer (ProviderSpec.compat); a video goes to Veo's own route instead,
    # whose body Google checks (before, every Veo body field was refused as the layer's: a helper's tour).
    if api == "openai" and compat == "gemini" and spec.kind != "video":
        check_gemini_body(body, where, spec)
    if api != "anthropic":
        return
    if spec.adaptive_only:
        _check_adaptive(body, where)
    choice = body.get("tool_choice")
    if not spec.forced_tool_choice and isinstance(choice, Mapping) and choice.get("type") in ("any", "tool"):
        raise FieldProblem(f"{where}.tool_choice", f"{where}.tool_choice {{type: {str(choice['type'])!r}}} forces a tool, "
                           "which this model refuses: give {'type': 'auto'} (or 'none') and ask for the tool in the "
                           "prompt")
    for key, fix in _NOT_ANTHROPIC.items():
        if key in body:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is an OpenAI field that Anthropic's Messages API "
                               f"refuses; {fix}")
    _check_anthropic_fields(body, where)
    _check_thinking_budget(body, where)
    if body.get("speed") not in (None, "standard"):
        raise FieldProblem(f"{where}.speed", f"{where}.speed {body['speed']!r} is billed at other prices than the "
                           "catalog's standard speed: leave it out")
    marks = [path for path, block in cache_blocks(body)
             if isinstance(block, dict) and block.get("cache_control") is not None]
    if len(marks) > MAX_CACHE_MARKS:
        field = f"{where}{marks[MAX_CACHE_MARKS]}.cache_control"
        raise FieldProblem(field, f"{field} is mark {MAX_CACHE_MARKS + 1} of {len(marks)}, and Anthropic takes at "
                           f"most {MAX_CACHE_MARKS} cache_control marks a request: keep the marks at the ends of "
                           "the parts that repeat (the tools, the system prompt, the conversation so far)")
    meta = body.get("metadata")
    if meta is not None and (not isinstance(meta, dict) or set(meta) - {"user_id"}):
        raise FieldProblem(f"{where}.metadata", f"{where}.metadata takes only user_id at Anthropic, got "
                           f"{str(meta)[:60]}; leave the other keys out")
    if meta is not None and not isinstance(meta.get("user_id"), (str, type(None))):  # Anthropic's 400, after a wait
        raise FieldProblem(f"{where}.metadata.user_id", f"{where}.metadata.user_id must be a string (an opaque id "
                           f"of your user), got {repr(meta['user_id'])[:40]}: send it as a string")
    _check_empty_text(body.get("system"), f"{where}.system")
    messages = body.get("messages") or ()
    for k, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role == "system":
            _check_system_message(messages, k, spec, where)
        elif role not in _ANTHROPIC_ROLES:
            field = f"{where}.messages[{k}].role"
            raise FieldProblem(field, anthropic_role_problem(role, field))
        extra = sorted(key for key in m if key not in ("role", "content"))
        if extra:  # OpenAI's participant ``name`` above all: the provider's "Extra inputs are not permitted"
            fix = "name the speaker in the content" if extra[0] == "name" else "leave it out"
            raise FieldProblem(f"{where}.messages[{k}].{extra[0]}", f"{where}.messages[{k}].{extra[0]} is not a "
                               f"field of an Anthropic message (role, content): {fix}")
        content = m.get("content")
        if content in ("", []) and not (role == "assistant" and k == len(body["messages"]) - 1):
            field = f"{where}.messages[{k}].content"
            raise FieldProblem(field, f"{field} is empty, and Anthropic refuses a message with no content (but a "
                               "final assistant message): leave the message out, or give it content")
        _check_empty_text(content, f"{where}.messages[{k}].content")
        if role == "system" and isinstance(content, list):
            bad = next((i for i, b in enumerate(content) if not isinstance(b, Mapping) or b.get("type") != "text"),
                       None)
            if bad is not None:
                field = f"{where}.messages[{k}].content[{bad}]"
                raise FieldProblem(field, f"{field} must be a text block: Anthropic takes only text in a system "
                                   "message; put images and documents in a user message")


def _check_anthropic_fields(body: dict, where: str) -> None:
    """A top-level field the Messages API does not take (the SDK's ``MessageCreateParams``, ``_sdk_fields``; the
    emulator answers with the same set) is "Extra inputs are not permitted", for that call alone, after the request
    was accepted, reserved for and perhaps batched (a tour, since stop 64). A beta field is one too: the API takes
    it only under its ``anthropic-beta`` header, which the engine does not send (until stop 71 the beta fields
    passed here, and ``context_management`` or ``betas`` in a body was refused by the provider)."""
    known = sdk_fields("messages")
    unknown = sorted(key for key in body if known is not None and key not in known)
    if not unknown:
        return
    key = unknown[0]
    beta = key in (sdk_fields("messages.beta") or ())
    why = (" (a beta field: the API takes it only under its anthropic-beta header, which the engine does not send)"
           if beta else "")
    raise FieldProblem(f"{where}.{key}", f"{where}.{key} is not a field of Anthropic's Messages API{why}, which "
                       "refuses any other (\"Extra inputs are not permitted\"): check its spelling, or leave it out")


def anthropic_block(kind: object) -> bool:
    """Whether ``kind`` is the type of a content block Anthropic's messages take."""
    return isinstance(kind, str) and (kind in ANTHROPIC_BLOCKS or kind.endswith("_tool_result"))


def _check_thinking_budget(body: dict, where: str) -> None:
    """A manual thinking budget (``thinking: {type: "enabled", budget_tokens}``) is a whole number of at least
    ``MIN_THINKING_BUDGET`` and, but where interleaved thinking with tools lets it reach past the cap, less than
    ``max_tokens``: Anthropic answered any other 400, after the request was accepted (a tour, since stop 64)."""
    thinking = body.get("thinking")
    if not isinstance(thinking, Mapping) or thinking.get("type") != "enabled":
        return
    field, budget, cap = f"{where}.thinking.budget_tokens", thinking.get("budget_tokens"), body.get("max_tokens")
    if type(budget) is not int or budget < MIN_THINKING_BUDGET:
        raise FieldProblem(field, f"{field} must be a whole number >= {MIN_THINKING_BUDGET} (Anthropic's floor), got "
                           f"{str(budget)[:20]}: give at least {MIN_THINKING_BUDGET}, or leave thinking out")
    if not body.get("tools") and type(cap) is int and budget >= cap:
        raise FieldProblem(field, f"{field} {budget} is not less than max_tokens {cap}, and Anthropic takes a "
                           "thinking budget only below the cap (the thinking is part of the output): raise "
                           f"{where}.max_tokens above it, or lower the budget")


def anthropic_role_problem(role: object, field: str) -> str:
    """What to say of ``role``, no role of an Anthropic message (but system, ``_check_system_message``'s), at
    ``field``: Anthropic's roles and the fix (an OpenAI role: where its content goes in Anthropic's shape)."""
    fix = ("give a tool's output as a tool_result block in a user message" if role in ("tool", "function")
           else "give it as the top-level system field" if role == "developer" else "use user or assistant")
    said = "is missing" if role is None else f"{str(role)[:40]!r} is not one of Anthropic's"
    return f"{field} {said} ({', '.join(_ANTHROPIC_ROLES)}); {fix}"


def _check_system_message(messages: Sequence, k: int, spec: ModelSpec, where: str) -> None:
    """Anthropic's system prompt is its top-level ``system``; a message of role system among the messages is its
    mid-conversation system message, which a model takes only where the catalog says so
    (``ModelSpec.mid_conversation_system``), never first, right after a user turn (or an assistant one that ends in
    a server tool use), then last or before an assistant turn. Any other answered 400 ("Unexpected role
    \"system\""), after the request was accepted, reserved for and perhaps batched (since stop 64)."""
    field = f"{where}.messages[{k}].role"
    fix = ("put the system instructions first, as the top-level system field (an OpenAI body's leading system "
           "messages go there), or say this in a user message")
    if not spec.mid_conversation_system:
        raise FieldProblem(field, f"{field}: a system message among the messages is refused by Anthropic at this "
                           f"model, which takes a system prompt only ahead of the conversation: {fix}")
    before = messages[k - 1] if k > 0 and isinstance(messages[k - 1], Mapping) else {}
    after = messages[k + 1] if k + 1 < len(messages) and isinstance(messages[k + 1], Mapping) else None
    if k == 0 or not (before.get("role") == "user" or before.get("role") == "assistant"
                      and _ends_in_server_tool(before.get("content"))):
        said = "opens the conversation" if k == 0 else "follows no user turn"
        raise FieldProblem(field, f"{field}: a system message {said}, and Anthropic takes one among the messages only "
                           f"right after a user turn (or an assistant one that ends in a server tool use): {fix}")
    if after is not None and after.get("role") != "assistant":
        raise FieldProblem(field, f"{field}: a system message is followed by a {str(after.get('role'))[:20]!r} "
                           "message, and Anthropic takes one among the messages only last or right before an "
                           f"assistant turn: {fix}")


def _ends_in_server_tool(content: object) -> bool:
    last = content[-1] if isinstance(content, list) and content else None
    return isinstance(last, Mapping) and last.get("type") == "server_tool_use"


def _check_empty_text(content: object, where: str) -> None:
    """Anthropic refuses a text block with no text ("text content blocks must be non-empty"): refused here, per
    request, where it was accepted, perhaps batched, and then refused by the provider (a review)."""
    for j, block in enumerate(content if isinstance(content, list) else ()):
        if isinstance(block, Mapping) and block.get("type") == "text" and block.get("text") == "":
            raise FieldProblem(f"{where}[{j}].text", f"{where}[{j}].text is empty, and Anthropic refuses an empty "
                               "text block: leave the block out, or give it text")


def _check_adaptive(body: dict, where: str) -> None:
    """What a Claude model that thinks adaptively only (Sonnet 5 on) answers 400 to: a manual thinking budget, and
    a sampling parameter other than its default (``ModelSpec.adaptive_only``)."""
    thinking = body.get("thinking")
    if isinstance(thinking, Mapping) and thinking.get("type") == "enabled":
        raise FieldProblem(f"{where}.thinking", f"{where}.thinking {{type: 'enabled'}} (a manual budget) is refused "
                           "by this model, which thinks adaptively only: give {'type': 'adaptive'} or leave it out, "
                           "and steer the depth with output_config.effort")
    for key, default in (("temperature", (None, 1)), ("top_p", (None, 1)), ("top_k", (None,))):
        if body.get(key) not in default:
            raise FieldProblem(f"{where}.{key}", f"{where}.{key} is refused by this model at any value but its "
                               f"default, got {body[key]!r}: leave it out")


def _check_parts(body: dict, where: str, api: str) -> None:
    foreign = _FOREIGN_PARTS.get(api)
    if foreign is None:
        return
    for k, m in enumerate(body.get("messages") or ()):
        content = m.get("content") if isinstance(m, Mapping) else None
        for i, part in enumerate(content if isinstance(content, list) else ()):
            kind = part.get("type") if isinstance(part, Mapping) else None
            field = f"{where}.messages[{k}].content[{i}].type"
            if isinstance(kind, str) and kind in foreign:
                raise FieldProblem(field, f"{field} {kind!r} is a part of another provider's API, which "
                                   f"{'Anthropic' if api == 'anthropic' else 'OpenAI'} refuses; {foreign[kind]}")
            if api == "anthropic" and isinstance(part, Mapping) and not anthropic_block(kind):
                raise FieldProblem(field, f"{field} {str(kind)[:40]!r} is not a content block Anthropic takes: give "
                                   "one of text, image, document, tool_use, tool_result (or another block of "
                                   "Anthropic's Messages API)")
