"""Input images count in the estimate by their provider's rule, the emulator bills the same, and a budget
reserves for them; so does the system prompt Anthropic adds to a call with tools."""

import base64
import io
import math
import struct

import pytest
from PIL import Image

from engine.core.body_tokens import (
    ImageInput,
    body_image_tokens,
    image_size,
    image_tokens,
    split_body,
    tool_chars,
)
from engine.core.catalog import default_catalog
from engine.core.cost import price_usage, reserve_bound
from engine.core.request import Request
from engine.emulator._text import anthropic_prompt, chat_prompt, responses_prompt

TILES = ImageInput(scheme="tiles")  # GPT-4o's: 85 + 170 a tile
PATCHES = ImageInput(scheme="patches")  # GPT-4.1's: a token a patch
AREA = ImageInput(scheme="area")


def encoded(fmt: str, size: tuple[int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP"])
@pytest.mark.parametrize("size", [(1, 1), (1024, 768), (333, 2049)])
def test_an_image_s_size_is_read_from_its_header(fmt, size):
    data = encoded(fmt, size)
    assert image_size(data) == size
    assert image_size(f"data:image/{fmt.lower()};base64,{data}") == size


def test_an_image_the_body_does_not_carry_has_no_size():
    assert image_size("https://example.com/cat.png") is None
    assert image_size("") is None
    assert image_size("data:image/png;base64,not base64 at all!") is None
    assert image_size(base64.b64encode(b"plain text, no image header").decode()) is None


ZERO_SIDED = {  # headers that give a width or height of 0 (a JPEG may give its height later, in a DNL segment)
    "png 0 x 0": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + struct.pack(">II", 0, 0) + b"\x08\x02\x00\x00\x00",
    "gif 640 x 0": b"GIF89a" + struct.pack("<HH", 640, 0) + b"\x00\x00\x00",
    "jpeg 640 x 0": b"\xff\xd8\xff\xc0" + struct.pack(">HBHH", 17, 8, 0, 640) + bytes(16),
}


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-5", "gpt-5-mini", "claude-haiku-4-5"])
@pytest.mark.parametrize("header", list(ZERO_SIDED), ids=list(ZERO_SIDED))
def test_an_image_with_a_side_of_0_counts_as_an_unknown_one_and_never_fails_validation(model, header):
    """The tile and area rules divided by the side (ZeroDivisionError out of request validation and out of the
    emulator), and the patch rule counted such an image as 0 tokens."""
    data = base64.b64encode(ZERO_SIDED[header]).decode()
    assert image_size(data) is None
    cat = default_catalog()
    provider, _ = cat.find_model(model)
    image = ({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}
             if provider == "anthropic" else {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
    cap = "max_tokens" if provider == "anthropic" else "max_completion_tokens"
    body = {cap: 10, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, image]}]}
    r = Request.model_validate({"id": "z", "arrival_s": 0.0, "model": model, "body": body})
    rule = cat.image_rule(provider, model)
    assert r.input_tokens >= image_tokens(rule, None) >= 85
    assert (anthropic_prompt if provider == "anthropic" else chat_prompt)(body, rule).tokens <= r.input_tokens


@pytest.mark.parametrize("rule,size,detail,tokens", [
    # The providers' own worked examples.
    (TILES, (1024, 1024), "high", 765),  # 768 x 768: 4 tiles
    (TILES, (2048, 4096), "high", 1105),  # 1024 x 2048, then 768 x 1536: 6 tiles
    (TILES, (4096, 8192), "low", 85),
    (TILES, None, "auto", 85 + 8 * 170),  # unknown: the most tiles an image can make
    (PATCHES, (1024, 1024), "auto", 1024),
    (PATCHES, (1800, 2400), "auto", 1452),  # scaled down to fit 1,536 patches
    (ImageInput(scheme="patches", multiplier=1.62), None, "auto", 2489),
    (AREA, (1092, 1092), "auto", 1590),
    (AREA, (200, 200), "auto", 54),
    (AREA, (8000, 8000), "auto", 1600),
    (AREA, None, "auto", 1600),
])
def test_image_tokens_follow_each_provider_s_documented_rule(rule, size, detail, tokens):
    assert image_tokens(rule, size, detail) == tokens


IMG = encoded("PNG", (1024, 1024))
CASES = [  # model, the emulator's prompt of that API, a body with a 1024 x 1024 image and one given by URL
    ("gpt-5", chat_prompt, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is in these pictures?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG}"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg", "detail": "high"}}]}]}),
    ("gpt-4o-mini", chat_prompt, {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "Describe it."},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{IMG}", "detail": "low"}}]}]}),
    ("gpt-5-mini", responses_prompt, {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "What is in this picture?"},
        {"type": "input_image", "image_url": f"data:image/png;base64,{IMG}"}]}]}),
    ("claude-haiku-4-5", anthropic_prompt, {"max_tokens": 50, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.png"}},
        {"type": "text", "text": "Compare them."}]}]}),
    ("claude-haiku-4-5", anthropic_prompt, {"max_tokens": 50, "system": "You grade charts.", "messages": [
        {"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMG}},
            {"type": "text", "text": "Grade this chart against the reference."}]}]}),
]


