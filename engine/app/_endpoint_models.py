"""``GET /v1/models`` and ``GET /v1/models/{id}`` in the caller's API: OpenAI's list of every catalog model, or, for
the Anthropic SDK (it sends ``anthropic-version`` on every call; the OpenAI SDK never does), Anthropic's Models API:
the Claude models alone (those whose provider is called through Anthropic's Messages API), a page at a time.

Anthropic's page is ``{"data": [ModelInfo], "has_more", "first_id", "last_id"}``, ``limit`` 1 to 1,000 (20 by
default) models after ``after_id`` or before ``before_id``, in the catalog's order (Anthropic lists the newest
first; the catalog keeps no release day). A ModelInfo's ``created_at`` is the Unix epoch, the value Anthropic gives
a model whose release day it does not know, its ``lifecycle`` and ``retires_at`` from the catalog's ``shutdown``
day, its limits from the catalog. Before, the Anthropic SDK got OpenAI's list, which it could not read."""

from __future__ import annotations

import datetime
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter
from fastapi import Request as HttpRequest

from engine.app._endpoint_messages import AnthropicError
from engine.app._endpoint_wire import ApiError
from engine.core.answer_body import MESSAGES_URL
from engine.core.catalog import Catalog, ModelSpec
from engine.core.settings import Settings

__all__ = ["anthropic_caller", "anthropic_page", "display_name", "models_router"]

ANTHROPIC_VERSION = "anthropic-version"
DEFAULT_LIMIT, MAX_LIMIT = 20, 1000  # Anthropic's Models API: "Defaults to 20. Ranges from 1 to 1000."
EPOCH = "1970-01-01T00:00:00Z"  # created_at of a model whose release day is unknown, as Anthropic writes it
LIFECYCLES = ("active", "deprecated", "retired")


def anthropic_caller(http: HttpRequest) -> bool:
    """Whether the caller speaks Anthropic's API: a Messages path, or the SDK's ``anthropic-version`` header."""
    path = http.url.path
    return (path == MESSAGES_URL or path.startswith(MESSAGES_URL + "/")
            or http.headers.get(ANTHROPIC_VERSION) is not None)


def display_name(model: str) -> str:
    """A model's name as Anthropic shows it: ``claude-sonnet-4-5`` -> ``Claude Sonnet 4.5`` (a trailing date, as in
    ``claude-3-5-haiku-20241022``, left out)."""
    words: list[str] = []
    for part in model.split("-"):
        if part.isdigit() and len(part) == 8:
            continue
        if part.isdigit() and words and words[-1][-1].isdigit():
            words[-1] += "." + part
        else:
            words.append(part.capitalize() if not part.isdigit() else part)
    return " ".join(words)


def _model_info(model: str, spec: ModelSpec, today: datetime.date) -> dict[str, Any]:
    end = spec.shutdown
    lifecycle = "active" if end is None else "retired" if end <= today else "deprecated"
    return {"type": "model", "id": model, "display_name": display_name(model), "created_at": EPOCH,
            "lifecycle": lifecycle, "deprecated_at": None,
            "retires_at": None if end is None else f"{end.isoformat()}T00:00:00Z",
            "max_input_tokens": spec.max_input_tokens or spec.context_window, "max_tokens": spec.max_output_tokens}


def _limit(text: str | None) -> int:
    try:
        n = DEFAULT_LIMIT if text is None else int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= MAX_LIMIT:
        raise AnthropicError(400, f"limit: {text!r} must be a whole number from 1 to {MAX_LIMIT} (default "
                                  f"{DEFAULT_LIMIT})", param="limit")
    return n


def _lifecycles(http: HttpRequest) -> set[str] | None:
    """The ``lifecycle`` filter (the SDK's list, repeated or comma-joined), or None: every model."""
    q = http.query_params
    given = [v for item in (*q.getlist("lifecycle"), *q.getlist("lifecycle[]")) for v in item.split(",") if v]
    bad = sorted(set(given) - set(LIFECYCLES))
    if bad:
        raise AnthropicError(400, f"lifecycle: {bad[0]!r} is not a lifecycle; give any of {', '.join(LIFECYCLES)}",
                             param="lifecycle")
    return set(given) or None


def anthropic_page(items: list[dict], *, limit: str | None, after: str | None, before: str | None) -> dict:
    """Anthropic's page of ``items``: the ``limit`` after the one with id ``after``, or before ``before``;
    ``has_more`` says whether more lie that way."""
    n = _limit(limit)
    if after is not None and before is not None:
        raise AnthropicError(400, "before_id and after_id: give one of them, not both", param="after_id")
    ids = [it["id"] for it in items]
    for name, cursor in (("after_id", after), ("before_id", before)):
        if cursor is not None and cursor not in ids:
            raise AnthropicError(400, f"{name}: {cursor!r} is not a model of this list; pass the "
                                      f"{'last_id' if name == 'after_id' else 'first_id'} of the page before",
                                 param=name)
    if before is not None:
        end = ids.index(before)
        start = max(0, end - n)
        page, more = items[start:end], start > 0
    else:
        start = 0 if after is None else ids.index(after) + 1
        page, more = items[start:start + n], start + n < len(items)
    return {"data": page, "has_more": more, "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None}


def models_router(catalog: Catalog, settings: Settings, *,
                  today: Callable[[], datetime.date] | None = None) -> APIRouter:
    """The two model routes; ``today`` (UTC by default) tells a retired model from one that will be."""
    day = today or (lambda: datetime.datetime.now(datetime.timezone.utc).date())
    models = [{"id": name, "object": "model", "created": 0, "owned_by": pname}
              for pname, p in catalog.providers.items() for name in p.models]
    claude = [(name, spec) for pname, p in catalog.providers.items()
              if (ep := settings.providers.endpoints.get(pname)) is not None and ep.api == "anthropic"
              for name, spec in p.models.items() if spec.kind == "text"]
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models(http: HttpRequest) -> dict:
        if not anthropic_caller(http):
            return {"object": "list", "data": models}
        q, now, wanted = http.query_params, day(), _lifecycles(http)
        infos = [_model_info(name, spec, now) for name, spec in claude]
        infos = [i for i in infos if wanted is None or i["lifecycle"] in wanted]
        return anthropic_page(infos, limit=q.get("limit"), after=q.get("after_id"), before=q.get("before_id"))

    @router.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, http: HttpRequest) -> dict:
        if anthropic_caller(http):
            spec = next((s for name, s in claude if name == model_id), None)
            if spec is None:
                raise AnthropicError(404, f"model: {model_id!r} is not a Claude model of this engine's catalog; "
                                          "GET /v1/models lists them")
            return _model_info(model_id, spec, day())
        found = next((m for m in models if m["id"] == model_id), None)
        if found is None:
            raise ApiError(404, f"The model '{model_id}' does not exist; GET /v1/models lists the catalog's "
                                "models", param="model", code="model_not_found")
        return found

    return router
