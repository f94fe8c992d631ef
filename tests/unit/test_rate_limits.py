"""A provider's 429s, told apart: a rate limit is waited out as the provider asks, while the request's deadline
leaves room, without spending its tries; a billing refusal (no credit, a spend limit) fails at once, naming the fix,
and holds the provider's other requests until a call succeeds again. Against the loopback emulator (as
``test_http_providers``), plus the pure rules."""

from __future__ import annotations

import asyncio

import pytest

from actors._sync_calls import QuotaStop
from actors.providers._wire import billing_refusal
from engine.core.errors import ProviderError
from engine.core.provider_api import CallJob, call_key
from engine.core.settings import SimSettings
from engine.runtime.outcomes import throttled_verdict, throttled_wait
from tests.unit.test_http_providers import PROVIDERS, ROUTE, Rig, direct, emu, jobs_of, one_call, req  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

# How each provider says the account cannot pay (the emulator's opt-in faults).
NO_CREDIT = {"openai": {"status": 429, "code": "insufficient_quota", "type": "insufficient_quota"},
             "anthropic": {"status": 400, "type": "invalid_request_error",
                           "message": "Your credit balance is too low to access the API; purchase credits."}}


@pytest.mark.parametrize(("status", "body", "said"), [
    (429, {"code": "insufficient_quota", "type": "insufficient_quota"}, "insufficient_quota"),
    (429, {"code": "project_spend_limit_exceeded", "type": "insufficient_quota"}, "project_spend_limit_exceeded"),
    (429, {"code": None, "type": "insufficient_quota"}, "insufficient_quota"),
    (429, {"code": "rate_limit_exceeded", "type": "requests"}, None),
    (429, {"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limited"}}, None),
    (402, {"type": "error", "error": {"type": "billing_error", "message": "Payment failed"}}, "billing_error"),
    (400, {"type": "error", "error": {"type": "invalid_request_error",
                                      "message": "Your credit balance is too low to access the Anthropic API. "
                                                 "Please go to Plans & Billing to upgrade or purchase credits."}},
     "invalid_request_error"),
    (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: too large"}}, None),
    (500, {"code": "insufficient_quota"}, None),
])
def test_a_billing_refusal_is_told_from_a_rate_limit_by_the_providers_words(status, body, said):
    assert billing_refusal(status, body) == said


def test_a_rate_limit_waits_as_asked_never_less_than_a_growing_backoff():
    assert throttled_wait(30.0, 0, 1.0, 60.0) == 30.0  # as the provider asks
    assert [throttled_wait(0.0, k, 1.0, 60.0) for k in (0, 1, 2, 6, 9)] == [1.0, 2.0, 4.0, 60.0, 60.0]
    assert throttled_wait(None, 3, 1.0, 60.0) == 8.0


def test_a_rate_limit_is_tried_again_while_the_deadline_leaves_room_for_the_call():
    assert throttled_verdict(100.0, 5.0, 200.0, 10) == ("retry", None)
    v, why = throttled_verdict(196.0, 5.0, 200.0, 10)
    assert v == "fail" and "deadline" in why
    v, why = throttled_verdict(100.0, 5.0, 1e9, 49, cap=50)
    assert v == "fail" and "50 rate-limited tries" in why


def test_the_quota_stop_holds_others_lets_one_probe_through_and_a_later_success_lifts_it():
    q = QuotaStop(probe_s=60.0)
    assert q.refuses(0.0, "a") is None and not q.lift(0.0)
    q.trip(10.0, "openai HTTP 429 insufficient_quota: ...")
    assert "insufficient_quota" in q.refuses(11.0, "b") and q.refused == 1
    assert not q.lift(5.0)  # a call sent before the refusal lifts nothing
    assert q.refuses(70.0, "p") is None  # the probe
    assert q.refuses(71.0, "c") is not None  # only one
    assert q.refuses(72.0, "p") is None  # its retry (a 429, a 5xx) is the probe still, until it ends
    q.ended("p")
    assert q.refuses(73.0, "p") is not None
    assert q.lift(70.0) and q.refuses(72.0, "c") is None


