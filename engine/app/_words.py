"""Counts said in words: "1 request", "2 requests" (a one-request trace's tables read "1 requests")."""

from __future__ import annotations


def counted(n: int, noun: str) -> str:
    """``n`` (with thousands separators) and ``noun``, plural unless ``n`` is 1 (a regular plural: add ``s``)."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
