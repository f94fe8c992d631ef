"""Bad input is refused per request, with the file, line, field and fix, and never costs memory or a crash
(issue 11, part 5)."""

import json
import math
import tracemalloc
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.core.catalog import default_catalog
from engine.core.draws import Draws
from engine.core.errors import ConfigError, TraceError
from engine.core.request import MAX_DEADLINE_S, MEDIA_PARAMS, Request, validation_context
from engine.core.settings import CacheSettings, Settings, check_redis_url, load_settings
from engine.core.trace import MAX_SPAN_S, _problems_of, load_trace, parse_trace_lines
from engine.core.tracegen import from_azure, from_mooncake
from engine.emulator._text import anthropic_prompt, chat_prompt, responses_prompt
from engine.emulator._wire import ApiError
from engine.sim.lower_bound import lower_bound
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
CTX = validation_context(CAT, Settings())


def line(**kw):
    base = {"id": "r1", "arrival_s": 0.0, "model": "gpt-5", "input_tokens": 100, "output_tokens": 10}
    base.update(kw)
    return json.dumps(base)


def refused(d: dict) -> list[tuple[str, str]]:
    """The (field, message) problems of a request dict; fails if it is accepted."""
    with pytest.raises(ValidationError) as ei:
        Request.model_validate(d, context=CTX)
    return _problems_of(ei.value)


def ok(**kw) -> Request:
    d = {"id": "r1", "arrival_s": 0.0, "model": "gpt-5", "input_tokens": 100, "output_tokens": 10}
    d.update(kw)
    return Request.model_validate(d, context=CTX)


# --- strings are valid Unicode; files are UTF-8 ------------------------------------------------------------

