"""A text request's tokens against its model's context window and input limit (``Request`` checks it once
its defaults are filled), naming the field to lower and the catalog's models with a larger window."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.core._checks import FieldProblem

if TYPE_CHECKING:
    from engine.core.catalog import Catalog
    from engine.core.request import Request

__all__ = ["check_window"]


def check_window(req: Request, catalog: Catalog) -> None:
    """Input plus the output the call may produce (its cap when it has one) must fit the model's context
    window, and input its input limit: the provider would refuse the call, after it was queued and reserved."""
    spec = catalog.model(req.provider, req.model)
    out = max(req.output_tokens, req.max_output_tokens or 0)
    need, limit = req.input_tokens + out, spec.context_window
    if spec.max_input_tokens is not None and req.input_tokens > spec.max_input_tokens:
        raise FieldProblem("input_tokens", f"input_tokens {req.input_tokens:,} exceeds {req.model}'s input limit of "
                           f"{spec.max_input_tokens:,}; shorten the prompt{_larger(catalog, req.input_tokens, need)}")
    if limit is not None and need > limit:
        if req.input_tokens >= limit:
            field, fix = "input_tokens", "shorten the prompt"
        else:
            field = "max_output_tokens" if (req.max_output_tokens or 0) > req.output_tokens else "output_tokens"
            fix = f"lower {field} to at most {limit - req.input_tokens:,} or shorten the prompt"
        raise FieldProblem(field, f"input_tokens {req.input_tokens:,} + output {out:,} = {need:,} tokens exceeds "
                           f"{req.model}'s context window of {limit:,}; {fix}"
                           f"{_larger(catalog, req.input_tokens, need)}")


def _larger(catalog: Catalog, input_tokens: int, need: int) -> str:
    fits = sorted((m.context_window, name) for p in catalog.providers.values() for name, m in p.models.items()
                  if m.kind == "text" and m.context_window is not None and m.context_window >= need
                  and (m.max_input_tokens is None or m.max_input_tokens >= input_tokens))
    return f", or use a model with a larger window ({', '.join(n for _, n in fits[:3])})" if fits else ""
