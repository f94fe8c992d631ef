"""Admission, the runtime kernel's first step: which reuse a request may take. One copy of each rule, used by
the simulator and by the cache actor alike."""

from __future__ import annotations

from engine.core.grouping import ReuseSettings
from engine.core.request import Request

__all__ = ["may_follow"]


def may_follow(reuse: ReuseSettings, leader: Request, req: Request) -> bool:
    """Whether ``req`` may wait for the result of ``leader``, an identical (or near) request still in flight:
    only when the policy allows in-flight reuse and the leader is due no later than ``req``. A runtime cannot
    know when a call will finish, so the leader's deadline is the only promise it has."""
    return reuse.in_flight and leader.deadline_at <= req.deadline_at
