"""A request that expects no company (``Request.gather`` false: a batch file is read whole) is never held for
requests still to come: its batch goes as soon as it is judged, at the price it would have had after a gather."""

from __future__ import annotations

import json

from engine.core.batchfile import from_openai_batch, read_batch_file
from engine.core.catalog import default_catalog
from engine.core.grouping import Group, LaneRates
from engine.core.request import Request
from engine.sim.simulator import simulate
from policies import load_policy

from .helpers import kind_trace

CAT = default_catalog()


def batch_smart(params: dict | None = None):
    """Smart with the flex tier off: a file's gpt-5-mini lines would otherwise go at once at OpenAI's flex tier,
    and the case here is how its batch lane gathers them."""
    return load_policy("smart", CAT, {"flex": False, **(params or {})})


def _file(tmp_path, n: int = 10, extra: dict | None = None):
    lines = [{"custom_id": f"line{k}", "method": "POST", "url": "/v1/chat/completions", **(extra or {}),
              "body": {"model": "gpt-5-mini", "max_completion_tokens": 256,
                       "messages": [{"role": "user", "content": f"Write a haiku about the number {k}"}]}}
             for k in range(n)]
    path = tmp_path / "input.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_a_batch_file_is_sent_at_once_not_after_a_gather_for_company_that_cannot_come(tmp_path):
    """A ten-line file due in a day waited 20 minutes (the chained-cache cap of the gather) for company,
    though nothing more could come, and only then went to the batch API."""
    reqs = from_openai_batch(_file(tmp_path)).requests
    assert [r.gather for r in reqs] == [False] * 10
    now = simulate(reqs, batch_smart())
    held = simulate([r.model_copy(update={"gather": True}) for r in reqs], batch_smart())
    assert list(now.mode) == list(held.mode) == [1] * 10  # one batch, at the batch price, either way
    closed_s = batch_smart().params.closed_gather_s
    assert len(now.batches) == len(held.batches) == 1
    assert now.batches[0].t <= closed_s < 1200.0 <= held.batches[0].t
    assert now.total_cost == held.total_cost
    # Each batch draws its own turnaround: over seeds, the file is back a gather sooner.
    back = [[simulate(rs, batch_smart(), seed=s).done_at.max() for s in range(8)]
            for rs in (reqs, [r.model_copy(update={"gather": True}) for r in reqs])]
    assert sum(back[0]) / 8 < sum(back[1]) / 8 - 600
    # A lone small line still goes sync, once the rest of its submission would have come.
    lone = simulate(from_openai_batch(_file(tmp_path, n=1)).requests, batch_smart())
    assert lone.mode[0] == 0 and lone.batches[0].t <= closed_s


def test_a_submission_that_reaches_the_policy_in_parts_still_rides_one_batch(tmp_path):
    """The endpoint stamps each line of a file as it is submitted, a few microseconds apart, and a grouper takes
    them in parts: sent at once, each line rode a provider batch of its own (300 creates for a 300-line file, a
    helper's review). They wait ``closed_gather_s`` for the rest of their submission."""
    reqs = [r.model_copy(update={"arrival_s": k * 0.002}) for k, r in
            enumerate(from_openai_batch(_file(tmp_path, n=40)).requests)]
    res = simulate(reqs, batch_smart())
    assert list(res.mode) == [1] * 40 and len(res.batches) == 1
    apart = simulate(reqs, batch_smart({"closed_gather_s": 0.0}))
    assert len(apart.batches) > 1


def test_a_line_may_ask_to_gather_and_a_driver_request_gathers_by_default(tmp_path):
    bf = read_batch_file(_file(tmp_path, n=2, extra={"gather": True}), window_s=86400.0)
    assert [r.gather for r in bf.requests] == [True, True]
    assert Request.model_validate({"id": "q", "arrival_s": 0, "model": "gpt-5-mini", "prompt": "hi",
                                   "deadline_s": 600}).gather is True


def test_a_group_counts_its_members_that_expect_no_company_through_add_and_take():
    reqs = kind_trace("text-batch-api-auto-cache", n=4)
    prov = CAT.provider(reqs[0].provider)
    g = Group(("batch",), prov, prov.models[reqs[0].model])
    g.add(reqs[0])
    g.add(reqs[1].model_copy(update={"gather": False}))
    g.add(reqs[2])
    assert g.closed == 1
    g.take(1)
    assert g.closed == 1
    g.take(1)  # the closed member leaves
    assert g.closed == 0
    g.add(reqs[3].model_copy(update={"gather": False}))
    g.take(0)
    assert g.closed == 0 and len(g) == 0


def test_a_gpu_job_that_expects_no_company_waits_only_for_the_rest_of_its_submission_in_a_busy_lane():
    reqs = [r.model_copy(update={"arrival_s": 10.0, "priority": "normal", "deadline_s": 3600.0})
            for r in kind_trace("gpu-image", n=2)]
    prov = CAT.provider("modal-h100")
    p = load_policy("smart", CAT)
    rates = LaneRates()
    for t in range(10):  # a lane with steady company: open jobs gather
        rates.see(("gpu", ()), float(t))

    def group(gather: bool) -> Group:
        g = Group(("gpu", ()), prov, prov.models["flux-1-dev"], rates=rates)
        for r in reqs:
            g.add(r.model_copy(update={"gather": gather}))
        return g

    held = p.decide(group(True), 10.0)
    assert held.action == "wait" and held.wake_at > 10.0 + p.params.closed_gather_s
    d = p.decide(group(False), 10.0)  # only the rest of its submission
    assert d.action == "wait" and d.wake_at == 10.0 + p.params.closed_gather_s
    d = p.decide(group(False), d.wake_at)
    assert d.action == "dispatch" and d.mode == "gpu_batch"
