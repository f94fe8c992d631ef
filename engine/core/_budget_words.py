"""What a deferred budget verdict tells the request it rejects (``Verdict.why``): what holds it, what it reserves,
when it could go, and the ways on that would pass it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.core.budgets import Verdict

__all__ = ["EPS", "deferred_never", "deferred_reason"]

EPS = 1e-9  # USD below which two amounts are one (engine.core.budgets' comparisons)


def deferred_never(v: Verdict, claim_usd: float | None) -> bool:
    """Whether ``claim_usd`` is more than ``v``'s priority may reach in any window, so no reset passes it. Paced,
    what it may reach now is less than its share, and a request dearer than the whole share was told it "could
    go" at the window's end (stop 75's note)."""
    cap = v.share_usd if v.share_usd is not None else None if v.paced else v.allowed_usd
    return (claim_usd is not None and cap is not None and v.max_usd is not None and cap < v.max_usd - EPS
            and claim_usd > cap + EPS)


def deferred_reason(v: Verdict, claim_usd: float | None) -> str:
    """The reason of a request ``v`` deferred past its deadline; ``claim_usd``, what it reserved. Said as "resets
    at t=86400s, after the deadline" alone, a normal request of $0.0009 under a $0.004 day budget with $0.0013 left
    read as a bug: pacing held it, and nothing named it or the ways on (a tour)."""
    reach = v._reach()
    said = f"budget {v.budget} has ${v.remaining_usd:.6f} left" + reach
    if claim_usd is not None:
        said += f"; this request reserves up to ${claim_usd:.6f}"
    short = claim_usd is not None and claim_usd > v.remaining_usd + EPS
    if claim_usd is not None and v.max_usd is not None and claim_usd > v.max_usd + EPS:  # no reset lets it pass
        # Nor a later deadline: it was told "give it a later deadline" beside "it could go in no window" (a review).
        return (f"{said}, more than the whole limit of ${v.max_usd:.6f}: it could go in no window: raise the budget "
                "or give it a lower max_tokens, which reserves less (docs/budgets.md)")
    if reach and deferred_never(v, claim_usd):
        # Unpaced, what its priority may reach now is its share of any window: the reset that "could" pass it
        # gives it no more, so neither does a later deadline alone (a review of stop 75).
        # Urgent work is never deferred: short of the money left, it is refused at once, so not said then.
        share = f"raise that fraction (budgets.throttle.{v.priority})"
        ways = (f"{share} and give it a later deadline" if short else
                f"send it urgent (it may spend the whole limit), {share}")
        whole = f" (${v.share_usd:.6f}, even at the window's end)" if v.paced else ""
        return (f"{said}, more than {v.priority} work may reach in any window{whole}: {ways}, or raise the budget; "
                "or reserve less: a lower max_tokens (max_output_tokens), or budgets.reserve_output: request, which "
                "reserves its output_tokens rather than the model's maximum (docs/budgets.md)")
    said += (f" and could go only at t={v.retry_at:.0f}s" + ("" if v.paced else ", when the window resets")
             + ", after its deadline")
    if short or not reach:
        # Nor would urgent work, a larger share or no pacing pass it: a spent budget (or one of $0) was told "send
        # it urgent ... or raise that fraction", a fraction the reason never named (a new user's tour).
        return (f"{said}: give it a later deadline or raise the budget"
                + ("; a lower max_tokens reserves less" if short else "") + " (docs/budgets.md)")
    ways = (", or turn pacing off (SMARTBATCH_BUDGETS__THROTTLE__PACE=false)" if v.paced
            else ", or raise that fraction")
    return (f"{said}: send it urgent ({'never paced, and ' if v.paced else ''}it may spend the whole limit), "
            f"give it a later deadline, raise the budget{ways} (docs/budgets.md)")
