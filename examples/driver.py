"""Submit a synthetic trace to the live engine (embedded local Ray) and print the report."""
from engine import Engine
from engine.core.tracegen import synth

requests = synth(2000, seed=1, duration_s=600)
with Engine.start(policy="smart", speedup=200) as engine:   # the engine clock runs 200x faster than real time
    futures = engine.replay(requests)                        # submits each request at its arrival time
    results = [f.result() for f in futures]
    print(engine.report())
print(sum(r.cost_usd for r in results), "USD for", len(results), "requests")
