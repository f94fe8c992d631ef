"""``Engine.start``'s own arguments, checked before anything starts: a bad one named with its fix, never a raw
error from deep inside (a pydantic error about a catalog field for ``speedup=nan``, a Ray task error for
``metrics_port=-1``), and never after an embedded Ray was started for nothing (a helper's tour)."""

from __future__ import annotations

import math
from typing import Any

from engine.core._logkeys import get_logger
from engine.core.errors import ConfigError

__all__ = ["check_name", "check_start_args", "tell_unmet_near"]

log = get_logger("smartbatch")


def _number(name: str, v: Any, *, low: float, inclusive: bool = True, fix: str) -> None:
    ok = (not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
          and (v >= low if inclusive else v > low))
    if not ok:
        raise ConfigError(f"{name}={v!r}: {fix}")


def _whole(name: str, v: Any, low: int) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{name}={v!r}: give a whole number >= {low}")


def check_name(name: Any, flag: str = "name=") -> None:
    """Refuse an engine name that is empty, blank or no string; ``flag``: how the message names it."""
    if not isinstance(name, str) or not name.strip():
        # "" was taken as no name: the engine ran as a random sb-xxxxxx, which Engine.connect("") and
        # `smartbatch serve --name ""`'s own claim did not name (a new user's tour).
        raise ConfigError(f"{flag}{name!r}: give a non-empty name (what Engine.connect and smartbatch stop --name "
                          "take)" + (", or leave it out for a random one" if flag == "name=" else ""))


def check_start_args(*, speedup: Any, offset_s: Any, seed: Any, micro_batch: Any, flush_ms: Any,
                     num_groupers: Any, num_shards: Any, max_pending: Any, overload: Any, submit_timeout_s: Any,
                     retention_s: Any, metrics_port: Any, name: Any = None) -> None:
    """Raise ``ConfigError`` naming the first bad argument."""
    if name is not None:
        check_name(name)
    _number("speedup", speedup, low=0.0, inclusive=False, fix="engine seconds per real second, a number > 0 "
            "(1 for real time)")
    _number("offset_s", offset_s, low=-math.inf, fix="the engine clock's start, a finite number of seconds")
    if seed is not None:
        _whole("seed", seed, 0)
    for name, v in (("micro_batch", micro_batch), ("num_groupers", num_groupers), ("num_shards", num_shards),
                    ("max_pending", max_pending)):
        _whole(name, v, 1)
    _number("flush_ms", flush_ms, low=0.0, inclusive=False, fix="milliseconds, a number > 0")
    _number("submit_timeout_s", submit_timeout_s, low=0.0, fix="seconds, a number >= 0")
    _number("retention_s", retention_s, low=0.0, fix="seconds, a number >= 0")
    if overload not in ("block", "raise"):
        raise ConfigError(f"overload={overload!r}: give 'block' (wait for room) or 'raise' (Overloaded at once)")
    if metrics_port not in ("settings", None) and (isinstance(metrics_port, bool) or not isinstance(
            metrics_port, int) or not 0 <= metrics_port <= 65535):
        raise ConfigError(f"metrics_port={metrics_port!r}: give a port in [0, 65535] (0: a free one), or None "
                          "to serve no metrics")


def tell_unmet_near(policy: Any, near_floor: float) -> str | None:
    """Warn once, as the engine starts, when the user set the policy's ``near_threshold`` below the floor in effect
    (``engine.runtime.reuse.near_threshold_unmet``); the warning's words, or None. Told, not refused: the floor holds
    whatever is asked, and a value tuned before the embedding came still runs as it did. The policy's own default
    (smart's 0.92, under text's 0.925) is not the user's doing, and is said in docs/policies.md."""
    from engine.runtime.reuse import near_threshold_unmet

    given = getattr(getattr(policy, "params", None), "model_fields_set", ())
    if "near_threshold" not in given or not policy.reuse.near:
        return None
    unmet = near_threshold_unmet(policy.reuse.near_threshold, near_floor)
    if unmet is not None:
        log.warning("smartbatch: policy %s: %s", type(policy).__name__, unmet)
    return unmet
