"""Smart with its gather losses set per provider (stop 65): ``gather_p_loss`` and ``shared_gather_p_loss`` apply to
every provider alike, where a gather's worth differs by provider (OpenAI's cache writes cost nothing extra,
Anthropic's 1.25x), so each variant here overrides them for the providers it names, paired against smart.

    .venv/bin/python benchmarks/bench_gather_by_provider.py mooncake --seeds 12 --jobs 2 \
        --variant openai.shared=0.01 --variant openai.shared=0.02,anthropic.shared=0.04

A variant is ``provider.shared=value`` (its ``shared_gather_p_loss``) or ``provider.loss=value`` (its
``gather_p_loss``), comma-separated. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from pydantic import Field

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _real import DATA, FILES, load_real  # noqa: E402

from engine.app.bench import PolicySpec  # noqa: E402
from engine.app.bench_seeds import run_seeds, seeds_markdown  # noqa: E402
from policies.smart import Smart, SmartParams  # noqa: E402

_FIELDS = {"shared": "shared_gather_p_loss", "loss": "gather_p_loss"}


class ByProviderParams(SmartParams):
    by_provider: dict[str, dict[str, float]] = Field(default_factory=dict, description=(
        "per provider name, smart's parameters to use in its gather budget instead of the shared ones"))


class ByProvider(Smart):
    """Smart whose gather budget reads the losses of the group's provider (``by_provider``)."""

    name = "smart-gather-by-provider"
    Params = ByProviderParams

    def __init__(self, catalog, params=None):
        super().__init__(catalog, params)
        self._own = {name: self.params.model_copy(update=over) for name, over in self.params.by_provider.items()}

    def _gather_budget(self, group, c):
        own = self._own.get(group.provider.name)
        if own is None:
            return super()._gather_budget(group, c)
        base, self.params = self.params, own  # the budget reads only the losses it overrides
        try:
            return super()._gather_budget(group, c)
        finally:
            self.params = base


def variant(text: str) -> PolicySpec:
    by: dict[str, dict[str, float]] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        provider, dot, field = key.strip().partition(".")
        if not sep or not dot or field not in _FIELDS:
            raise SystemExit(f"--variant {text!r}: expected provider.shared=value or provider.loss=value")
        by.setdefault(provider, {})[_FIELDS[field]] = float(value)
    return PolicySpec(name=text, policy=f"{Path(__file__).stem}:ByProvider", params={"by_provider": by})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace", choices=sorted(FILES))
    ap.add_argument("--seeds", type=int, default=12)
    ap.add_argument("--first", type=int, default=0, help="the first seed")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--variant", action="append", default=[], help="per-provider losses (repeatable)")
    ap.add_argument("--data", type=Path, default=DATA)
    a = ap.parse_args()
    specs = [PolicySpec(name="smart", policy="smart"), *map(variant, a.variant)]
    t0 = time.perf_counter()
    doc = run_seeds(load_real(a.trace, a.data), specs, list(range(a.first, a.first + a.seeds)), trace_name=a.trace,
                    jobs=a.jobs)
    print(seeds_markdown(doc))
    print(f"wall {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
