"""The ``context`` guard's evidence: how a shared document lifts the cosine of two different asks, and how many
such pairs every guard lets through. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/bench_context_guard.py

1. the near-duplicate cosine of two asks ("List the risks ..." / "List the opportunities ...", "Write a short
   poem ..." / "Write a long essay ...") followed by the first N characters of one report;
2. a sweep: 9 different asks, every pair, over 0-780 characters of the report (step 20): the pairs above the
   text threshold, and those no guard refuses (each would be served for the other);
3. what the guard alone refuses on the real pairs (``../shared/data/real/``, when present).
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _real import DATA  # noqa: E402

from engine.core.features import near_min_threshold, near_vectors_texts  # noqa: E402
from engine.core.similarity import CONTEXT_RATIO, CONTEXT_WORDS, GUARDS, Guards, guard_reason  # noqa: E402

REPORT = ("The quarterly report covers revenue, costs and hiring across the European and Asian offices. "
          "Revenue rose in every region except the north, where a warehouse fire closed two sites. "
          "The board approved a new pricing model and asked the team to review supplier contracts. ") * 12
ASKS = ["Critique the report below.", "Rewrite the report below for children.", "List the risks in the report below.",
        "List the opportunities in the report below.", "Write a short poem about the report below.",
        "Write a long essay about the report below.", "Translate the report below into plain English.",
        "Give a title to the report below.", "Find the spelling mistakes in the report below."]


def cosine(a: str, b: str) -> float:
    va, vb = near_vectors_texts([a, b])
    return float(va @ vb)


def main() -> None:
    th = near_min_threshold("text")
    print(f"context guard: >= {CONTEXT_WORDS} shared content words and >= {CONTEXT_RATIO}x the differing part; "
          f"text threshold {th}\n")
    print("| shared report | risks / opportunities | short poem / long essay |")
    print("|---:|---:|---:|")
    for n in (0, 100, 200, 1000, 3000):
        row = [cosine(f"{a}\n{REPORT[:n]}", f"{b}\n{REPORT[:n]}") for a, b in
               ((ASKS[2], ASKS[3]), (ASKS[4], ASKS[5]))]
        print(f"| {n:,} characters | {row[0]:.3f} | {row[1]:.3f} |")
    above, served = 0, []
    for n in range(0, 800, 20):
        for a, b in itertools.combinations(ASKS, 2):
            x, y = f"{a}\n{REPORT[:n]}", f"{b}\n{REPORT[:n]}"
            c = cosine(x, y)
            if c >= th:
                above += 1
                if guard_reason(x, y) is None:
                    served.append((c, n, a, b))
    print(f"\nsweep: {above:,} pairs of different asks score >= {th}; no guard refuses {len(served)}:")
    for c, n, a, b in served:
        print(f"  {c:.3f} at {n} characters: {a!r} / {b!r}")
    if not DATA.exists():
        print(f"\n{DATA} not found: the real pairs are skipped")
        return
    from engine.core._pair_eval import load_pairs

    others = Guards.of([g for g in GUARDS if g != "context"])
    for name, rows in load_pairs(DATA).items():
        alone = sum(guard_reason(r["origin"], r["similar"], others) is None
                    and guard_reason(r["origin"], r["similar"]) is not None for r in rows)
        print(f"{name}: the context guard alone refuses {alone} of {len(rows):,} pairs (all labelled duplicates)")


if __name__ == "__main__":
    main()