def test_a_lone_surrogate_fails_its_line_alone_with_or_without_skip(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_text(line(id="a") + "\n" + line(id="b", prompt="x\ud800") + "\n" + line(id="c\udc00") + "\n",
                 encoding="utf-8", errors="surrogatepass")
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert [(n, f) for _, n, f, _ in ei.value.problems] == [(2, "prompt"), (3, "id")]
    assert "not valid Unicode" in str(ei.value)
    str(ei.value).encode("utf-8")  # the message itself can be printed
    tr = load_trace(p, skip_invalid=True)
    assert [r.id for r in tr.requests] == ["a"] and tr.skipped == 2


def test_escaped_surrogates_in_json_are_refused_in_nested_bodies():
    problems = refused({"id": "a", "arrival_s": 0, "model": "gpt-5",
                        "messages": [{"role": "user", "content": [{"type": "text", "text": "\ud83d"}]}]})
    assert problems[0][0] == "messages"  # the top-level key it came in


@pytest.mark.parametrize("body, field, says", [
    ({"metadata": {1: "a", "b": "c"}}, "body.metadata", "keys are strings"),  # json.dumps(sort_keys) fails
    ({"tools": (t for t in "ab")}, "body.tools", "generator, not JSON"),  # Ray could not carry it
    ({"tools": [{"name": "f", "parameters": {"enum": {1, 2}}}]}, "body.tools[0].parameters.enum", "set"),
    ({"temperature": math.nan}, "body.temperature", "finite number"),
])
def test_a_body_that_is_not_json_is_refused_naming_its_path(body, field, says):
    # Accepted, each of these failed later in the call that carried it, and took its neighbours along.
    problems = refused({"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi", "body": body})
    assert problems[0][0] == field and says in problems[0][1], problems
    assert ok(body={"metadata": {"k": [1, 2.5, True, None, {"x": "y"}]}}).body["metadata"]["k"][4] == {"x": "y"}


@pytest.mark.parametrize("extra, field, says", [
    ({"prompt": 42}, "prompt", "'prompt' is text, got int"),  # was: "needs 'input_tokens' or a 'prompt'"
    ({"body": {"messages": [{"role": "user", "content": 5}]}}, "body.messages[0].content", "got int"),
    ({"prompt": "hi", "max_output_tokens": 200_000}, "max_output_tokens", "over gpt-5-mini's maximum output"),
    ({"prompt": "hi", "output_tokens": 300, "max_output_tokens": 20}, "max_output_tokens", "under output_tokens 300"),
    ({"body": {"messages": [{"content": "Hi"}]}}, "body.messages[0].role", "got no role"),
    ({"body": {"messages": [{"role": "user", "content": "Hi"}, {"role": "wizard", "content": "Hi"}]}},
     "body.messages[1].role", "got role 'wizard'"),  # a provider answers 400: refused here, per request
])
def test_a_wrong_type_or_cap_is_named_with_the_fix_that_applies(extra, field, says):
    """A helper's review as a new user: a number given as the prompt was called a missing input_tokens, a
    message content of a number had no path, and a cap over the model's maximum was told it must be at least
    output_tokens, which a smaller cap is not (output_tokens follows it)."""
    problems = refused({"id": "a", "arrival_s": 0, "model": "gpt-5-mini", **extra})
    assert problems[0][0] == field and says in problems[0][1], problems
    assert ok(model="gpt-5-mini", prompt="hi", max_output_tokens=10).output_tokens == 10


def _user(*parts):
    return {"role": "user", "content": list(parts)}


# (model, body, the path of the bad text, the emulator's prompt builder); ``BAD`` marks the text part's value.
BAD = object()
_TEXT_PART_BODIES = [
    ("gpt-5-mini", {"messages": [_user({"type": "text", "text": "hi"}, {"type": "text", "text": BAD})]},
     "body.messages[0].content[1].text", chat_prompt),
    ("gpt-5-mini", {"messages": [_user({"type": "text", "text": "run it"}),
                                 {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": BAD}]}]},
     "body.messages[1].content[0].text", chat_prompt),
    ("gpt-5-mini", {"input": [_user({"type": "input_text", "text": BAD})]}, "body.input[0].content[0].text",
     responses_prompt),
    ("gpt-5-mini", {"input": [_user({"type": "input_text", "text": "run it"}),
                              {"type": "function_call_output", "call_id": "c1",
                               "output": [{"type": "input_text", "text": BAD}]}]},
     "body.input[1].output[0].text", responses_prompt),
    ("claude-sonnet-4-5", {"system": [{"type": "text", "text": BAD}], "messages": [_user({"type": "text", "text": "hi"})]},
     "body.system[0].text", anthropic_prompt),
    ("claude-sonnet-4-5", {"messages": [_user({"type": "tool_result", "tool_use_id": "t1",
                                               "content": [{"type": "text", "text": BAD}]})]},
     "body.messages[0].content[0].content[0].text", anthropic_prompt),
]


def _with(v, value):
    if v is BAD:
        return value
    if isinstance(v, dict):
        return {k: _with(x, value) for k, x in v.items()}
    return [_with(x, value) for x in v] if isinstance(v, list) else v


@pytest.mark.parametrize("value", [5, None, ["a"], {"value": "a"}], ids=["number", "null", "list", "object"])
@pytest.mark.parametrize("model, body, field, prompt", _TEXT_PART_BODIES,
                         ids=["chat", "chat tool", "responses", "responses tool output", "anthropic system",
                              "anthropic tool_result"])
def test_a_text_part_whose_text_is_not_a_string_is_refused_naming_its_path(model, body, field, prompt, value):
    # Accepted, each of these was sent and refused by the API (400) with the call that carried it: its
    # neighbours in a batch failed too. The emulator refuses the same shape, as the APIs do.
    (got, msg), = refused({"id": "a", "arrival_s": 0, "model": model, "body": _with(body, value)})
    assert got == field and msg.startswith(f"{field} must be a string, got {value!r}"), msg
    with pytest.raises(ApiError) as ei:
        prompt(_with(body, value))
    assert ei.value.status == 400 and ei.value.param == field.removeprefix("body.")
    # The same body with a string is valid, and its text counts.
    r = ok(model=model, input_tokens=None, body=_with(body, "forty-two"))
    assert "forty-two" in r.prompt and prompt(r.body).text.count("forty-two") == 1


def test_a_text_part_with_no_text_is_refused_and_other_parts_are_not():
    (got, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5-mini",
                           "messages": [_user({"type": "text", "text": "hi"}, {"type": "text"})]})
    assert got == "body.messages[0].content[1].text" and "got nothing" in msg
    # An image part has no ``text``, and Responses' own ``text`` setting (an object, whose format's type is
    # "text") is no content part: both pass, as before.
    image = {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}
    assert ok(model="gpt-5-mini", messages=[_user({"type": "text", "text": "hi"}, image)]).prompt == "hi"
    r = ok(model="gpt-5-mini", input=[_user({"type": "input_text", "text": "hi"})], text={"format": {"type": "text"}})
    assert r.prompt == "hi" and r.body["text"] == {"format": {"type": "text"}}


def test_bytes_that_are_not_utf8_name_the_file_and_line(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(line(id="a").encode() + b"\n" + b'{"id": "b", "prompt": "caf\xe9"}\n' + line(id="c").encode())
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    (path, no, field, msg), = ei.value.problems
    assert (path, no, field) == (str(p), 2, "line") and "not UTF-8" in msg and "0xe9" in msg
    assert f"{p}:2: field 'line'" in str(ei.value)
    assert [r.id for r in load_trace(p, skip_invalid=True).requests] == ["a", "c"]


def test_a_byte_order_mark_is_not_an_error(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + line(id="a").encode() + b"\n")
    assert [r.id for r in load_trace(p).requests] == ["a"]


# --- an empty trace is an error -----------------------------------------------------------------------------

def test_an_empty_trace_is_an_error(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n  \n")
    with pytest.raises(TraceError, match="trace empty.jsonl has no requests"):
        load_trace(p)
    p.write_text("{not json\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(p, skip_invalid=True)  # everything skipped leaves nothing to run


# --- arrival_s: rebased, bounded, and memory independent of its absolute value -------------------------------

def test_epoch_arrivals_are_rebased_by_whole_days():
    t0 = 1_700_000_123.25
    tr = parse_trace_lines([line(id="a", arrival_s=t0), line(id="b", arrival_s=t0 + 90.5)])
    assert tr.rebased_s == 19675 * 86400 and tr.rebased_s % 86400 == 0
    assert [r.arrival_s for r in tr.requests] == [t0 - tr.rebased_s, t0 + 90.5 - tr.rebased_s]
    assert tr.requests[0].arrival_s == pytest.approx(t0 % 86400)  # the time of day is kept
    assert tr.requests[1].arrival_s - tr.requests[0].arrival_s == 90.5  # gaps exactly


def test_a_trace_starting_on_its_first_day_is_left_as_it_is():
    lines = [line(id="a", arrival_s=3.25), line(id="b", arrival_s=86399.0), line(id="c", arrival_s=200000.0)]
    tr = parse_trace_lines(lines)
    assert tr.rebased_s == 0 and [r.arrival_s for r in tr.requests] == [3.25, 86399.0, 200000.0]


def test_a_trace_spanning_more_than_a_year_names_the_late_line():
    with pytest.raises(TraceError) as ei:
        parse_trace_lines([line(id="a", arrival_s=5), line(id="b", arrival_s=1e10)], source="t.jsonl")
    (_, no, field, msg), = ei.value.problems
    assert (no, field) == (2, "arrival_s") and "365 days" in msg and "line 1" in msg
    tr = parse_trace_lines([line(id="a", arrival_s=5), line(id="b", arrival_s=5 + MAX_SPAN_S)])
    assert len(tr) == 2


def test_slot_draws_of_a_far_arrival_cost_one_chunk():
    ba = CAT.provider("openai").batch_api
    d = Draws(0, 4, 0, 60.0)
    tracemalloc.start()
    try:
        for t in (1.7e9, 1e10, 1e13):
            assert ba.turnaround_min_s <= d.turnaround("openai", ba, t) <= ba.completion_window_s
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Three 4,096-slot chunks take well under 1 MB; one value per slot from 0 took 1.3 GB at 1e10 s. The margin is
    # for what other threads of the worker allocate meanwhile, which tracemalloc counts too (1.03 MB seen once).
    assert peak < 16_000_000


def test_slot_draws_below_the_bound_are_the_sequential_stream_of_before():
    """Values of ordinary traces must not move: slot k < 65,536 is the k-th draw of one generator per
    provider, exactly as before chunks were keyed; beyond it a chunk has a generator of its own."""
    ba = CAT.provider("anthropic").batch_api
    gen = np.random.default_rng([7, 2, zlib.crc32(b"anthropic")])
    z = gen.standard_normal(4096 * 16)
    ref = np.concatenate([np.clip(ba.turnaround_median_s * np.exp(ba.turnaround_sigma * c), ba.turnaround_min_s,
                                  ba.completion_window_s) for c in np.split(z, 16)])
    d = Draws(0, 4, 7, 60.0)
    d.turnaround("anthropic", ba, 5e9)  # a far slot first must not shift the stream
    for k in (0, 1, 4095, 4096, 30000, 65535):
        assert d.turnaround("anthropic", ba, k * 60.0 + 1.0) == ref[k]
    assert np.array_equal(d.slot_turnarounds("anthropic", ba, 65535 * 60.0)[:65536], ref)
    far = Draws(0, 4, 7, 60.0)
    assert far.turnaround("anthropic", ba, 5e9) == d.turnaround("anthropic", ba, 5e9)  # keyed, repeatable
    assert np.array_equal(far.slot_turnarounds("anthropic", ba, 70000 * 60.0)[65536:70000],
                          d.slot_turnarounds("anthropic", ba, 70000 * 60.0)[65536:70000])


def test_a_trace_at_1e10_seconds_runs_through_bench_in_little_memory(tmp_path):
    p = tmp_path / "far.jsonl"
    p.write_text("\n".join(line(id=f"r{i}", arrival_s=1e10 + 30 * i, priority="background", prompt=f"task {i}")
                           for i in range(20)))
    tracemalloc.start()
    try:
        tr = load_trace(p)
        res = simulate(tr.requests, load_policy("smart", CAT), seed=0)
        lb = lower_bound(tr.requests, seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.summary()["completed"] == 20 and 0 < lb.total_usd <= res.summary()["cost_usd"] + 1e-6
    assert peak < 30_000_000


def test_the_simulator_alone_takes_unrebased_far_arrivals_in_little_memory():
    reqs = [ok(id=f"r{i}", arrival_s=1e10 + i, priority="background") for i in range(10)]
    tracemalloc.start()
    try:
        res = simulate(reqs, load_policy("batch-all", CAT), seed=0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.summary()["completed"] == 10 and peak < 30_000_000


def test_deadlines_past_a_year_are_refused():
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5,
                             "deadline_s": MAX_DEADLINE_S + 1})
    assert field == "deadline_s" and "366 days" in msg
    assert ok(deadline_s=MAX_DEADLINE_S).deadline_s == MAX_DEADLINE_S


@pytest.mark.parametrize("deadline, priority, default", [(0, "normal", "3,600 s"), (-5, "urgent", "300 s"),
                                                         (0.0, "background", "86,400 s"), (0, "asap", "3,600 s")])
def test_a_deadline_of_zero_or_less_names_the_fix(deadline, priority, default):
    # It was pydantic's bare "Input should be greater than 0". Omitting it does not mean "no deadline": it takes
    # the priority's default, and the message says which.
    problems = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5, "deadline_s": deadline,
                        "priority": priority})
    msg = dict(problems)["deadline_s"]
    assert msg.startswith(f"deadline_s must be greater than 0 seconds after arrival, got {deadline:g}; omit it")
    assert f"priority {priority if priority != 'asap' else 'normal'!r} ({default}" in msg
    assert ok(deadline_s=0.001).deadline_s == 0.001


# --- token counts against the context window ---------------------------------------------------------------

TEXT_MODELS = [(p, m, spec) for p, prov in CAT.providers.items() for m, spec in prov.models.items()
               if spec.kind == "text"]


@pytest.mark.parametrize("provider, model, spec", TEXT_MODELS, ids=[m for _, m, _ in TEXT_MODELS])
def test_every_text_model_has_a_context_window_and_it_is_enforced(provider, model, spec):
    assert spec.context_window is not None and spec.context_window > spec.max_output_tokens
    limit_in = min(spec.max_input_tokens or spec.context_window, spec.context_window - 256)
    fits = ok(id="a", provider=provider, model=model, input_tokens=limit_in, output_tokens=256)
    assert fits.input_tokens == limit_in
    (field, msg), = refused({"id": "a", "provider": provider, "model": model, "arrival_s": 0,
                             "input_tokens": 10**13, "output_tokens": 10})
    assert field == "input_tokens" and model in msg and "shorten the prompt" in msg


def test_the_output_cap_counts_against_the_window_and_the_fix_names_it():
    ok(model="claude-haiku-4-5", input_tokens=136_000, max_output_tokens=64_000)
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "claude-haiku-4-5", "input_tokens": 150_000,
                             "max_output_tokens": 64_000})
    assert field == "max_output_tokens" and "200,000" in msg and "at most 50,000" in msg
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "claude-haiku-4-5", "input_tokens": 190_000,
                             "output_tokens": 20_000})
    assert field == "output_tokens" and "larger window" in msg


