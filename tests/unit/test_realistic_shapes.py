"""Requests shaped like real ones: chat bodies with a system prompt, tools and output settings, thousands of
characters long (the synthetic traces carry a one-sentence prompt and no body)."""

import asyncio

import pytest

from actors._types import Job
from engine.core.features import fingerprint, near_context, near_text
from engine.core.request import Request
from tests.unit.test_cache import generated, make_cache

SYSTEM = "You are the support assistant of ACME. Answer from the order history below, politely and briefly. " * 20
TOOLS = [{"type": "function", "function": {"name": "lookup_order", "parameters": {"type": "object", "properties": {}}}}]


def chat(i, ask="My order has not arrived yet, what should I do?", reuse="near", **body):
    r = Request.model_validate({"id": f"c{i}", "arrival_s": 0.0, "model": "gpt-4o-mini", "tenant": "acme",
                                "reuse": reuse, "body": {"messages": [{"role": "system", "content": SYSTEM},
                                                                       {"role": "user", "content": ask}], **body}})
    return Job(i, r, fingerprint(r))


def test_a_near_duplicate_must_share_everything_of_the_body_but_its_text(tmp_path):
    """Same messages, another output contract: the text is equal (cosine 1.0), so without the rest of the body in
    the near class a call with tools was served a plain answer, a JSON ask free text, a 5-token cap a long answer."""
    others = [{"tools": TOOLS}, {"response_format": {"type": "json_object"}}, {"temperature": 1.5},
              {"max_tokens": 5}, {"tool_choice": "none", "tools": TOOLS}]

    async def go():
        hub, cache = make_cache(tmp_path)
        await generated(cache, hub, chat(0), output="Please wait two more days.")
        asks = [chat(10 + k, **body) for k, body in enumerate(others)]
        assert await cache.lookup(asks) == list(range(len(others)))  # every one a miss: generated on its own
        assert cache.cache_stats()["near"] == 0
        # the same body, the ask in another case: still a near duplicate
        assert await cache.lookup([chat(20, ask="my order has not arrived yet, what should I do?")]) == []
        assert cache.cache_stats()["near"] == 1

    asyncio.run(go())


def test_the_roles_of_a_conversation_are_part_of_its_near_class():
    a, b = (Request.model_validate({"id": k, "arrival_s": 0.0, "model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "Translate to French: good morning"},
        {"role": role, "content": "Bonjour"}, {"role": "user", "content": "And good night?"}]})
        for k, role in (("a", "assistant"), ("b", "user")))
    (ta, ca), (tb, cb) = (near_text(a), near_context(a)), (near_text(b), near_context(b))
    assert ta == tb == "And good night?" and ca != cb  # the same question, another conversation: another class
    c = a.model_copy(update={"id": "c"})
    assert (near_text(c), near_context(c)) == (ta, ca)


def test_results_nobody_asks_near_for_are_never_featurised(tmp_path, monkeypatch):
    """A near vector costs ~6 ms per 16 kB of prompt. Made for every generated result whether or not any request
    asked near (the default asks exact), it made the cache 23x busier on 64 kB conversations (14.3 s of CPU per
    2,000 requests against 0.6 s at 1 kB; 0.4 s now). Rows wait unfeaturised until a near ask of their class
    comes; that ask still finds them."""
    import actors._near_index as near_index

    made: list[str] = []
    real = near_index.near_vectors_texts
    monkeypatch.setattr(near_index, "near_vectors_texts", lambda texts, params: made.extend(texts) or real(texts, params))

    async def go():
        hub, cache = make_cache(tmp_path)
        for k, ask in enumerate(("List the risks.", "List the opportunities.", "Write a short poem about it.")):
            await generated(cache, hub, chat(k, ask, reuse="exact"), output=f"answer {k}")
        other = Job(9, Request.model_validate({"id": "o", "arrival_s": 0.0, "model": "claude-haiku-4-5",
                                               "reuse": "near", "prompt": "Hello there"}), "fp-o")
        assert await cache.lookup([other]) == [0]  # a near ask of another class featurises only its own
        assert made == ["Hello there"] and cache.cache_stats()["near_entries"] == 4  # queued, not featurised
        near = chat(20, "List the opportunities")  # no full stop: no exact hit, a near one
        assert await cache.lookup([near]) == []
        assert (await hub.pull(0.01))[0].output == "answer 1"
        assert len(made) == 1 + 3 + 1  # the three queued rows, then the ask

    asyncio.run(go())


