"""Near duplicates of chat requests: the last user message is compared, and everything else in the body (system
prompt, earlier turns, tools, sampling settings) must be equal. The same rule in the simulator and in the cache
actor (``engine.core.features.near_text`` / ``near_class``)."""

from __future__ import annotations

import asyncio

import pytest

from actors import ResultCache, ResultHub
from actors._types import Job
from engine.core.catalog import Catalog, default_catalog
from engine.core.clock import ManualClock
from engine.core.features import fingerprint, near_context, near_text
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings
from engine.sim.simulator import simulate
from policies import load_policy

CAT = default_catalog()
SYSTEM = ("You are the support assistant of a pest-control company. Answer in three short paragraphs, cite the "
          "product sheet where it applies, never recommend a product we do not sell, and keep a friendly tone. ") * 8
HISTORY = [{"role": "user", "content": "Hello, I found insects in my kitchen last night."},
           {"role": "assistant", "content": "I am sorry to hear that. Can you describe them?"}]
ASK = "How can I get rid of big flying cockroaches?"
PARAPHRASE = "How can I get rid of huge flying cockroaches?"  # a QQP duplicate pair, cosine 0.955


def chat(i: int, question: str, *, system: str = SYSTEM, arrival: float = 0.0, **body) -> Request:
    body = {"system": system, "messages": [*HISTORY, {"role": "user", "content": question}], **body}
    return Request.model_validate({"id": f"c{i}", "arrival_s": arrival, "model": "claude-haiku-4-5", "body": body,
                                   "reuse": "near", "priority": "urgent", "deadline_s": 300.0})


# Each second request against the first (ASK over the shared conversation): whether it may reuse it.
CASES = {
    "paraphrased question, same conversation": (dict(question=PARAPHRASE), True),
    "same question, another system prompt": (dict(question=ASK, system=SYSTEM.replace("friendly", "formal")), False),
    "same question, another temperature": (dict(question=ASK, temperature=1.0), False),
    "same question, a JSON answer asked": (dict(question=ASK, output_config={"format": {
        "type": "json_schema", "schema": {"type": "object"}}}), False),
    "another question, same conversation": (dict(question="How can I get rid of big flying moths?"), False),
}


def parts(r: Request) -> tuple[str, str | None]:
    return near_text(r), near_context(r)


def test_near_text_is_the_last_user_message_and_the_rest_is_context():
    text, ctx = parts(chat(0, ASK))
    assert text == ASK and ctx is not None
    assert near_context(chat(1, PARAPHRASE)) == ctx  # the same conversation
    assert near_context(chat(2, ASK, temperature=1.0)) != ctx
    with_image = [{"type": "text", "text": ASK}, {"type": "image", "source": {"type": "url", "url": "https://x/1.png"}}]
    other_image = [with_image[0], {"type": "image", "source": {"type": "url", "url": "https://x/2.png"}}]
    a, b = parts(chat(3, with_image)), parts(chat(4, other_image))
    assert a[0] == b[0] == ASK and a[1] != b[1]  # the images are context: they must be equal
    prefill = chat(5, ASK).body | {"messages": [*HISTORY, {"role": "user", "content": ASK},
                                                 {"role": "assistant", "content": "Sure:"}]}
    r = chat(5, ASK).model_copy(update={"body": prefill})
    text, ctx = parts(r)  # not ending with the user's turn: the whole prompt, the body's shape its context
    assert text == r.prompt and ctx is not None and ctx != near_context(chat(6, ASK))
    plain = Request.model_validate({"id": "p", "arrival_s": 0, "model": "gpt-5-mini", "prompt": ASK})
    assert parts(plain) == (ASK, None)


def no_failures(provider: str) -> Catalog:
    raw = CAT.model_dump()
    raw["providers"][provider]["failure_rate"] = 0.0
    return Catalog.model_validate(raw)


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_simulator_reuses_a_chat_request_only_within_its_conversation(case):
    kw, reused = CASES[case]
    cat = no_failures("anthropic")
    reqs = [chat(0, ASK), chat(1, arrival=1000.0, **kw)]  # the first is long done when the second arrives
    res = simulate(reqs, load_policy("smart", cat), catalog=cat)
    assert res.met.all()
    assert (res.hit[1] == 3) == reused, case  # 3: a near hit
    assert (res.cost[1] == 0.0) == reused


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_cache_reuses_a_chat_request_only_within_its_conversation(tmp_path, case):
    kw, reused = CASES[case]
    reuse = load_policy("smart", CAT).reuse

    async def go():
        hub = ResultHub()
        settings = Settings().model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")})
        cache = ResultCache(reuse, hub, ManualClock(1000.0), settings=settings)
        first = Job(0, chat(0, ASK), fingerprint(chat(0, ASK)))
        assert await cache.lookup([first]) == [0]
        await cache.complete([(first.fp, Result(id="c0", tenant="default", status="ok", output="Use traps.",
                                                cost_usd=0.01, mode="sync", provider=first.req.provider,
                                                model=first.req.model, done_s=5.0))])
        await hub.pull(0.01)
        second = chat(1, arrival=1000.0, **kw)
        misses = await cache.lookup([Job(1, second, fingerprint(second))])
        got = await hub.pull(0.01)
        return misses, got

    misses, got = asyncio.run(go())
    if reused:
        assert misses == [] and got[0].hit == "near" and got[0].output == "Use traps."
    else:
        assert misses == [0] and got == []