def test_gpt5_input_limit_is_its_own():
    ok(model="gpt-5", input_tokens=272_000, output_tokens=128_000)
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 272_001})
    # the smallest windows that take it: gpt-5.4-mini's 400,000 first, then the 1M ones
    assert field == "input_tokens" and "272,000" in msg and "larger window (gpt-5.4-mini, " in msg


# --- media parameters against the catalog ------------------------------------------------------------------

def test_unknown_media_params_are_refused_with_the_known_ones():
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "flux-1-dev", "prompt": "a cat",
                             "params": {"size": "512x512", "n": 1000}})
    assert field == "params.n" and str(list(MEDIA_PARAMS["image"])) in msg
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "wan-2.1-t2v", "prompt": "a cat",
                             "params": {"resoluton": "480p"}})
    assert field == "params.resoluton" and "'resolution'" in msg


def test_text_requests_take_no_params_and_body_n_must_be_one():
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "prompt": "hi",
                             "params": {"temperature": 0.2}})
    assert field == "params.temperature" and "body" in msg
    (field, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-image-1", "prompt": "a cat", "n": 1000})
    assert field == "body.n" and "n must be 1" in msg
    (field, _), = refused({"id": "a", "arrival_s": 0, "model": "gpt-image-1", "prompt": "a cat", "n": True})
    assert field == "body.n"


@pytest.mark.parametrize("params, field", [
    ({"steps": "30"}, "params.steps"), ({"steps": True}, "params.steps"), ({"steps": 0}, "params.steps"),
    ({"seed": 1.5}, "params.seed"), ({"quality": 3}, "params.quality"), ({"size": 1024}, "params.size"),
])
def test_media_param_values_have_their_types(params, field):
    (f, _), = refused({"id": "a", "arrival_s": 0, "model": "flux-1-dev", "prompt": "a cat", "params": params})
    assert f == field


def test_known_media_params_pass():
    r = ok(model="flux-1-dev", prompt="a cat", params={"size": "512x512", "steps": 28, "seed": 3,
                                                       "sampler": "euler", "quality": "high"})
    assert r.params["steps"] == 28
    v = ok(model="wan-2.1-t2v", prompt="a storm", params={"resolution": "480p", "duration_s": 4, "fps": 16})
    assert v.params["fps"] == 16


# --- the well-known generation parameters of a body --------------------------------------------------------

@pytest.mark.parametrize("where, key, value, says", [
    ("top", "temperature", "hot", "a number between 0 and 2"), ("body", "temperature", 2.5, "between 0 and 2"),
    ("body", "temperature", 3, "(0 and 1 at Anthropic)"),
    ("top", "temperature", True, "a number"), ("body", "top_p", 1.5, "between 0 and 1"),
    ("top", "top_p", "0.9", "a number"), ("top", "max_tokens", "many", "a whole number >= 1"),
    ("body", "max_tokens", 0, "a whole number >= 1"), ("body", "max_completion_tokens", 100.5, "whole number"),
    ("body", "max_output_tokens", [1], "whole number"), ("top", "seed", 1.5, "a whole number"),
    ("top", "seed", "7", "a whole number"), ("top", "stop", 5, "a string or a list of strings"),
    ("body", "stop", ["\n", None], "a list of strings"), ("top", "stop_sequences", "END", "a list of strings"),
    ("top", "n", 3, "must be 1"), ("body", "n", "1", "must be 1"), ("top", "presence_penalty", -3, "-2 and 2"),
    # A Responses background call answers "queued" with no output and no usage, then runs and bills unseen; a
    # flex or priority tier bills other prices than the catalog's.
    ("top", "background", True, "false, or for an image"), ("body", "service_tier", "priority", "'auto' or"),
    ("top", "service_tier", "flex", "the policy picks the tier"),
])
def test_a_generation_parameter_of_the_wrong_type_or_range_is_refused_naming_it(where, key, value, says):
    # Accepted, each of these failed only at the provider: after the request was queued, perhaps in a batch.
    d = {"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi"}
    d.update({key: value} if where == "top" else {"body": {key: value}})
    (field, msg), = refused(d)
    assert field == f"body.{key}" and msg.startswith(f"body.{key} must be ") and says in msg, msg
    assert f"got {value!r}" in msg


def test_a_temperature_above_anthropics_range_is_refused_for_an_anthropic_model_only():
    # Anthropic's Messages API takes 0-1 (OpenAI's 0-2): 1.5 passed the common check and failed at Anthropic.
    d = {"id": "a", "arrival_s": 0, "model": "claude-sonnet-4-5", "prompt": "hi", "temperature": 1.5}
    (field, msg), = refused(d)
    assert field == "body.temperature" and "between 0 and 1 (Anthropic's range)" in msg and "got 1.5" in msg
    assert ok(model="claude-sonnet-4-5", prompt="hi", temperature=1.0).body == {"temperature": 1.0}
    assert ok(model="gpt-4o-mini", prompt="hi", temperature=1.5).body == {"temperature": 1.5}


def test_an_anthropic_one_hour_cache_entry_is_refused_naming_its_block():
    # A 1-hour entry writes at 2x the input price; the catalog prices the 5-minute one (1.25x), so each
    # estimate, reservation and result would have been under the bill.
    def hour(block: dict) -> dict:
        return {**block, "cache_control": {"type": "ephemeral", "ttl": "1h"}}
    text = {"type": "text", "text": "a long shared context"}
    cases = {"body.system.0.cache_control.ttl": {"system": [hour(text)], "messages": [{"role": "user", "content": "hi"}]},
             "body.messages.1.content.0.cache_control.ttl": {"messages": [
                 {"role": "user", "content": "hi"}, {"role": "user", "content": [hour(text)]}]},
             "body.cache_control.ttl": hour({"messages": [{"role": "user", "content": "hi"}]}),
             "body.messages.2.content.0.content.0.cache_control.ttl": {"messages": [
                 {"role": "user", "content": "hi"},
                 {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [hour(text)]}]}]}}
    for field, body in cases.items():
        (f, msg), = refused({"id": "a", "arrival_s": 0, "model": "claude-sonnet-4-5", "body": body})
        assert f == field and msg.startswith(f"{field} must be '5m' or left out, got '1h'") and "2x" in msg, msg
    five = {"system": [{**text, "cache_control": {"type": "ephemeral", "ttl": "5m"}}], "messages": [
        {"role": "user", "content": [{**text, "cache_control": {"type": "ephemeral"}}]}]}
    assert ok(model="claude-sonnet-4-5", body=five).body == five


