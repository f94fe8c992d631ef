"""An answer reused from the cache reports the usage of the call that made it, read with the official SDK through the
endpoint over the real cache class (no Ray): it reported 0 tokens, so a client that counts tokens (or prices them
from ``usage``) read a reused answer as empty (a helper's tour). That it cost nothing is in the headers."""

from __future__ import annotations

import asyncio

import openai

from actors import ResultCache, ResultHub
from actors._types import Job
from engine.app import endpoint
from engine.app.endpoint import make_app
from engine.core.clock import ManualClock
from engine.core.cost import price_usage
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request, validation_context
from engine.core.result import Result
from engine.core.settings import CacheSettings, default_settings
from tests.unit.test_endpoint import CAT, serving

ASK = [{"role": "user", "content": "Which river is longest?"}]
USAGE = {"input_tokens": 11, "output_tokens": 2}


class CachedEngine:
    """The engine's asyncio face over a real ``ResultCache`` and ``ResultHub``: a miss is generated at once
    (``USAGE``, billed at the sync price), a hit is answered by the cache."""

    def __init__(self, tmp_path):
        self.settings, self.gone = default_settings(), None
        self._ctx = validation_context(CAT, self.settings)
        self.hub = ResultHub()
        cfg = self.settings.model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
        self.cache = ResultCache(ReuseSettings(exact=True, in_flight=True, near=False), self.hub,
                                 ManualClock(5.0), settings=cfg)
        self.seq = 0

    async def asubmit(self, d: dict) -> Result:
        return (await self.asubmit_many([d]))[0]

    async def asubmit_many(self, ds: list[dict]) -> list[Result]:
        """One cache lookup of them all, in order, as the engine's ingest sends what arrived at one instant."""
        jobs = []
        for d in ds:
            req = Request.model_validate({**d, "arrival_s": 0.0}, context=self._ctx)
            self.seq += 1
            jobs.append(Job(self.seq, req, fingerprint(req)))
        got = {}
        for k in await self.cache.lookup(jobs):  # the misses: generated (the dispatcher gives their results)
            req = jobs[k].req
            usd = price_usage(req, CAT, "sync", **USAGE).total
            got[req.id] = Result(id=req.id, tenant=req.tenant, status="ok", output=f"The Nile ({req.id}).",
                                 usage=USAGE, cost_usd=usd, mode="sync", provider=req.provider, model=req.model,
                                 done_s=1.0, finish="stop")
            await self.cache.complete([(jobs[k].fp, got[req.id])])
        if len(got) < len(jobs):
            got.update({r.id: r for r in await self.hub.pull(0.01)})
        return [got[j.req.id] for j in jobs]


def test_a_reused_answer_reports_the_usage_of_the_call_that_made_it_and_its_headers_say_it_cost_nothing(tmp_path):
    eng = CachedEngine(tmp_path)
    with serving(make_app(eng, catalog=CAT)) as url, \
            openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=10) as client:
        first = client.chat.completions.with_raw_response.create(model="gpt-5-mini", messages=ASK)
        again = client.chat.completions.with_raw_response.create(model="gpt-5-mini", messages=ASK)
        assert first.headers[endpoint.HEADER_MODE] == "sync" and float(first.headers[endpoint.HEADER_COST]) > 0
        assert again.headers[endpoint.HEADER_MODE] == "reuse" and again.headers[endpoint.HEADER_HIT] == "exact"
        assert float(again.headers[endpoint.HEADER_COST]) == 0.0
        assert float(again.headers[endpoint.HEADER_SAVING]) > 0  # its list price, all saved
        used, reused = first.parse().usage, again.parse().usage
        assert (reused.prompt_tokens, reused.completion_tokens, reused.total_tokens) == (11, 2, 13)
        assert (used.prompt_tokens, used.completion_tokens) == (reused.prompt_tokens, reused.completion_tokens)
        answer = client.responses.create(model="gpt-5-mini", input="Which river is longest?")  # another key
        assert answer.usage.output_tokens == 2
        copy = client.responses.create(model="gpt-5-mini", input="Which river is longest?")
        assert copy.output_text == answer.output_text and copy.usage.input_tokens == 11 and copy.usage.output_tokens == 2


def test_a_follower_in_flight_gets_its_leaders_usage(tmp_path):
    async def go():
        eng = CachedEngine(tmp_path)
        reqs = [Request.model_validate({"id": f"f{k}", "arrival_s": 0.0, "model": "gpt-5-mini", "messages": ASK},
                                       context=eng._ctx) for k in range(2)]
        jobs = [Job(k, r, fingerprint(r)) for k, r in enumerate(reqs)]
        assert await eng.cache.lookup(jobs) == [0]  # one leads, the other follows it
        await eng.cache.complete([(jobs[0].fp, Result(id="f0", status="ok", output="x", usage=USAGE, cost_usd=1.0,
                                                      mode="sync", provider="openai", model="gpt-5-mini"))])
        follower = next(r for r in await eng.hub.pull(0.01) if r.id == "f1")
        assert follower.hit == "in_flight" and follower.usage == USAGE and follower.cost_usd == 0.0
    asyncio.run(go())
