import json

import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from pydantic import ValidationError

from engine.core.errors import TraceError
from engine.core.request import Request, validation_context
from engine.core.settings import DeadlineDefaults, Settings
from engine.core.trace import load_trace, parse_trace_lines, write_trace


def line(**kw):
    base = {"id": "r1", "arrival_s": 0.0, "model": "gpt-5", "input_tokens": 100, "output_tokens": 10}
    base.update(kw)
    return json.dumps(base)


def test_defaults_are_resolved_from_catalog_and_settings():
    s = Settings(deadlines=DeadlineDefaults(urgent=10, normal=20, background=30))
    r = Request.model_validate({"id": "a", "arrival_s": 1.5, "model": "claude-haiku-4-5", "prompt": "x" * 40,
                                "priority": "urgent"}, context=validation_context(settings=s))
    assert (r.provider, r.kind, r.tenant, r.reuse) == ("anthropic", "text", "default", "exact")
    assert r.input_tokens == 10 and r.output_tokens == s.default_output_tokens
    assert r.deadline_s == 10 and r.deadline_at == 11.5


def test_media_defaults_fill_params():
    r = Request.model_validate({"id": "v", "arrival_s": 0, "model": "sora-2-pro", "prompt": "a boat"})
    assert r.kind == "video" and r.params == {"resolution": "720p", "duration_s": 8}


@pytest.mark.parametrize("model", ["sora-2", "sora-2-pro"])
def test_a_video_length_the_model_does_not_offer_is_refused_naming_the_lengths_it_does(model):
    """OpenAI's Videos API takes ``seconds`` of "4", "8" or "12" only: a 5 s or 10 s sora-2 request was
    accepted, reserved for and batched, then refused by the provider."""
    lines = [json.dumps({"id": f"v{d}", "arrival_s": 0, "model": model, "prompt": "a boat",
                         "params": {"duration_s": d}}) for d in (4, 5, 8, 10, 12.0)]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines)
    assert [(p[1], p[2]) for p in ei.value.problems] == [(2, "params.duration_s"), (4, "params.duration_s")]
    assert "params.duration_s 5 is not offered by" in str(ei.value) and "4, 8, 12" in str(ei.value)
    other = Request.model_validate({"id": "w", "arrival_s": 0, "model": "veo-3-fast", "prompt": "a boat",
                                    "params": {"duration_s": 5}})  # no published list: any length in (0, 600]
    assert other.params["duration_s"] == 5


def test_a_catalog_s_video_lengths_are_checked_on_load(tmp_path):
    from engine.core.catalog import load_catalog
    from engine.core.errors import CatalogError

    overlay = tmp_path / "overlay.yaml"
    for bad, hint in (("[]", "durations_s must list"), ("[4, 0]", "durations_s must list"),
                      ("[4, 12]", "default_duration_s 8 is not one of durations_s")):
        overlay.write_text(f"providers:\n  openai:\n    models:\n      sora-2: {{durations_s: {bad}}}\n")
        with pytest.raises(CatalogError, match=hint):
            load_catalog(None, overlay)


def test_request_is_frozen():
    r = Request.model_validate({"id": "a", "arrival_s": 0, "model": "gpt-5", "input_tokens": 1})
    with pytest.raises(ValidationError):
        r.id = "b"


@pytest.mark.parametrize("bad, field, hint", [
    ({"model": "gpt-9"}, "model", "in no provider's catalog; did you mean"),
    ({"provider": "openai", "model": "claude-haiku-4-5"}, "model", "has no model"),
    ({"provider": "acme"}, "provider", "unknown provider"),
    ({"input_tokens": -1}, "input_tokens", "must be >= 0, got -1"),
    ({"arrival_s": -3}, "arrival_s", "must be >= 0, got -3"),
    ({"kind": "image"}, "kind", "does not match"),
    ({"priority": "asap"}, "priority", "urgent"),
    ({"deadline_s": 0}, "deadline_s", "greater than 0"),
    ({"deadlin_s": 5}, "deadlin_s", "not a request field; did you mean 'deadline_s'"),
    ({"promt": "Hi", "input_tokens": None}, "promt", "did you mean 'prompt'"),  # not "input_tokens is missing"
    ({"output_tokens": 10**9}, "output_tokens", "maximum"),
])
def test_bad_lines_name_line_field_and_fix(bad, field, hint):
    lines = [line(id="ok"), line(id="bad", **bad)]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines, source="t.jsonl")
    (path, no, f, msg), = ei.value.problems
    assert (path, no, f) == ("t.jsonl", 2, field)
    assert hint in msg
    assert "t.jsonl:2: field" in str(ei.value) and "--skip-invalid" in str(ei.value)


def test_media_without_prompt_and_unknown_size_are_refused():
    lines = [json.dumps({"id": "a", "arrival_s": 0, "model": "flux-1-dev"}),
             json.dumps({"id": "b", "arrival_s": 0, "model": "flux-1-dev", "prompt": "x",
                         "params": {"size": "9x9"}})]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines)
    assert [(p[1], p[2]) for p in ei.value.problems] == [(1, "prompt"), (2, "params.size")]