def test_an_anthropic_system_that_is_not_text_is_refused_naming_its_block():
    # Anthropic's system takes text blocks only: an image there was accepted, reserved for and sent, and the API
    # answered 400. Text blocks, with or without a cache breakpoint, pass unchanged.
    img = {"type": "image", "source": {"type": "url", "url": "https://example.com/ref.png"}}
    text = {"type": "text", "text": "You grade charts against the reference."}
    user = [{"role": "user", "content": "Grade it."}]
    for system, field, says in (([text, img], "body.system.1", "type 'image'"), (7, "body.system", "got int 7"),
                                (["plain"], "body.system.0", "got 'plain'")):
        (f, msg), = refused({"id": "a", "arrival_s": 0, "model": "claude-sonnet-4-5",
                             "body": {"system": system, "messages": user}})
        assert f == field and says in msg and "text" in msg, msg
    for system in ("You grade charts.", [text, {**text, "cache_control": {"type": "ephemeral"}}]):
        body = {"system": system, "messages": user}
        assert ok(model="claude-sonnet-4-5", body=body).body == body
    # A Responses body's system parts are turned into text blocks on the wire (engine/core/responses_input.py),
    # which checks them there: an input_text part passes, in simulation and over HTTP.
    responses = {"input": "Grade it.", "system": [{"type": "input_text", "text": "You grade charts."}]}
    for settings in (Settings(), Settings(providers={"mode": "http"})):
        r = Request.model_validate({"id": "r", "arrival_s": 0, "model": "claude-sonnet-4-5", "body": responses},
                                   context=validation_context(default_catalog(), settings))
        assert r.body == responses


