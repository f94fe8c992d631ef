"""A request and the catalog and settings it is checked against: the context ``Request.model_validate`` reads,
and a request made elsewhere checked again against an engine's catalog (``in_catalog``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import ValidationInfo

from engine.core._checks import FieldProblem
from engine.core.catalog import Catalog, default_catalog
from engine.core.errors import CatalogError, RequestError
from engine.core.settings import Settings, default_settings
from engine.core.wire_checks import check_wire

if TYPE_CHECKING:
    from engine.core.request import Request

__all__ = ["in_catalog", "validation_context"]


def validation_context(catalog: Catalog | None = None, settings: Settings | None = None, *, live: bool = False,
                       api_fields: bool = False) -> dict[str, Any]:
    """The context ``Request.model_validate(d, context=...)`` reads. ``live``: an engine's way in, which also
    refuses a provider it would simulate (``check_real``); ``api_fields``: ``check_wire``'s, even when simulated."""
    return {"catalog": catalog or default_catalog(), "settings": settings or default_settings(), "live": live, "api_fields": api_fields}


def _ctx(info: ValidationInfo) -> tuple[Catalog, Settings]:
    ctx = info.context or {}
    return ctx.get("catalog") or default_catalog(), ctx.get("settings") or default_settings()


def in_catalog(req: Request, catalog: Catalog, position: int | None = None, settings: Settings | None = None
               ) -> Request:
    """``req`` (a ``Request`` made elsewhere, e.g. validated against another catalog), if ``catalog`` has its
    provider and model and its body suits the provider's wire format under ``settings`` (``check_wire``); else
    ``RequestError`` naming the field. Unchecked, a model not in the catalog reached a grouper and failed there
    as "policy error: 'anthropic'"."""
    try:
        spec = catalog.model(req.provider, req.model)
    except CatalogError as exc:
        raise RequestError(req.id, "model", f"{req.provider}/{req.model} is not in this engine's catalog ({exc}); "
                           "give a model of it, or start the engine with a catalog that has it", position) from None
    if settings is not None:
        try:
            check_wire(req.body, spec, req.provider, settings, catalog.provider(req.provider).compat)
        except FieldProblem as exc:
            raise RequestError(req.id, exc.field, str(exc), position) from None
    return req