@pytest.mark.parametrize("model,billed_by,body", CASES, ids=[c[0] for c in CASES[:-1]] + ["with system"])
def test_the_estimate_counts_images_as_the_emulator_bills_them_and_the_budget_reserves_for_them(model, billed_by,
                                                                                              body):
    """Images were not counted: a question about a picture was estimated at 7 tokens and billed 600-50,000
    (gpt-4o-mini bills a 512 px tile as 5,667 tokens), so a hard budget reserved for a fraction of the call."""
    cat = default_catalog()
    provider, _ = cat.find_model(model)
    rule = cat.image_rule(provider, model)
    r = Request.model_validate({"id": "v", "arrival_s": 0.0, "model": model, "body": body})
    billed = billed_by(body, rule).tokens
    images = body_image_tokens(body, rule)
    assert images >= 80 and billed >= images
    assert billed <= r.input_tokens <= billed + 2  # (the engine joins texts with a newline)
    assert reserve_bound(r, cat, "sync") >= price_usage(r, cat, "sync", input_tokens=billed,
                                                        output_tokens=r.max_output_tokens or 0).total
    text_only = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": model, "body": {
        **{k: v for k, v in body.items() if k != "system"},
        ("input" if "input" in body else "messages"): [{"role": "user", "content": "x"}]}})
    assert r.input_tokens - text_only.input_tokens >= images - 10


def test_the_same_image_is_the_same_prompt_prefix_and_another_image_is_not():
    """The emulator stands an image in the cache order as text of its token count, so a prompt-cache prefix
    that holds an image hits only for the same image."""
    other = encoded("PNG", (1024, 1000))

    def body(img):
        return {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{img}"}},
            {"type": "text", "text": "Caption it."}]}]}

    a, b, c = (chat_prompt(body(x), TILES) for x in (IMG, IMG, other))
    assert a == b and a.tokens == c.tokens and a.text != c.text


def test_a_prompt_given_beside_a_body_does_not_hide_what_the_body_sends():
    """The body is sent unchanged; a 'prompt' beside it is a label. The estimate read the label: 3 tokens for a
    call the emulator billed 10,000."""
    body = {"messages": [{"role": "user", "content": "x" * 40_000}]}
    r = Request.model_validate({"id": "p", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": "short label",
                                "body": body})
    assert r.prompt == "short label"
    assert r.input_tokens >= chat_prompt(body).tokens == 10_000


ARGS = '{"path": "src/app.py", "patch": "' + "def f(x):\\n    return x + 1\\n" * 200 + '"}'
AGENT_CASES = [  # an agent's history: the model's tool calls and their results, as each API carries them
    ("gpt-5", chat_prompt, {"messages": [
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "edit_file", "arguments": ARGS}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "applied"},
        {"role": "user", "content": "Now run the tests."}]}),
    ("gpt-5-mini", responses_prompt, {"input": [
        {"role": "user", "content": "Fix the bug."},
        {"type": "function_call", "call_id": "c1", "name": "edit_file", "arguments": ARGS},
        {"type": "function_call_output", "call_id": "c1", "output": "applied " * 300},
        {"role": "user", "content": "Now run the tests."}]}),
    ("claude-haiku-4-5", anthropic_prompt, {"max_tokens": 50, "messages": [
        {"role": "user", "content": "Fix the bug."},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "edit_file",
                                           "input": {"path": "src/app.py", "patch": "x = 1\n" * 500}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [
            {"type": "text", "text": "applied; screenshot:"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMG}}]}]},
        {"role": "user", "content": "Now run the tests."}]}),
]