def test_well_formed_generation_parameters_and_nulls_pass_unchanged():
    body = {"temperature": 0, "top_p": 1, "max_tokens": 64, "seed": -3, "stop": ["\n\n", "END"], "n": 1,
            "frequency_penalty": -0.5, "presence_penalty": 2.0, "top_k": "anything: not a checked key"}
    r = ok(model="gpt-4o-mini", prompt="hi", input_tokens=None, output_tokens=None, body=dict(body))
    assert r.body == body and r.max_output_tokens == 64
    assert ok(model="gpt-4o-mini", prompt="hi", temperature=None, stop="\n", max_tokens=None).body == {
        "temperature": None, "stop": "\n", "max_tokens": None}
    assert ok(model="gpt-5-mini", prompt="hi", service_tier="auto", background=False).body == {
        "service_tier": "auto", "background": False}
    assert ok(model="claude-sonnet-4-5", prompt="hi", service_tier="standard_only").body == {
        "service_tier": "standard_only"}
    assert ok(model="gpt-image-1", prompt="a cat", background="transparent").body == {"background": "transparent"}


# --- booleans and numeric strings are not numbers ----------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("input_tokens", True), ("input_tokens", "12"), ("output_tokens", False), ("arrival_s", "5"),
    ("arrival_s", True), ("deadline_s", "600"), ("max_output_tokens", "100"), ("max_output_tokens", True),
])
def test_booleans_and_numeric_strings_are_refused(field, value):
    (f, msg), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5, field: value})
    assert f == field and "must be a number" in msg and "Value error" not in msg


