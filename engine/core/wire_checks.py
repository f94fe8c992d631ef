"""The checks of a request's body against the wire format of the provider it goes to (``settings.providers``):
one set for a request validated from a dict (``Request``) and for a ``Request`` made elsewhere and handed to an
engine (``in_catalog``). A trace loaded for the simulator and replayed live skipped those of a real call: a
Responses body with no counterpart in chat completions went on to the provider (a review)."""

from __future__ import annotations

from typing import Any

from engine.core._api_fields import check_api_body
from engine.core._body_checks import check_anthropic_system, check_cache_ttl
from engine.core._callers import renamed
from engine.core._checks import FieldProblem, check_generation, check_route, check_tools
from engine.core._sdk_fields import check_openai_fields
from engine.core._settings_providers import simulated_refusal
from engine.core.catalog import Catalog, ModelSpec
from engine.core.responses_input import as_messages, check_responses_body, translates
from engine.core.settings import Settings

__all__ = ["check_line_url", "check_real", "check_wire", "layer_of"]


def check_wire(body: dict[str, Any] | None, spec: ModelSpec, provider: str, settings: Settings,
               compat: str | None = None, api_fields: bool = False) -> None:
    """Raise ``FieldProblem`` for what the provider's API would refuse, or bill at prices the catalog lacks
    (``compat``: the provider's ``ProviderSpec.compat``, how its OpenAI-compatible layer differs from OpenAI's).
    ``api_fields``: a field the provider's server does not know is refused in a simulated run too (a batch file
    made into a trace is written for the providers), without the checks of the engine's own route to it."""
    endpoint = settings.providers.endpoints.get(provider)
    if body is None or endpoint is None:
        return
    check_generation(body, "body", endpoint.api)
    # The body as it goes on the wire: a Responses body for chat completions or Messages goes as messages, with
    # the fields those cannot carry dropped, and its cache marks where they land (checked on the Responses body,
    # a Responses client's metadata and user were refused at Anthropic, and a fifth mark passed; a review).
    responses = translates(body, endpoint.api, spec.api)
    came: dict[str, str] = {}  # a refusal of the translated body names the caller's field (engine.core._callers)
    wire = as_messages(body, endpoint.api, spec.api, came) if responses else body
    real = spec.kind == "text" and settings.providers.mode == "http"  # only a real call has a route
    try:
        # A Responses body's function tools go as Anthropic's (checked on the wire); one that cannot go as
        # messages is refused below, naming why (check_responses_body), where its tools read as another API's here.
        if not (responses and wire is body and real):
            check_tools(wire, "body", endpoint.api)
        if wire is not body or not responses:  # else it cannot go as messages, and check_responses_body says why
            check_api_body(wire, "body", endpoint.api, spec, compat)
            if endpoint.api == "anthropic":
                check_cache_ttl(wire, "body")
    except FieldProblem as exc:
        raise renamed(exc, came) from None
    if endpoint.api == "anthropic" and not responses:
        check_anthropic_system(body, "body")  # a Responses body's system parts: check_responses_body
    if real:
        check_responses_body(body, "body", endpoint.api, spec.api)
        check_route(body, "body", endpoint.api, spec.api)
    # A field OpenAI's route does not take, where a real call goes to a server that refuses one (OpenAI's own API,
    # the emulator): last, so a body of the other OpenAI route is named as such by the checks above.
    # (``api_fields`` in a simulated run: not a Responses body that cannot go as messages, which an HTTP run
    # refuses above, and whose fields are the Responses API's, not those of the model's route.)
    strict = settings.providers.mode == "http" or (api_fields and not (responses and wire is body))
    if (strict and endpoint.api == "openai" and compat is None
            and endpoint.refuses_unknown_fields()):
        try:
            check_openai_fields(wire, "body", spec)
        except FieldProblem as exc:
            raise renamed(exc, came) from None


def layer_of(catalog: Catalog, provider: str, settings: Settings) -> str | None:
    """The OpenAI-compatible layer (``ProviderSpec.compat``) whose rules a request to ``provider`` is held to: its
    own where the settings give the provider an endpoint (its calls go there), else none (simulated, as
    ``check_wire``)."""
    return catalog.provider(provider).compat if provider in settings.providers.endpoints else None


def check_real(provider: str, model: str, settings: Settings) -> None:
    """Raise ``FieldProblem`` (``model``) for a request an HTTP run would answer from the simulator, made-up text
    at a made-up cost, where ``settings.providers`` does not let it (``simulate_others``)."""
    if settings.providers.refuses(provider):
        raise FieldProblem("model", simulated_refusal(provider, model, settings.providers.endpoints))


def check_line_url(url: str, kinds: dict[str, str], model: str, kind: str, provider: str, settings: Settings) -> None:
    """Raise ``FieldProblem`` naming ``url`` for a batch line whose url does not fit its model: one of another kind
    (``kinds``: each url's), or ``/v1/messages`` for a model not called through Anthropic's Messages API."""
    if kinds[url] != kind:
        # Sent as the model's kind and answered in the url's shape: paid for, and read as the wrong thing.
        fits = [u for u, k in kinds.items() if k == kind]
        raise FieldProblem("url", f"url {url!r} is for {kinds[url]} models, and {model!r} generates {kind}: "
                           + (f"use {' or '.join(fits)}" if fits else f"a batch file has no url for {kind} models"))
    endpoint = settings.providers.endpoints.get(provider)  # none (simulated alone): its name says its API
    if url == "/v1/messages" and (provider if endpoint is None else endpoint.api) != "anthropic":
        # Its Anthropic body went to another API, judged by its rules: a Messages line's required max_tokens was
        # refused for an OpenAI reasoning model with "give max_completion_tokens" (a new user's tour, stop 79).
        raise FieldProblem("url", f"url '/v1/messages' is Anthropic's Messages API, and {model!r} is not called "
                           "through it: use /v1/chat/completions (or /v1/responses) with an OpenAI-format body, as "
                           "the endpoint's /v1/messages refuses it, or name a Claude model")