def test_tool_definitions_count_in_the_input_estimate_and_the_budget_reserves_for_them():
    """Providers bill a body's tool definitions as input tokens (the emulator counts their canonical JSON). The
    estimate read the messages only: 8 tokens for a call billed 6,668, so a hard budget of $0.01 reserved
    $0.00004 per call and was overrun 3.3x ($0.033 spent, against the emulator over HTTP)."""
    from engine.core.catalog import default_catalog
    from engine.core.cost import price_usage, reserve_bound
    from engine.emulator._text import anthropic_prompt, chat_prompt

    tools = [{"type": "function", "function": {"name": f"tool_{k}", "description": "Looks a thing up. " * 20,
                                                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}
             for k in range(20)]
    claude_tools = [{"name": t["function"]["name"], "description": t["function"]["description"],
                     "input_schema": t["function"]["parameters"]} for t in tools]
    claude_tools[-1]["cache_control"] = {"type": "ephemeral"}  # one breakpoint after the tools (at most 4 a call)
    cat = default_catalog()
    for model, count, body in (
            ("gpt-4o-mini", chat_prompt, {"messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": tools}),
            ("claude-haiku-4-5", anthropic_prompt, {"messages": [{"role": "user", "content": "Weather in Paris?"}],
                                                    "system": "Be brief.", "tools": claude_tools, "max_tokens": 50})):
        r = Request.model_validate({"id": "t", "arrival_s": 0.0, "model": model, "body": body})
        billed = count(body, None, cat.tool_prompt(r.provider, model)).tokens  # Claude's tool-use prompt too
        assert billed > 1000 and billed <= r.input_tokens <= billed + 2  # (the engine joins texts with a newline)
        assert reserve_bound(r, cat, "sync") >= price_usage(r, cat, "sync", input_tokens=billed,
                                                            output_tokens=r.max_output_tokens or 0).total


class _SlowCache:
    """A cache whose lookup is under way until ``gate`` opens (a cache busy with long prompts), then misses all."""

    def __init__(self) -> None:
        self.entered, self.gate = asyncio.Event(), asyncio.Event()

    async def lookup(self, items):
        self.entered.set()
        await self.gate.wait()
        return list(range(len(items)))

    async def recall(self, uids):
        return []


def test_a_request_still_in_its_cache_lookup_is_not_readmitted_to_be_generated_a_second_time():
    """A busy cache held lookups past the driver's sweep (deadline + grace): the sweep re-admitted those requests,
    ingest asked the dispatchers, the cache and the hub, none held them, and they went to the groupers; then
    the lookup ended and sent them again. 50,000 chat requests at 2,000x: the hub's report counted 69,926 results
    (16,836 more paid ones than the futures got) and $4,740 against $3,259 in the results; within its 16,384
    recent results the hub drops a second result from the report, but the call was made."""
    from actors import Ingest
    from tests.unit.helpers import Recorder

    async def go():
        grouper, cache = Recorder(), _SlowCache()
        ing = Ingest([grouper], cache=cache)
        r = chat(1, reuse="exact").req
        submit = asyncio.ensure_future(ing.submit([r]))
        await cache.entered.wait()
        await ing.readmit([r])  # the sweep
        await ing.readmit([r], force=True)  # the third sweep
        cache.gate.set()
        assert await submit == 1
        await asyncio.sleep(0)  # let the sends run
        assert [j.req.uid for j in grouper.readmitted()] == [r.uid]  # generated once

    asyncio.run(go())


def test_a_budget_per_tenant_is_found_by_its_fields_with_the_same_answer_as_asking_every_spec(monkeypatch):
    """With a budget per tenant (10,000 of them), every reservation asked every spec whether it covered it: 2.5 ms
    a claim in the one budget actor, 15.6 s of its CPU for 10,000 requests (0.2 s with one budget), and the
    engine 9x slower end to end. The specs that cover a claim are now looked up by their fields."""
    import itertools
    import random

    from engine.core.budgets import BudgetSpec, Claim, Covering
    from engine.core.ledger import BudgetBook

    rng = random.Random(0)
    fields = {"tenant": [None, "a", "b"], "provider": [None, "openai", "anthropic"], "model": [None, "gpt-5-mini", "claude-haiku-4-5"]}
    specs = [BudgetSpec(max_budget=rng.choice([1.0, 5.0]), budget_duration=rng.choice([None, "1d"]),
                        **{k: rng.choice(v) for k, v in fields.items()}) for _ in range(60)]
    covering = Covering(specs)
    for t, p, m in itertools.product(["a", "b", "c"], ["openai", "anthropic"], ["gpt-5-mini", "claude-haiku-4-5"]):
        assert covering(t, p, m) == [s for s in specs if s.covers(t, p, m)]  # the same specs, in the same order

    many = [BudgetSpec(max_budget=1e6)] + [BudgetSpec(tenant=f"t{k}", max_budget=10.0) for k in range(10_000)]
    book = BudgetBook(many)
    monkeypatch.setattr(BudgetSpec, "covers", lambda *a: pytest.fail("every spec asked"))
    v = book.reserve_many([Claim(rid="c1", tenant="t7", provider="openai", model="gpt-5-mini", priority="normal",
                                 amount=11.0)], 0.0)
    assert not v[0].ok and [r["budget"] for r in book.report(0.0) if r["reserved_usd"]] == []
    assert book.reserve_many([Claim(rid="c2", tenant="t7", provider="openai", model="gpt-5-mini", priority="normal",
                                    amount=1.0)], 0.0)[0].ok
    assert sorted(r["budget"] for r in book.report(0.0) if r["reserved_usd"]) == sorted([many[0].name, many[8].name])