def test_a_probes_rate_limit_is_waited_out_and_sent_again_not_failed_for_billing(emu):  # noqa: F811
    """The probe after a billing refusal meets a rate limit's 429: its retry, within the probe interval, was
    failed unsent with the billing message, though the account had been topped up (a review)."""
    emu.faults.script("openai", ROUTE["openai"], [NO_CREDIT["openai"], {"status": 429, "retry_after_s": 0.2}])

    async def go():
        rig = Rig(emu, "openai")
        try:
            first, probe = jobs_of("openai", 2)
            await rig.run("sync", [first])
            await rig.until(lambda: rig.results.get(first.req.id), "the refusal")
            rig.d._quota.next_probe = 0.0  # time for a probe
            await rig.run("sync", [probe])
            r = await rig.until(lambda: rig.results.get(probe.req.id), "the probe")
            assert r.status == "ok" and emu.count(ROUTE["openai"]) == 3, r
            assert (await rig.d.stats())["quota_unsent"] == 0
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_billing_refusal_is_unretryable_unbilled_and_names_the_fix(emu, provider):  # noqa: F811
    emu.faults.script(provider, ROUTE[provider], [NO_CREDIT[provider]])

    out = one_call(emu, provider)
    assert not out.ok and out.quota and not out.retryable and not out.rate_limited and not out.maybe_billed
    assert out.retry_after_s is None and out.cost == 0.0
    assert "add credit" in out.error and "not retried" in out.error, out.error
    assert emu.bill().items == ()


@PROVIDERS
def test_a_rate_limit_is_told_as_one(emu, provider):  # noqa: F811
    emu.faults.script(provider, ROUTE[provider], [{"status": 429, "retry_after_s": 3.0}])

    out = one_call(emu, provider)
    assert out.rate_limited and out.retryable and not out.quota and out.retry_after_s == 3.0


def test_a_batch_create_refused_for_billing_is_not_made_again(emu):  # noqa: F811
    emu.faults.script("openai", "batches.create", [NO_CREDIT["openai"]])

    async def go():
        p = direct(emu, "openai")
        jobs = [CallJob(call_key(r.tenant, r.id, r.model, 0), r, 0.0, 0, 0) for r in (req(0), req(1))]
        try:
            with pytest.raises(ProviderError) as err:
                await p.submit_batch(jobs, None, "ref-1")
        finally:
            await p.close()
        # A rate limit's refusal carries its wait, and the create is made again after it; this one carries none.
        assert err.value.retry_after_s is None and "add credit" in err.value.quota
    asyncio.run(go())


CREATE = {"openai": "batches.create", "anthropic": "messages.batches.create"}


@PROVIDERS
def test_a_batch_create_refused_for_billing_fails_its_members_naming_the_fix_and_holds_the_providers_creates(
        emu, provider):  # noqa: F811
    """A batch create refused for billing: its members fail at once, billed nothing, naming the fix, and are not
    handed back to the policy (batched again, each create refused alike until the progress guard sent them sync).
    The provider's other batch creates are held as its sync calls are, failed unsent, but for the probe: a
    create after the account was topped up is made, and its success lifts the hold."""
    emu.faults.script(provider, CREATE[provider], [NO_CREDIT[provider]])
    jobs = jobs_of(provider, 13, claims=True)
    refused, held, call, probe, after = jobs[:4], jobs[4:8], jobs[8], jobs[9:12], jobs[12]

    async def go():
        rig = Rig(emu, provider)
        rig.d._quota.probe_s = 1e9  # no probe but the one the test lets through
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", refused, bid="b1")
            await rig.resolved(refused)
            assert rig.grouper.readmitted() == []  # not handed back, to be batched (and refused) again
            for j in refused:
                r = rig.results[j.req.id]
                assert r.status == "failed" and "add credit" in r.error and r.cost_usd == 0.0, r
            await rig.run("batch_api", held, bid="b2")
            await rig.run("sync", [call])
            await rig.resolved([*held, call])
            assert rig.grouper.readmitted() == []
            for j in [*held, call]:
                r = rig.results[j.req.id]
                assert r.status == "failed" and "not sent" in r.error and "add credit" in r.error, r
            assert emu.count(CREATE[provider]) == 1 and emu.count(ROUTE[provider]) == 0
            assert (await rig.d.stats())["quota_unsent"] == 5
            rig.d._quota.next_probe = 0.0  # time for a probe: the account was topped up meanwhile
            await rig.run("batch_api", probe, bid="b3")
            await rig.until(lambda: all(j.req.id in rig.results for j in probe), "the probe's answers", 20.0)
            assert all(rig.results[j.req.id].status == "ok" for j in probe)
            await rig.run("sync", [after])
            assert (await rig.until(lambda: rig.results.get(after.req.id), "the next call")).status == "ok"
            billed = {i.custom_id or i.request_id for i in emu.bill().items}
            assert len(billed) == 4 and emu.count(CREATE[provider]) == 2
            await rig.settled_to(emu.bill().total_usd)
        finally:
            await rig.close()
    asyncio.run(go())