@pytest.mark.parametrize("model", ["gpt-image-1", "wan-2.1-t2v"])
def test_messages_for_an_image_or_video_model_are_refused_naming_them(model):
    """Beside a prompt of its own they were dropped unsaid, and the image made from the other text; alone, they
    went to an images endpoint that takes no messages (a helper's hunt)."""
    for extra in ({"prompt": "a cat"}, {}):
        with pytest.raises(ValidationError, match="body.messages is for text models"):
            Request.model_validate({"id": "m", "arrival_s": 0.0, "model": model, **extra,
                                    "messages": [{"role": "user", "content": "a red fox"}]})
    assert Request.model_validate({"id": "m", "arrival_s": 0.0, "model": model, "prompt": "a cat"}).prompt == "a cat"


def test_duplicate_ids_and_bad_json_are_reported_and_skippable_without_losing_valid_lines():
    lines = [line(id="a"), "{not json", line(id="a"), "", line(id="b", arrival_s=5), line(id="c", arrival_s=1)]
    with pytest.raises(TraceError) as ei:
        parse_trace_lines(lines)
    assert [(p[1], p[2]) for p in ei.value.problems] == [(2, "line"), (3, "id")]
    tr = parse_trace_lines(lines, skip_invalid=True)
    assert [r.id for r in tr.requests] == ["a", "c", "b"]  # sorted by arrival, nothing valid lost
    assert tr.skipped == 2


def test_write_then_load_round_trips(tmp_path):
    reqs = [Request.model_validate({"id": f"r{i}", "arrival_s": i, "model": "wan-2.1-t2v", "prompt": f"p{i}",
                                    "params": {"resolution": "720p", "duration_s": 4}}) for i in range(5)]
    path = tmp_path / "t.jsonl"
    assert write_trace(reqs, path) == 5
    assert load_trace(path).requests == reqs


def test_missing_file_is_a_trace_error(tmp_path):
    with pytest.raises(TraceError, match="cannot read"):
        load_trace(tmp_path / "nope.jsonl")


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                           max_leaves=8)


@hsettings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["id", "arrival_s", "model", "provider", "kind", "prompt", "input_tokens",
                                        "output_tokens", "prefix_blocks", "params", "priority", "deadline_s",
                                        "reuse", "tenant", "junk"]), json_values, max_size=8))
def test_arbitrary_input_gives_a_trace_error_or_a_valid_request(d):
    try:
        tr = parse_trace_lines([json.dumps(d)])
    except TraceError as exc:
        assert exc.problems and all(p[2] for p in exc.problems)
    else:
        assert len(tr.requests) == 1 and tr.requests[0].input_tokens >= 0


def test_a_request_without_a_context_uses_the_settings_read_once_from_the_environment(monkeypatch):
    """Reading ``SMARTBATCH_*`` costs milliseconds and a request validates in microseconds: the process's
    settings are read once, not per request; ``default_settings.cache_clear()`` reads them again."""
    from engine.core.settings import default_settings

    line = {"id": "a", "arrival_s": 0, "model": "gpt-5-mini", "input_tokens": 10, "output_tokens": 1}
    default_settings.cache_clear()
    try:
        assert Request.model_validate(line).deadline_s == default_settings().deadlines.normal
        monkeypatch.setenv("SMARTBATCH_DEADLINES__NORMAL", "1234")
        assert Request.model_validate(line).deadline_s == default_settings().deadlines.normal != 1234
        default_settings.cache_clear()
        assert Request.model_validate(line).deadline_s == 1234
    finally:
        monkeypatch.delenv("SMARTBATCH_DEADLINES__NORMAL")
        default_settings.cache_clear()


def test_a_request_error_raised_in_a_ray_task_reaches_the_caller_as_itself():
    """Ray sends a task's exception to its caller pickled (cloudpickle). Request(**kw) raised pydantic's
    ValidationError, which crosses; since it raises RequestError (stop 77), a bad row built in a Ray task came back
    as ray.exceptions.UnserializableException ("Failed to deserialize exception"): RequestError was rebuilt from its
    message alone and needs its field. TraceError (load_trace in a task) had the same fault."""
    from ray import cloudpickle

    from engine.core.errors import RequestError

    with pytest.raises(RequestError) as ei:
        Request(id="q1", arrival_s=0, model="gpt-5.4-mni", prompt="Hi")
    made = [ei.value, RequestError("q2", "id", "taken", 3, code="id_taken"),
            TraceError([("t.jsonl", 2, "model", "unknown")], hint="", what="batch file")]
    for exc in made:
        back = cloudpickle.loads(cloudpickle.dumps(exc))
        assert type(back) is type(exc) and str(back) == str(exc), (back, exc)
        assert {k: getattr(back, k) for k in vars(exc)} == vars(exc)
