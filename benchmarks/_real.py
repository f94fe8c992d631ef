"""The real traces the benchmarks read by name, from ``../shared/data/real`` beside the checkout, or the directory
``SMARTBATCH_DATA_DIR`` names (as the tests read it), or a script's ``--data``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from engine.core.request import Request
from engine.core.tracegen import from_azure, from_mooncake

DATA = Path(os.environ.get("SMARTBATCH_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data" / "real")
FILES = {"azure_conv": "azure_llm_2023_conv.csv", "azure_code": "azure_llm_2023_code.csv",
         "mooncake": "mooncake_conversation_trace.jsonl"}


def load_real(name: str, data: Path = DATA) -> Sequence[Request]:
    """One of ``FILES`` as requests, built with the default seed and catalog (an Azure trace keeps its time of
    day: ``TraceRequests``)."""
    path = data / FILES[name]
    if not path.is_file():
        # Every script reads the traces here: a missing directory ended in a traceback whose last line told the
        # user to "pass an existing, readable file", which no flag of these scripts takes.
        raise SystemExit(f"error: real data not found: {path} (the {name} trace) is not a file; pass --data DIR "
                         f"or set SMARTBATCH_DATA_DIR to the directory that holds {', '.join(FILES.values())}")
    return from_mooncake(path) if name == "mooncake" else from_azure(path)
