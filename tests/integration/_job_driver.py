"""A bulk job as a user's driver script writes one, for ``test_driver_crash.py``: N requests, a few urgent ones
answered at once, the rest riding provider batches; prints one JSON line per result, then the engine's
``taken_back`` figures. ``sys.argv[1]``: N; ``sys.argv[2]``: text that replaces request r0's prompt ("" keeps it)."""

import json
import sys

from engine import Engine
from tests.integration._catalogs import OPENAI_ONLY

URGENT = 4
# Below the room a flex call needs (``engine.core.latency.flex_room``: 33 s for these calls in the default catalog),
# so the urgent calls go standard whatever the machine's pace. Where 60 s allowed the flex tier (a decision within
# 27 ms of the submit, at 1000x: the faster without a cache actor), the flex call's timeout was the 50 ms floor of
# real time, which a loaded machine's call outlasts: given up, billed all the same at the emulator, and answered
# standard, one request paid twice by the killed run (the tier's documented trade, docs/reliability.md), not by the
# resume this test checks.
URGENT_DEADLINE_S = 20.0


def requests(n: int, r0: str) -> list[dict]:
    out = []
    for k in range(n):
        urgent = k >= n - URGENT
        prompt = r0 if k == 0 and r0 else f"Summarise report number {k}. " * 150
        out.append({"id": f"r{k}", "model": ("gpt-5", "gpt-5-mini")[k % 2], "prompt": prompt,
                    "max_output_tokens": 1000, "priority": "urgent" if urgent else "background",
                    "deadline_s": URGENT_DEADLINE_S if urgent else 86400})
    return out


if __name__ == "__main__":
    n, r0 = int(sys.argv[1]), sys.argv[2]
    # OpenAI alone, the one provider the job calls: each run starts four dispatcher processes fewer. No reuse (its
    # prompts are all different, and a run's cache starts empty): no cache actor, a process fewer again.
    with Engine.start(catalog=OPENAI_ONLY, speedup=1000.0,
                      policy_params={"reuse_exact": False, "reuse_in_flight": False, "reuse_near": False}) as eng:
        futs = eng.submit_many(requests(n, r0))
        for f in futs:
            r = f.result()
            print(json.dumps({"id": r.id, "status": r.status, "mode": r.mode, "reason": r.reason,
                              "cost_usd": r.cost_usd}), flush=True)
        print(json.dumps({"taken_back": eng.report().get("taken_back")}), flush=True)
