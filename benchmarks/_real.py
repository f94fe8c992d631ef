"""The real traces the benchmarks read by name, from ``../shared/data/real`` (or ``--data``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from engine.core.request import Request
from engine.core.tracegen import from_azure, from_mooncake

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "real"
FILES = {"azure_conv": "azure_llm_2023_conv.csv", "azure_code": "azure_llm_2023_code.csv",
         "mooncake": "mooncake_conversation_trace.jsonl"}


def load_real(name: str, data: Path = DATA) -> Sequence[Request]:
    """One of ``FILES`` as requests, built with the default seed and catalog (an Azure trace keeps its time of
    day: ``TraceRequests``)."""
    path = data / FILES[name]
    return from_mooncake(path) if name == "mooncake" else from_azure(path)
