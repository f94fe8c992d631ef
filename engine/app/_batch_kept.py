"""What the lines ``smartbatch batch --resume`` keeps from an earlier run cost: counted against the budgets of
this run, never less than they were billed."""

from __future__ import annotations

from pathlib import Path

__all__ = ["kept_charges"]


def kept_charges(lines: list, kept: dict[int, dict], cat, out: Path) -> list:
    """What each line kept from an earlier run cost, priced from the usage its answer reports at the sync price,
    its input at the dearer of what it reports and all but its reads written to a prompt cache (the file does not
    say which mode answered it, nor always what it wrote: never less than it cost); a line with no usage, at its
    list price. A line the cache answered (its request id says so) and a line that shares its request id with a
    line before it (a copy answered by that call) cost 0."""
    from engine.core.budgets import Charge
    from engine.core.cost import price_alone, price_usage

    charges, calls = [], set()
    for ln in lines:
        req = ln.request
        if req is None:
            continue
        resp = kept[ln.no].get("response") or {}
        body = resp.get("body")
        u = body.get("usage") if isinstance(body, dict) else None
        rid = resp.get("request_id")
        if isinstance(rid, str) and (rid.startswith("smartbatch_reused_") or rid in calls):
            usd = 0.0  # answered from the cache, or by a call another kept line already counts
        elif req.kind == "text" and isinstance(u, dict):
            chat = "prompt_tokens" in u  # chat completions; else Responses, or Anthropic's own
            read = ((u.get("prompt_tokens_details") if chat else u.get("input_tokens_details")) or {}).get(
                "cached_tokens") or u.get("cache_read_input_tokens") or 0
            write = u.get("cache_creation_input_tokens") or 0
            inp = u.get("prompt_tokens", 0) if chat else u.get("input_tokens", 0) + (
                read + write if "cache_read_input_tokens" in u or "cache_creation_input_tokens" in u else 0)
            out_t = u.get("completion_tokens" if chat else "output_tokens", 0)
            # An answer in chat shape may not say what its input wrote to a prompt cache (an Anthropic one
            # rewritten as a chat completion): every unread input token priced as a write bounds it (a review).
            usd = max(price_usage(req, cat, "sync", input_tokens=inp, output_tokens=out_t, cache_read=r,
                                  cache_write=w).total for r, w in ((read, write), (read, inp - read)))
        elif req.kind == "image" and req.params.get("quality") in (None, "auto"):
            # The quality the provider picked, as its answer says (``_as_made``), else the dearest: at the default,
            # two kept "high" images were counted at a quarter of their bill, past a hard limit (a hunt).
            made = body.get("quality") if isinstance(body, dict) else None
            q = made if made in (cat.model(req.provider, req.model).per_image_quality or {}) else "auto"
            usd = price_alone(req.model_copy(update={"params": {**req.params, "quality": q}}), cat, "sync").total
        else:
            usd = price_alone(req, cat, "sync").total
        if isinstance(rid, str):
            calls.add(rid)
        charges.append(Charge(f"resume:{out}:{req.uid}", req.tenant, req.provider, req.model, usd))
    return charges
