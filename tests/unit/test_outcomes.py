"""The kernel's outcome and reservation rules, stated directly (``engine.runtime.outcomes``,
``engine.runtime.reservation``): what an ended attempt becomes, how a lone call is billed, what each kind of
``Result`` carries, and what a batch member reserves. Mutation testing found these reached only through
whole runs, where an extra attempt or a wrong field went unnoticed."""

from __future__ import annotations

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import reserve_bound
from engine.core.provider_api import CallOutcome, Usage
from engine.core.request import Request
from engine.runtime.admission import InFlight
from engine.runtime.outcomes import (
    call_mode,
    failed_result,
    ok_result,
    refused_result,
    reused_result,
    verdict,
)
from engine.runtime.reservation import claim_amount
from policies import load_policy

CAT = default_catalog()
REQ = Request.model_validate({"id": "r1", "tenant": "acme", "arrival_s": 10.0, "model": "gpt-5-mini",
                              "prompt": "hello", "deadline_s": 60.0})


@pytest.mark.parametrize("max_attempts", [1, 2, 3, 5])
def test_a_request_is_tried_at_most_max_attempts_times(max_attempts):
    # The k-th failed attempt is retried while k < max_attempts; the max_attempts-th fails the request.
    assert [verdict(False, k, max_attempts) for k in range(1, max_attempts + 1)] == \
        ["retry"] * (max_attempts - 1) + ["fail"]
    assert verdict(True, max_attempts, max_attempts) == "complete"  # a success always completes
    assert verdict(False, 1, max_attempts, retryable=False) == "fail"  # a bad request is never retried


def test_a_lone_call_is_billed_as_a_gpu_batch_of_one_on_a_gpu_priced_model():
    assert call_mode(CAT.model("modal-h100", "flux-1-dev")) == "gpu_batch"
    assert call_mode(CAT.model("openai", "gpt-5-mini")) == "sync"


def test_a_simulated_ok_result_names_its_request_and_call():
    res = ok_result(REQ, at=70.0, cost=0.25, mode="batch_api", batch_id="b7", recommendation="consider_batch",
                    reason="why")
    assert (res.id, res.tenant, res.status, res.cost_usd, res.mode, res.provider, res.model, res.batch_id) == \
        ("r1", "acme", "ok", 0.25, "batch_api", "openai", "gpt-5-mini", "b7")
    assert (res.arrival_s, res.done_s, res.deadline_met, res.recommendation, res.reason) == \
        (10.0, 70.0, True, "consider_batch", "why")
    assert res.output == "sim://openai/gpt-5-mini/r1" and not res.real
    assert res.usage is None and res.provider_request_id is None and res.raw is None
    assert ok_result(REQ, at=70.5, cost=0.25, mode="sync", batch_id=None, recommendation=None,
                     reason="").deadline_met is False  # due at 70


def test_a_real_ok_result_carries_the_providers_answer():
    out = CallOutcome(True, 20.0, 0.1, output="hi", usage=Usage(12, 3, cache_read=4), provider_request_id="req_9",
                      raw={"id": "req_9"}, real=True)
    res = ok_result(REQ, at=20.0, cost=0.1, mode="sync", batch_id=None, recommendation=None, reason="", out=out)
    assert (res.output, res.usage, res.provider_request_id, res.raw, res.real) == \
        ("hi", {"input_tokens": 12, "output_tokens": 3, "cache_read": 4, "cache_write": 0}, "req_9",
         {"id": "req_9"}, True)
    unreal = ok_result(REQ, at=20.0, cost=0.1, mode="sync", batch_id=None, recommendation=None, reason="",
                       out=out._replace(real=False, usage=None))
    assert unreal.real is False and unreal.usage is None


def test_a_failed_result_names_the_provider_and_the_attempts():
    res = failed_result(REQ, at=30.0, batch_id="b1", recommendation="sync", tries=3, max_attempts=3,
                        error="HTTP 500")
    assert (res.id, res.tenant, res.status, res.provider, res.model, res.batch_id) == \
        ("r1", "acme", "failed", "openai", "gpt-5-mini", "b1")
    assert (res.arrival_s, res.done_s, res.deadline_met, res.recommendation, res.real) == \
        (10.0, 30.0, False, "sync", False)
    assert res.error == "openai failed after 3 attempt(s): HTTP 500"
    quiet = failed_result(REQ, at=30.0, batch_id=None, recommendation=None, tries=3, max_attempts=4, error=None,
                          real=True)
    assert quiet.error == "openai failed 4 attempts" and quiet.real is True


def test_a_refused_result_is_never_billed_and_says_why():
    res = refused_result(REQ, at=12.0, status="rejected", error="budget_exhausted", reason="budget global full")
    assert (res.id, res.tenant, res.status, res.provider, res.model, res.arrival_s, res.done_s) == \
        ("r1", "acme", "rejected", "openai", "gpt-5-mini", 10.0, 12.0)
    assert (res.deadline_met, res.error, res.reason, res.cost_usd) == (False, "budget_exhausted",
                                                                       "budget global full", 0.0)
    assert refused_result(REQ, at=12.0, status="failed", error="e").reason == ""


def test_a_reused_result_is_free_and_names_its_source():
    res = reused_result(REQ, at=15.0, hit="near", source_id="r0", output="out", similarity=0.9412)
    assert (res.id, res.tenant, res.status, res.output, res.cost_usd, res.mode, res.hit) == \
        ("r1", "acme", "reused", "out", 0.0, "reuse", "near")
    assert (res.provider, res.model, res.arrival_s, res.done_s, res.deadline_met) == \
        ("openai", "gpt-5-mini", 10.0, 15.0, True)
    assert res.reason == "reused near result of r0 (cosine 0.941)"
    assert reused_result(REQ, at=71.0, hit="exact", source_id="r0", output=None).reason == \
        "reused exact result of r0"
    assert reused_result(REQ, at=71.0, hit="exact", source_id="r0", output=None).deadline_met is False


def test_an_urgent_batch_member_reserves_exactly_the_sync_bound():
    urgent = REQ.model_copy(update={"priority": "urgent", "input_tokens": 1000, "output_tokens": 100})
    assert claim_amount(urgent, CAT, "batch_api", False) == reserve_bound(urgent, CAT, "sync", 100)
    normal = urgent.model_copy(update={"priority": "normal"})
    assert claim_amount(normal, CAT, "batch_api", False) == reserve_bound(normal, CAT, "batch_api", 100)
    with pytest.raises(ValueError, match="unknown mode 'SYNC'"):
        reserve_bound(normal, CAT, "SYNC")


def test_an_orphaned_fingerprint_is_free_to_lead_again():
    t: InFlight[int] = InFlight(load_policy("smart", CAT).reuse)
    assert t.orphans("nobody", REQ.uid) == []
    t.lead("fp", REQ, 0)
    t.follow("fp", REQ.model_copy(update={"deadline_s": 90.0}), 1)
    assert t.orphans("fp", REQ.uid) == [(1, "in_flight")]
    assert t.leader("fp") is None and t.lead("fp", REQ, 2) and t.orphans("fp", "other") == []