def test_prefix_blocks_are_numbers_and_whole_floats_still_count():
    (f, _), = refused({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5, "prefix_blocks": ["1"]})
    assert f == "prefix_blocks.0"
    assert ok(input_tokens=100.0).input_tokens == 100  # a JSON writer's 100.0 is still the number 100


# --- settings ---------------------------------------------------------------------------------------------

def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("SMARTBATCH_SIM__SEED", "abc")
    with pytest.raises(ConfigError) as ei:
        load_settings()
    msg = str(ei.value)
    assert "SMARTBATCH_SIM__SEED" in msg and "sim.seed" in msg and "'abc'" in msg and "\n" not in msg


def test_a_misspelt_or_unparsable_environment_variable_is_named(monkeypatch):
    monkeypatch.setenv("SMARTBATCH_SIM__SEEED", "3")
    with pytest.raises(ConfigError, match="SMARTBATCH_SIM__SEEED: there is no setting sim.seeed"):
        load_settings()
    monkeypatch.delenv("SMARTBATCH_SIM__SEEED")
    monkeypatch.setenv("SMARTBATCH_BUDGETS__SPECS", "[{not json")
    with pytest.raises(ConfigError, match="SMARTBATCH_BUDGETS__SPECS.*JSON"):
        load_settings()


@pytest.mark.parametrize(("var", "value", "meant"), [
    ("SMARTBATCH_PROVIDERS__MODES", "http", "providers.mode"),
    ("SMARTBATCH_PROVIDERS__ENDPOINTS__OPENAI__BASE_ULR", "http://127.0.0.1:9/v1", "providers.endpoints.openai.base_url"),
    ("SMARTBATCH_BUDGETS__SPECS", '[{"tenant": "a", "max_budgt": 5, "budget_duration": "1d"}]',
     "budgets.specs.0.max_budget"),
])
def test_a_misspelt_nested_setting_says_which_one_was_meant(monkeypatch, var, value, meant):
    """A helper's tour: SMARTBATCH_BUDGET__SPECS is told "did you mean SMARTBATCH_BUDGETS__SPECS?" (README,
    "Layout"), but SMARTBATCH_PROVIDERS__MODES only "remove it or fix its spelling", naming no setting."""
    monkeypatch.setenv(var, value)
    with pytest.raises(ConfigError, match=f"did you mean {meant}"):
        load_settings()


