"""The emulator refuses a top-level body field its route does not take, in the real API's words: before, it took
any, so a field the engine sent wrongly (a typo, a field of another route or provider) passed every test and
failed only against the real API. The fields are the installed SDKs' typed params (``engine.core._sdk_fields``)."""

from __future__ import annotations

import anthropic
import openai
import pytest
from openai.types.chat.completion_create_params import CompletionCreateParamsNonStreaming

from engine.core._sdk_fields import sdk_fields
from tests.unit.test_emulator import (  # noqa: F401  (emu, sdk: the fixtures)
    KEY,
    Emulator,
    Sdk,
    anthropic_requests,
    batch_line,
    emu,
    post,
    sdk,
    upload,
    user,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


def openai_error(exc: openai.BadRequestError) -> dict:
    return exc.response.json()["error"]


def test_chat_completions_refuses_an_unknown_field_as_openai_does(emu: Emulator, sdk: Sdk):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user("hi"),
                                             extra_body={"max_complettion_tokens": 20})
    assert err.value.status_code == 400
    assert openai_error(err.value) == {"message": "Unrecognized request argument supplied: max_complettion_tokens",
                                       "type": "invalid_request_error", "param": None, "code": None}
    assert not emu.bill().items


@pytest.mark.parametrize("route, call", [
    ("responses", lambda c: c.responses.create(model="gpt-5-mini", input="hi", extra_body={"max_tokens": 20})),
    ("images", lambda c: c.images.generate(model="gpt-image-1", prompt="a fox", extra_body={"max_tokens": 20})),
    ("batches", lambda c: c.batches.create(input_file_id=upload(c, [batch_line("a", "hi")]),
                                           endpoint="/v1/chat/completions", completion_window="24h",
                                           extra_body={"max_tokens": 20})),
])
def test_the_newer_openai_routes_refuse_an_unknown_field_naming_it(emu: Emulator, sdk: Sdk, route, call):  # noqa: F811
    with pytest.raises(openai.BadRequestError) as err:
        call(sdk.openai())
    assert openai_error(err.value) == {"message": "Unknown parameter: 'max_tokens'.", "type": "invalid_request_error",
                                       "param": "max_tokens", "code": "unknown_parameter"}
    assert not emu.bill().items


def test_a_files_form_field_it_does_not_take_is_refused_and_the_sdks_own_pass(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.openai()
    with pytest.raises(openai.BadRequestError) as err:
        client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch", extra_body={"purpse": "batch"})
    assert openai_error(err.value)["param"] == "purpse"
    # expires_after goes as the form parts expires_after[anchor] and expires_after[seconds]
    made = client.files.create(file=("in.jsonl", b"{}\n"), purpose="batch",
                               expires_after={"anchor": "created_at", "seconds": 3600})
    assert made.purpose == "batch"


def test_a_batch_line_with_an_unknown_field_errors_alone(emu: Emulator, sdk: Sdk):  # noqa: F811
    from tests.unit.test_emulator import finished_batch, jsonl
    client = sdk.openai()
    bad = batch_line("b", "hi")
    bad["body"]["stop_sequences"] = ["x"]  # Anthropic's name, at OpenAI
    done = finished_batch(client, client.batches.create(input_file_id=upload(client, [batch_line("a", "hi"), bad]),
                                                        endpoint="/v1/chat/completions",
                                                        completion_window="24h").id)
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    err = jsonl(client, done.error_file_id)["b"]["response"]
    assert err["status_code"] == 400
    assert err["body"]["error"]["message"] == "Unrecognized request argument supplied: stop_sequences"
    assert [i.custom_id for i in emu.bill().items] == ["a"]


def test_anthropic_message_batches_refuse_an_extra_input_at_create(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    reqs = anthropic_requests(2, "m")
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.batches.create(requests=reqs, extra_body={"priority": "high"})
    assert err.value.body["error"] == {"type": "invalid_request_error",
                                       "message": "priority: Extra inputs are not permitted"}
    reqs[1]["max_tokens"] = 10  # beside params, where it is no field
    with pytest.raises(anthropic.BadRequestError, match=r"requests\.1\.max_tokens: Extra inputs are not permitted"):
        client.messages.batches.create(requests=reqs)
    assert not emu.bill().items


def test_anthropic_messages_and_count_tokens_refuse_another_apis_field(emu: Emulator, sdk: Sdk):  # noqa: F811
    client = sdk.anthropic()
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(model="claude-haiku-4-5", max_tokens=10, messages=user("hi"),
                               extra_body={"max_completion_tokens": 10})
    assert err.value.body["error"]["message"] == "max_completion_tokens: Extra inputs are not permitted"
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: Extra inputs are not permitted"):
        client.messages.count_tokens(model="claude-haiku-4-5", messages=user("hi"), extra_body={"max_tokens": 10})


def test_the_fields_the_sdks_send_themselves_pass(emu: Emulator, sdk: Sdk):  # noqa: F811
    """``stream: false`` is sent by a caller that names it; the sampling keys the Anthropic SDK no longer types
    are the API's."""
    sdk.openai().chat.completions.create(model="gpt-5-mini", messages=user("hi"), stream=False)
    sdk.openai().responses.create(model="gpt-5-mini", input="hi", stream=False)
    sdk.anthropic().messages.create(model="claude-haiku-4-5", max_tokens=10, messages=user("hi"), stream=False,
                                    extra_body={"temperature": 0.5, "top_k": 5})
    assert len(emu.bill().items) == 3


def test_a_google_compat_provider_keeps_its_own_refusal(emu: Emulator):  # noqa: F811
    """Gemini's OpenAI layer answers in Google's words (``_gemini``), not OpenAI's."""
    status, body = post(emu.base_url("google") + "/chat/completions",
                        {"model": "gemini-2.5-flash", "messages": user("hi"), "max_complettion_tokens": 5},
                        {"authorization": f"Bearer {KEY}"})
    assert status == 400 and 'Unknown name "max_complettion_tokens"' in body[0]["error"]["message"]


def test_the_field_sets_follow_the_installed_sdk():
    typed = set(CompletionCreateParamsNonStreaming.__annotations__)
    assert typed <= sdk_fields("chat.completions") and "stream" in sdk_fields("chat.completions")
    assert "max_output_tokens" in sdk_fields("responses") and "max_output_tokens" not in sdk_fields("chat.completions")
    assert sdk_fields("no.such.route") is None  # a route the SDK lacks params for is not checked


def test_a_route_s_params_read_while_another_import_races_them_are_still_read(monkeypatch):
    # A loaded run of stop 81: two emulator threads read the SDK's params on a route's first call at once, and the
    # import raised KeyError for the SDK's package: the batch create was answered 500. Read once more, not raised.
    import importlib

    from engine.core import _sdk_fields

    real, raced = importlib.import_module, []

    def racing(name, *a, **k):
        if not raced:
            raced.append(name)
            raise KeyError("openai.types")
        return real(name, *a, **k)

    monkeypatch.setattr(_sdk_fields.importlib, "import_module", racing)
    assert _sdk_fields.sdk_fields.__wrapped__("batches.create") == sdk_fields("batches.create")
    assert raced == ["openai.types.batch_create_params"]