def test_rate_limits_beyond_max_attempts_are_waited_out_and_the_request_succeeds(emu):  # noqa: F811
    """Six 429s, each honoured: they are not tries, so a request of 4 tries is answered on the seventh call."""
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 5.0}] * 6)

    async def go():
        rig = Rig(emu, sim=SimSettings(max_attempts=4))
        try:
            (j,) = jobs_of("openai", 1)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok" and r.real, r
            assert len(rig.calls) == 7 and [c.attempt for c, _, _ in rig.calls] == [0] * 7
            assert len(emu.bill().items) == 1
        finally:
            await rig.close()
    asyncio.run(go())


@PROVIDERS
def test_a_billing_refusal_holds_the_providers_other_requests_until_a_call_succeeds(emu, provider):  # noqa: F811
    emu.faults.script(provider, ROUTE[provider], [NO_CREDIT[provider]])

    async def go():
        rig = Rig(emu, provider)
        rig.d._quota.probe_s = 1e9  # no probe but the one the test lets through
        try:
            first, *held = jobs_of(provider, 3)
            await rig.run("sync", [first])
            r = await rig.until(lambda: rig.results.get(first.req.id), "the refusal")
            assert r.status == "failed" and "add credit" in r.error and len(rig.calls) == 1, r
            # No rate limit: the 429s metric counts none (its help says "Rate-limit answers"; a billing 429 was one).
            assert not rig.hub.metrics.registry.get_sample_value("smartbatch_http_429_responses_total",
                                                                  {"provider": provider})
            await rig.run("sync", held)
            await rig.resolved(held)
            assert all("not sent" in rig.results[j.req.id].error for j in held)
            assert emu.count(ROUTE[provider]) == 1 and (await rig.d.stats())["quota_unsent"] == 2
            rig.d._quota.next_probe = 0.0  # time for a probe: the account was topped up meanwhile
            probe, after = jobs_of(provider, 5)[3:]
            await rig.run("sync", [probe])
            await rig.until(lambda: rig.results.get(probe.req.id), "the probe")
            await rig.run("sync", [after])
            await rig.until(lambda: rig.results.get(after.req.id), "the next request")
            assert rig.results[probe.req.id].status == "ok" and rig.results[after.req.id].status == "ok"
            assert len(emu.bill().items) == 2
        finally:
            await rig.close()
    asyncio.run(go())


def test_a_rate_limit_past_the_deadlines_room_is_a_try_as_before_not_a_failure_at_once(emu):  # noqa: F811
    """A request whose deadline leaves no room for the provider's wait (a 60 s window, a 30 s deadline; a sync
    fallback after its hedge) still has its tries: failed at the first 429 where before the 429s were honoured up
    to ``max_attempts`` and it was answered, late. Its 429s then count as tries, throttled ones included."""
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": 60.0}])

    async def go():
        rig = Rig(emu, sim=SimSettings(max_attempts=4))
        try:
            (j,) = jobs_of("openai", 1, deadline_s=30.0)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "ok" and len(rig.calls) == 2, r
            assert rig.calls[1][1] - rig.calls[0][1] >= 60.0  # the provider's wait honoured
            assert len(emu.bill().items) == 1
        finally:
            await rig.close()
    asyncio.run(go())


def test_rate_limits_past_the_deadlines_room_are_tries_and_end_the_request_after_max_attempts(emu):  # noqa: F811
    # Engine seconds (0.5 s real). The deadline leaves room for two waits and not three: a late call only moves a
    # try later, so the deadline sits just short of the third (which no delay can bring inside it) and a loaded
    # machine's slower calls have most of a wait before the second try is pushed out of the room.
    wait_s = 500.0
    emu.faults.script("openai", "chat.completions", [{"status": 429, "retry_after_s": wait_s}] * 10)

    async def go():
        rig = Rig(emu, sim=SimSettings(max_attempts=4))
        try:
            (j,) = jobs_of("openai", 1, deadline_s=2.9 * wait_s)
            await rig.run("sync", [j])
            r = await rig.until(lambda: rig.results.get(j.req.id), "the result")
            assert r.status == "failed" and r.cost_usd == 0.0, r
            # Two waited out free, then four tries, each after the provider's wait.
            assert [c.attempt for c, _, _ in rig.calls] == [0, 0, 0, 1, 2, 3]
            assert all(b[1] - a[1] >= wait_s for a, b in zip(rig.calls, rig.calls[1:]))
            assert "after 4 attempt(s)" in r.error and "2 rate limit(s) waited out" in r.error, r.error
            assert "deadline" in r.error and emu.bill().items == ()
        finally:
            await rig.close()
    asyncio.run(go())