@pytest.mark.parametrize("url", ["notaurl", "http://localhost:6379", "redis://", "redis://h:abc/0",
                                 "redis://h:6379/x", "unix://", "localhost:6379"])
def test_malformed_redis_urls_are_config_errors_when_settings_are_built(monkeypatch, url):
    with pytest.raises(ConfigError, match="cache.redis_url .*redis://HOST:6379/0"):
        CacheSettings(redis_url=url)
    monkeypatch.setenv("SMARTBATCH_BUDGETS__REDIS_URL", url)
    with pytest.raises(ConfigError, match=r"budgets.redis_url \(SMARTBATCH_BUDGETS__REDIS_URL\)"):
        Settings()


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "redis://:pw@10.0.0.1", "rediss://user:pw@h:6380/2",
                                 "unix:///var/run/redis.sock", "redis://[::1]:6379"])
def test_well_formed_redis_urls_pass(url):
    assert check_redis_url(url, "cache.redis_url") == url


def test_a_redis_password_never_shows_in_the_error():
    with pytest.raises(ConfigError) as ei:
        check_redis_url("redis://user:s3cret@h:port/0", "cache.redis_url")
    assert "s3cret" not in str(ei.value) and "***" in str(ei.value)


# --- trace builders ---------------------------------------------------------------------------------------

def test_azure_rows_that_are_malformed_name_line_and_column(tmp_path):
    p = tmp_path / "a.csv"
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,100,20\n"
                 "2023-11-16 18:15:47.1,abc,20\n2023-11-16 18:15:48.1,5\nyesterday,1,1\n")
    with pytest.raises(TraceError) as ei:
        from_azure(p)
    assert [(n, f) for _, n, f, _ in ei.value.problems] == [(3, "ContextTokens"), (4, "GeneratedTokens"),
                                                             (5, "TIMESTAMP")]
    p.write_text("time,tokens\n1,2\n")
    with pytest.raises(TraceError, match="a.csv:1: field 'header'.*TIMESTAMP"):
        from_azure(p)
    p.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    with pytest.raises(TraceError, match="has no rows"):
        from_azure(p)
    p.write_bytes(b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.1,1\xff,2\n")
    with pytest.raises(TraceError, match="a.csv:2: field 'line': not UTF-8"):
        from_azure(p)


def test_mooncake_rows_that_are_malformed_name_line_and_field(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5, "hash_ids": [1]}\n[1, 2]\n'
                 '{"timestamp": "5", "input_length": true, "output_length": 5}\n{bad\n'
                 '{"timestamp": 9, "input_length": 10, "output_length": 5, "hash_ids": ["x"]}\n')
    with pytest.raises(TraceError) as ei:
        from_mooncake(p)
    assert [(n, f) for _, n, f, _ in ei.value.problems] == [
        (2, "line"), (3, "timestamp"), (3, "input_length"), (4, "line"), (5, "hash_ids")]
    assert "--skip-invalid" not in str(ei.value)  # builders have no such flag


def test_a_row_the_request_model_refuses_is_reported_with_its_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n'
                 '{"timestamp": 1, "input_length": 300000, "output_length": 5}\n')
    with pytest.raises(TraceError) as ei:
        from_mooncake(p, model="openai/gpt-4o-mini")
    (_, no, field, msg), = ei.value.problems
    assert (no, field) == (2, "input_tokens") and "context window of 128,000" in msg


def test_a_forced_model_must_exist_and_make_text(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 10, "output_length": 5}\n')
    with pytest.raises(TraceError, match="has no model 'gpt-9'"):
        from_mooncake(p, model="openai/gpt-9")
    with pytest.raises(TraceError, match="makes images"):
        from_mooncake(p, model="openai/gpt-image-1")


# --- property tests: anything gives a request or a clean error, never another exception ----------------------

TRACE_FIELDS = ["id", "arrival_s", "model", "provider", "kind", "prompt", "input_tokens", "output_tokens",
                "max_output_tokens", "prefix_blocks", "params", "priority", "deadline_s", "reuse", "tenant", "body",
                "messages", "n", "custom_id", "url", "method", "size", "max_tokens", "temperature", "top_p", "stop",
                "seed", "junk"]
json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(10**20), max_value=10**20)
             | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12)
             | st.sampled_from(["gpt-5", "claude-haiku-4-5", "flux-1-dev", "wan-2.1-t2v", "gpt-image-1", "openai",
                                "text", "image", "urgent", "exact", "512x512", "480p", "\ud800", "12", "5.0"]))
json_values = st.recursive(json_leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=3),
                           max_leaves=10)
json_objects = st.dictionaries(st.sampled_from(TRACE_FIELDS) | st.text(max_size=6), json_values, max_size=9)
FAST = hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _clean_trace_error(exc: TraceError) -> None:
    assert exc.problems and all(isinstance(f, str) and f for _, _, f, _ in exc.problems)
    str(exc).encode("utf-8", "backslashreplace")