@pytest.mark.parametrize("model,billed_by,body", AGENT_CASES, ids=[c[0] for c in AGENT_CASES])
def test_an_agents_tool_calls_and_results_count_in_the_estimate_as_the_emulator_bills_them(model, billed_by, body):
    """Tool calls (their arguments), tool outputs and images in tool results are input; the estimate read only
    text blocks, and so did the emulator: an agent's history of edits was estimated at a few tokens."""
    cat = default_catalog()
    provider, _ = cat.find_model(model)
    r = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": model, "body": body})
    billed = billed_by(body, cat.image_rule(provider, model)).tokens
    assert billed > 1000
    assert billed <= r.input_tokens <= billed + 6  # (the engine joins texts with a newline)


def test_a_turn_of_only_tool_outputs_is_a_request_and_counts_them():
    """A Responses agent loop sends the tool's output alone (``previous_response_id`` holds the rest): no text
    block, yet a valid call billed for its output."""
    body = {"previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "c1", "output": "result " * 500}]}
    r = Request.model_validate({"id": "o", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})
    assert r.input_tokens >= responses_prompt(body).tokens >= 800


def test_a_turn_of_only_empty_tool_outputs_is_a_request_of_no_input_and_a_body_without_text_is_still_refused():
    """A tool that returned nothing sends ``output: ""``, which the Responses API takes (and the emulator
    bills as no tokens); it was refused as "the body has no text to send"."""
    empty = {"type": "function_call_output", "call_id": "c1", "output": ""}
    for items in ([empty], [empty, {**empty, "call_id": "c2"}]):
        body = {"previous_response_id": "resp_1", "input": items}
        r = Request.model_validate({"id": "e", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})
        assert r.input_tokens == responses_prompt(body).tokens == 0
    for body in ({"input": [{"role": "user", "content": ""}]}, {"input": [{"role": "user", "content": ""}, empty]},
                 {"input": []}, {"messages": [{"role": "user", "content": ""}]}):
        with pytest.raises(ValueError, match="the body has no text to send"):
            Request.model_validate({"id": "n", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})


@pytest.mark.parametrize("padding", [0, 2_000_000], ids=["small", "2 MB"])
def test_a_tool_output_of_text_and_image_parts_counts_as_the_same_parts_of_a_user_message(padding):
    """A Responses tool may return parts (a caption and a screenshot). Its output was counted as JSON: the
    image as characters of base64, never by its model's rule, and a 2 MB one (670,000 "tokens") over gpt-5-mini's
    input limit, refused. Now the parts count as they do in a user message, in the estimate and the emulator."""
    data = base64.b64encode(base64.b64decode(IMG) + bytes(padding)).decode()  # the header says 1024 x 1024
    parts = [{"type": "input_text", "text": "The page now looks like this:"},
             {"type": "input_image", "image_url": f"data:image/png;base64,{data}"}]
    as_output = {"previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "c1", "output": parts}]}
    as_message = {"input": [{"role": "user", "content": parts}]}
    rule = default_catalog().image_rule("openai", "gpt-5-mini")
    out, msg = (Request.model_validate({"id": "i", "arrival_s": 0.0, "model": "gpt-5-mini", "body": b})
                for b in (as_output, as_message))
    assert out.input_tokens == msg.input_tokens == responses_prompt(as_output, rule).tokens
    assert responses_prompt(as_message, rule).tokens == out.input_tokens
    assert out.input_tokens == image_tokens(rule, (1024, 1024)) + 8  # 1,659 for the image, 29 characters of text
    # A part that is neither text nor image (a file) still counts as its JSON, as a string output counts as text.
    file_part = {"type": "input_file", "file_id": "file-" + "x" * 400}
    with_file = {"previous_response_id": "resp_1", "input": [
        {"type": "function_call_output", "call_id": "c1", "output": [*parts, file_part]}]}
    r = Request.model_validate({"id": "f", "arrival_s": 0.0, "model": "gpt-5-mini", "body": with_file})
    assert r.input_tokens >= out.input_tokens + 100 and r.input_tokens == responses_prompt(with_file, rule).tokens


def test_a_body_whose_only_input_is_an_image_is_a_request_billed_for_it():
    """A user message of one image and no text ("what is this?" left unsaid) is a valid call to every provider,
    and billed for the image. It was refused as "the body has no text to send", though a Responses tool output
    of only a screenshot, in a turn of nothing else, is taken and billed by the image rule."""
    url = f"data:image/png;base64,{IMG}"
    rule = default_catalog().image_rule("openai", "gpt-5-mini")
    shot = {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_image", "image_url": url}]}
    for body, bill in (({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]},
                        chat_prompt),
                       ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
                        responses_prompt),
                       ({"previous_response_id": "resp_1", "input": [
                           shot, {"role": "user", "content": [{"type": "input_image", "image_url": url}]}]},
                        responses_prompt)):
        r = Request.model_validate({"id": "i", "arrival_s": 0.0, "model": "gpt-5-mini", "body": body})
        assert r.input_tokens == bill(body, rule).tokens > 0
    body = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": IMG}}]}]}
    r = Request.model_validate({"id": "a", "arrival_s": 0.0, "provider": "anthropic", "body": body})
    assert r.input_tokens == anthropic_prompt(body, default_catalog().image_rule("anthropic", r.model)).tokens > 0


# Anthropic's "tool use system prompt token count" for the Claude 4 family and Sonnet 3.7 (the catalog takes it for
# the 5.x families too): by tool_choice, as either API's body names it.
TOOL_USE_PROMPT = {None: 346, "auto": 346, "none": 346, "any": 313, "tool": 313, "required": 313, "function": 313}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CLAUDE_TOOL = {"name": "lookup", "description": "Looks a city up.", "input_schema": SCHEMA}
RESPONSES_TOOL = {"type": "function", "name": "lookup", "description": "Looks a city up.", "parameters": SCHEMA}


def estimate(model: str, body: dict) -> int:
    return Request.model_validate({"id": "t", "arrival_s": 0.0, "model": model, "body": body}).input_tokens


@pytest.mark.parametrize("kind", [None, "auto", "none", "any", "tool"])
@pytest.mark.parametrize("claude", ["claude-sonnet-4-5", "claude-haiku-5-5", "claude-opus-5-5"])
def test_a_claude_request_with_tools_is_estimated_with_the_tool_use_prompt_anthropic_adds(kind, claude):
    """Anthropic adds a system prompt to every call that carries tools (346 tokens with tool_choice auto or none,
    313 when it forces a call) and bills it as input; the estimate budgets reserve on, and smart prices, counted
    the body's text and tools alone. Without tools, or with an empty list, nothing is added."""
    choice = {} if kind is None else {"tool_choice": {"type": kind, **({"name": "lookup"} if kind == "tool" else {})}}
    body = {"messages": [{"role": "user", "content": "Weather in Oslo?"}], "max_tokens": 100, "tools": [CLAUDE_TOOL],
            **choice}
    chars = len(split_body(body)[0]) + tool_chars(body)
    assert estimate(claude, body) == math.ceil(chars / 4) + TOOL_USE_PROMPT[kind]
    rule = default_catalog().tool_prompt("anthropic", claude)
    assert (rule.auto, rule.any) == (346, 313)
    bare = {k: v for k, v in body.items() if k not in ("tools", "tool_choice")}
    assert estimate(claude, bare) == estimate(claude, {**bare, "tools": []}) == math.ceil(len("Weather in Oslo?") / 4)


@pytest.mark.parametrize("kind", [None, "auto", "none", "required", "function"])
def test_a_responses_body_for_claude_is_estimated_with_the_tool_use_prompt_of_its_openai_tool_choice(kind):
    """A Responses body goes to a Claude model as messages (its tool_choice "required" as {type: any}, a function
    by name as {type: tool}): the same body is estimated for Claude at exactly the prompt's tokens more than for a
    GPT model, which has none."""
    choice = {} if kind is None else {"tool_choice": {"type": "function", "name": "lookup"} if kind == "function"
                                      else kind}
    body = {"input": "Weather in Oslo?", "max_output_tokens": 100, "tools": [RESPONSES_TOOL], **choice}
    assert estimate("claude-sonnet-5-5", body) - estimate("gpt-5-mini", body) == TOOL_USE_PROMPT[kind]
    bare = {"input": "Weather in Oslo?", "max_output_tokens": 100}
    assert estimate("claude-sonnet-5-5", bare) == estimate("gpt-5-mini", bare)


@pytest.mark.parametrize("kind", ["auto", "none", "any", "tool", None])
def test_the_emulator_bills_a_claude_call_with_tools_its_tool_use_prompt_before_the_tools(kind):
    """Billed by Anthropic, the tool-use prompt was billed by the emulator nowhere: it under-billed every tool call
    by some 330 tokens, and the engine's estimate, which must bound the bill, was tested against that. It stands
    before the tools in the cache order, so a cached prefix that covers the tools covers it."""
    cat = default_catalog()
    tools = [{**CLAUDE_TOOL, "cache_control": {"type": "ephemeral"}}]
    choice = {} if kind is None else {"tool_choice": {"type": kind, **({"name": "lookup"} if kind == "tool" else {})}}
    body = {"max_tokens": 100, "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": tools, **choice}
    rule = cat.tool_prompt("anthropic", "claude-sonnet-5-5")
    bare, billed = anthropic_prompt(body), anthropic_prompt(body, None, rule)
    assert billed.tokens == bare.tokens + TOOL_USE_PROMPT[kind]
    assert billed.breakpoints == (bare.breakpoints[0] + 4 * TOOL_USE_PROMPT[kind],)  # the tools' mark covers it
    r = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": "claude-sonnet-5-5", "body": body})
    assert billed.tokens <= r.input_tokens <= billed.tokens + 1  # (the engine joins texts with a newline)
    no_tools = {k: v for k, v in body.items() if k not in ("tools", "tool_choice")}
    assert anthropic_prompt(no_tools, None, rule) == anthropic_prompt(no_tools)
    assert anthropic_prompt({**no_tools, "tools": []}, None, rule).tokens == anthropic_prompt(no_tools).tokens


def test_a_model_s_own_tool_prompt_overrides_its_provider_s_and_a_bad_one_is_refused_naming_it(tmp_path):
    """An overlay gives a model its own figures (Claude 3 Haiku's, 264 / 340): the estimate and the emulator's
    bill follow the model, its neighbours keep the provider's."""
    from engine.core.catalog import load_catalog
    from engine.core.errors import CatalogError
    from engine.core.request import validation_context

    over = tmp_path / "over.yaml"
    over.write_text("providers:\n  anthropic:\n    models:\n      claude-haiku-4-5: {tool_prompt: {auto: 264, any: 340}}\n")
    cat = load_catalog(None, over)
    body = {"max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}], "tools": [CLAUDE_TOOL],
            "tool_choice": {"type": "any"}}
    ctx = validation_context(cat)
    for model, hidden in (("claude-haiku-4-5", 340), ("claude-sonnet-4-5", 313)):
        r = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": model, "body": body}, context=ctx)
        billed = anthropic_prompt(body, None, cat.tool_prompt("anthropic", model)).tokens
        assert billed == anthropic_prompt(body).tokens + hidden
        assert r.input_tokens == math.ceil((len(split_body(body)[0]) + tool_chars(body)) / 4) + hidden
    over.write_text("providers:\n  anthropic:\n    tool_prompt: {auto: -1, any: 313}\n")
    with pytest.raises(CatalogError, match=r"providers.anthropic.tool_prompt.auto"):
        load_catalog(None, over)