@FAST
@given(json_objects)
def test_arbitrary_json_objects_validate_or_name_a_field(d):
    try:
        r = Request.model_validate(d, context=CTX)
    except ValidationError as exc:
        problems = _problems_of(exc)
        assert problems and all(isinstance(f, str) and f for f, _ in problems)
    else:
        assert r.input_tokens >= 0 and math.isfinite(r.arrival_s) and r.deadline_s <= MAX_DEADLINE_S
        r.model_dump_json()  # what is accepted can be sent: valid Unicode, JSON-serialisable


@FAST
@given(st.lists(json_objects.map(json.dumps) | st.text(max_size=40), min_size=1, max_size=4))
def test_arbitrary_lines_through_load_trace_give_a_trace_or_a_trace_error(tmp_path, lines):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    for skip in (True, False):
        try:
            tr = load_trace(p, skip_invalid=skip)
        except TraceError as exc:
            _clean_trace_error(exc)
        else:
            assert tr.requests and all(isinstance(r, Request) for r in tr.requests)


@FAST
@given(st.lists(st.binary(max_size=40), min_size=1, max_size=4))
def test_arbitrary_bytes_through_load_trace_give_a_trace_or_a_trace_error(tmp_path, chunks):
    p = tmp_path / "t.jsonl"
    p.write_bytes(b"\n".join(chunks))
    try:
        load_trace(p, skip_invalid=True)
    except TraceError as exc:
        _clean_trace_error(exc)


def test_deep_nesting_and_huge_numbers_are_line_errors():
    deep = '{"id": "a", "arrival_s": 0, "model": "gpt-5", "body": ' + "[" * 100_000 + "]" * 100_000 + "}"
    digits = '{"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": ' + "9" * 5000 + "}"

    def nested(rid: str, depth: int) -> str:
        d = {"id": rid, "arrival_s": 0, "model": "gpt-5", "input_tokens": 5, "metadata": {}}
        cur = d["metadata"]
        for _ in range(depth):  # 900: as deep as json.loads goes; the Unicode check must not recurse
            cur["k"] = {}
            cur = cur["k"]
        return json.dumps(d)

    tr = parse_trace_lines([deep, digits, nested("b", 900), nested("c", 90)], skip_invalid=True)
    # 900 levels are a line error too, naming the nesting: the fingerprint's json.dumps and Ray's pickling recurse
    assert [p[1] for p in tr.problems] == [1, 2, 3] and [r.id for r in tr.requests] == ["c"]
    assert "nested more than" in tr.problems[2][-1]


def test_top_level_media_fields_are_the_requests_parameters():
    """``quality``, ``seed`` and ``size`` given beside the prompt of a media request went into the provider body
    only: four flux jobs of two qualities and one of size 512 were batched together and priced as 1024x1024."""
    from engine.core.features import compat_key

    def media(**kw):
        return Request.model_validate({"id": "m", "arrival_s": 0.0, "model": "flux-1-dev", "prompt": "a cat", **kw},
                                      context=CTX)

    high, low = media(quality="high"), media(quality="low")
    assert high.params["quality"] == "high" and compat_key(high) != compat_key(low)
    assert media(seed=7).params["seed"] == 7
    with pytest.raises(ValueError, match="params.size must be a string"):
        media(size=512)
    with pytest.raises(ValueError, match="params.size '512x512' differs from size '1024x1024'"):
        media(size="1024x1024", params={"size": "512x512"})


def test_a_cut_off_json_line_is_reported_at_its_own_line_and_column_and_its_neighbours_load():
    from engine.core.trace import parse_trace_lines

    good = '{"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 5}\n'
    cut = '{"id":"bad-4", "arrival_s": 73,\n'
    problems = []
    tr = parse_trace_lines([good, cut, good.replace('"a"', '"b"')], source="t.jsonl", skip_invalid=True,
                           problems=problems)
    assert [r.id for r in tr.requests] == ["a", "b"]
    assert problems == [("t.jsonl", 2, "line", "not valid JSON (Expecting property name enclosed in double quotes "
                                               f"at column {len(cut.rstrip()) + 1})")]


def test_a_negative_prefix_block_id_is_refused_naming_it_and_its_neighbours_load():
    # A block id names a shared prompt-prefix block (a Mooncake hash_id, >= 0): -1 was taken as an id like any other.
    assert refused({"id": "r1", "arrival_s": 0.0, "model": "gpt-5", "input_tokens": 1000, "output_tokens": 10,
                    "prefix_blocks": [3, -1]}) == [("prefix_blocks.1", "must be >= 0, got -1; give such a number")]
    tr = parse_trace_lines([line(id="a", prefix_blocks=[0, -2]), line(id="b", prefix_blocks=[0, 1])],
                           skip_invalid=True)
    assert [r.id for r in tr.requests] == ["b"] and tr.skipped == 1 and tr.requests[0].prefix_blocks == (0, 1)
