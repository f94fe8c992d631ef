"""The cache without Redis: memory LRU, blob store, codec, near-duplicate reuse with guards, tenant scopes,
single-flight under concurrency, and the inverted-file index against exact search."""

import asyncio
import hashlib

import numpy as np
import pytest

import engine.runtime.reuse as reuse_mod
from actors import ResultCache, ResultHub
from actors._types import Job
from actors.cache_layers import SCHEMA, CorruptValue, Entry, LocalBlobStore, MemoryLRU, decode, encode
from engine.core.clock import ManualClock
from engine.core.features import NEAR_DIM, featurize_texts, fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings, SimSettings
from engine.core.similarity import GUARDS, Guards, guard_reason
from engine.runtime.reuse import ReuseIndex

NEAR = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=0.85)
LOW_FLOOR = Settings(sim=SimSettings(near_floor=0.5))
REUSE_EXACT = ReuseSettings(exact=True, in_flight=True)


def run(coro):
    return asyncio.run(coro)


def job(i, prompt, *, tenant="acme", reuse="near", share=False, model="gpt-image-1", **kw):
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": model, "prompt": prompt,
                                "tenant": tenant, "reuse": reuse, **kw})
    return Job(i, r, fingerprint(r, share_across_tenants=share))


def ok(j, output="img://out", done_s=1.0):
    return (j.fp, Result(id=j.req.id, tenant=j.req.tenant, status="ok", output=output, cost_usd=0.04, mode="sync",
                         provider=j.req.provider, model=j.req.model, done_s=done_s))


def make_cache(tmp_path, reuse=NEAR, settings=LOW_FLOOR, **cache_kw):
    hub = ResultHub()
    cfg = settings.model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs", **cache_kw)})
    return hub, ResultCache(reuse, hub, ManualClock(5.0), settings=cfg)


async def generated(cache, hub, j, **kw):
    """Look ``j`` up (a miss), complete it, and drain the hub."""
    assert await cache.lookup([j]) == [0]
    await cache.complete([ok(j, **kw)])
    await hub.pull(0.01)


def test_memory_lru_evicts_the_least_recent_and_expires_by_ttl():
    clock = ManualClock(0.0)
    lru = MemoryLRU(max_entries=2, max_bytes=10**6, now=clock.now)
    e = {k: Entry(k, Result(id=k, status="ok")) for k in "abc"}
    lru.put(e["a"], ttl_s=10)
    lru.put(e["b"], ttl_s=100)
    assert lru.get("a") is e["a"]  # a is now the most recent
    lru.put(e["c"], ttl_s=100)
    assert lru.get("b") is None and lru.get("a") is e["a"] and lru.evicted == 1
    clock.advance(10.0)
    assert lru.get("a") is None and lru.expired == 1 and lru.get("c") is e["c"]
    small = MemoryLRU(max_entries=100, max_bytes=2 * e["a"].size(), now=clock.now)
    for x in e.values():
        small.put(x, ttl_s=100)
    assert len(small) == 2 and small.bytes <= 2 * e["a"].size()


def test_a_capped_answer_is_not_served_near_to_the_same_question_asked_with_another_cap(tmp_path):
    """The cap is sent (max_tokens), and the exact key holds it: near reuse did not, and a 16-token answer was
    served to the question asked uncapped or with 4,000 tokens (a helper's hunt)."""
    hub, cache = make_cache(tmp_path)
    ask = "Explain in detail how photosynthesis works in plants."

    async def go():
        await generated(cache, hub, job(1, ask, model="gpt-5-mini", max_output_tokens=16))
        misses = []
        for i, kw in ((2, {}), (3, {"max_output_tokens": 4000})):
            misses.append(await cache.lookup([job(i, ask.rstrip("."), model="gpt-5-mini", **kw)]))
        same = await cache.lookup([job(4, ask.rstrip("."), model="gpt-5-mini", max_output_tokens=16)])
        return misses, same, await hub.pull(0.01)

    misses, same, served = run(go())
    assert misses == [[0], [0]]  # both generated
    assert same == [] and [r.hit for r in served] == ["near"]  # the same cap: a near duplicate


def test_a_stored_answer_keeps_no_raw_body_so_the_memory_limit_bounds_what_it_holds(tmp_path):
    """The provider's raw body (a base64 image in it) stayed beside a stored answer in memory and in Redis, where
    the limit does not count it (a helper's hunt: 50 MB held under a 1 MB limit). A reuse is answered from the
    output alone, so nothing else is kept."""
    hub, cache = make_cache(tmp_path, memory_max_mb=1, blob_min_kb=64)
    big = "Qk0" * 100_000  # 300 kB of base64: the output goes to the blob store

    async def go():
        for i in range(8):
            j = job(i, f"a lighthouse, number {i}", reuse="exact")
            assert await cache.lookup([j]) == [0]
            done = ok(j, output=big)
            await cache.complete([(done[0], done[1].model_copy(update={"raw": {"data": [{"b64_json": big}]}}))])
            await hub.pull(0.01)
        again = job(99, "a lighthouse, number 3", reuse="exact")
        assert await cache.lookup([again]) == []  # served from the cache
        (hit,) = await hub.pull(0.01)
        return hit

    hit = run(go())
    assert hit.hit == "exact" and hit.output == big  # the output, from the blob store
    entries = [e for e, *_ in cache.memory._d.values()]
    assert len(entries) == 8 and all(e.result.raw is None and e.blob for e in entries)
    assert all(len(encode(e)) < 4096 for e in entries)  # what goes to Redis too
    assert cache.memory.bytes <= cache.memory.max_bytes


def test_the_results_kept_for_recall_are_bounded_by_their_bytes_and_the_newest_stay(tmp_path):
    """A reused result holds its output, and ``recall`` keeps reused results outside the memory layer (a hunt:
    65,536 results of 16 kB held 1 GB under a 512 MB limit). They are bounded by the memory limit's bytes too,
    oldest out first, and the newest can still be recalled."""
    hub, cache = make_cache(tmp_path, memory_max_mb=1, blob_min_kb=1024)
    out = "x" * 200_000  # 200 kB an answer: five of them fill the 1 MiB limit

    async def go():
        src = job(0, "a lighthouse at dusk", reuse="exact")
        await generated(cache, hub, src, output=out)
        copies = [job(i, "a lighthouse at dusk", reuse="exact") for i in range(1, 21)]
        for c in copies:
            assert await cache.lookup([c]) == []  # each one an exact hit
        assert [r.output == out for r in await hub.pull(0.01)] == [True] * 20
        return copies, await cache.recall([c.req.uid for c in copies])

    copies, held = run(go())
    assert cache._delivered.bytes <= cache.memory.max_bytes
    assert 0 < len(held) < len(copies) and held == [c.req.uid for c in copies[-len(held):]]


def test_blob_store_is_content_addressed_and_refuses_a_damaged_blob(tmp_path):
    store = LocalBlobStore(tmp_path)
    ref = store.put(b"frame" * 1000)
    assert store.put(b"frame" * 1000) == ref and store.get(ref) == b"frame" * 1000
    assert len(list(tmp_path.rglob("*"))) == 2  # one folder, one file: stored once
    path = next(p for p in tmp_path.rglob("*") if p.is_file())
    path.write_bytes(b"tampered")
    assert store.get(ref) is None and store.get("md5:abc") is None


def test_codec_round_trips_and_rejects_foreign_values():
    e = Entry("fp1", Result(id="x", status="ok", output="o"), ("acme", ("openai", "gpt-5", "text")), "hi")
    assert decode(encode(e), "fp1") == e
    for raw in (b"\x00garbage", b'{"app": "other", "v": 1}', encode(e).replace(f'"v":{SCHEMA}'.encode(), b'"v":99')):
        with pytest.raises(CorruptValue):
            decode(raw, "fp1")
    with pytest.raises(CorruptValue, match="another fingerprint"):
        decode(encode(e), "fp2")


def test_an_entry_written_before_answers_kept_their_tool_calls_is_never_served():
    # Schema 2 stored no tool calls: its entry of a tool-call answer reads as an empty text.
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    e = Entry("fp1", Result(id="x", status="ok", output="", tool_calls=[call], finish="tool_calls"),
              ("acme", ("openai", "gpt-5", "text")), "hi")
    assert decode(encode(e), "fp1").result.tool_calls == [call]
    old = encode(e).replace(f'"v":{SCHEMA}'.encode(), b'"v":2')
    with pytest.raises(CorruptValue, match="schema version"):
        decode(old, "fp1")


def test_near_duplicate_is_reused_unless_a_guard_objects(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path)
        await generated(cache, hub, job(0, "Draw a red car parked on a wet street at night"))
        await generated(cache, hub, job(1, "A photo of a dog chasing a cat in the park"))
        asks = [job(10, "draw a red car parked on a wet street at night."),  # 0.998: reused
                job(11, "Draw a blue car parked on a wet street at night"),  # colour
                job(12, "A photo of a cat chasing a dog in the park"),  # swapped roles
                job(13, "Draw a red car parked on a wet street at night", reuse="exact", params={"seed": 1})]
        misses = await cache.lookup(asks)
        got = {r.id: r for r in await hub.pull(0.01)}
        assert misses == [1, 2, 3]
        assert got["r10"].hit == "near" and got["r10"].output == "img://out" and "cosine" in got["r10"].reason
        assert cache.cache_stats()["near"] == 1
    run(go())


def test_tenants_never_see_each_other_unless_sharing_is_set(tmp_path):
    async def go(share):
        hub, cache = make_cache(tmp_path, share_across_tenants=share)
        prompt = "A watercolour of a lighthouse in a storm"
        await generated(cache, hub, job(0, prompt, tenant="acme", share=share))
        other_exact = job(1, prompt, tenant="globex", share=share)
        other_near = job(2, prompt + ".", tenant="initech", share=share)
        misses = await cache.lookup([other_exact, other_near])
        return misses, {r.id: r.hit for r in await hub.pull(0.01)}

    assert run(go(False)) == ([0, 1], {})  # both generated for their own tenants
    assert run(go(True)) == ([], {"r1": "exact", "r2": "near"})


def test_reuse_none_is_never_served_but_feeds_later_requests(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path)
        first = job(0, "A product render", reuse="none")
        await generated(cache, hub, first)
        assert await cache.lookup([job(1, "A product render", reuse="none")]) == [0]  # never served
        assert await cache.lookup([job(2, "A product render", reuse="exact")]) == []  # fed the cache
        assert (await hub.pull(0.01))[0].hit == "exact"
    run(go())


def test_identical_concurrent_requests_make_one_provider_call(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path)
        jobs = [job(i, "An isometric pixel-art castle") for i in range(50)]
        # 50 lookups in flight at once, one request each, as 50 callers would send them
        misses = await asyncio.gather(*(cache.lookup([j]) for j in jobs))
        leaders = [j for j, m in zip(jobs, misses) if m == [0]]
        assert len(leaders) == 1
        await cache.complete([ok(leaders[0])])
        got = await hub.pull(0.01)
        assert len(got) == 49 and {r.hit for r in got} == {"in_flight"}
    run(go())


def test_large_outputs_live_in_the_blob_store_and_come_back_whole(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path, blob_min_kb=1)
        big = "v" * 5000
        j = job(0, "A ten-second video of waves")
        await generated(cache, hub, j, output=big)
        e = cache.memory.get(j.fp)
        assert e.blob and e.result.output is None  # the entry holds the reference only
        assert await cache.lookup([job(1, "A ten-second video of waves")]) == []
        (res,) = await hub.pull(0.01)
        assert res.output == big and res.hit == "exact"
    run(go())


def test_qualifier_and_known_guards():
    assert guard_reason("What are the best ways to lose weight?", "What are the best ways to lose weight fast?")
    assert guard_reason("How can I fall in love again?", "How can I fall in love?")
    assert guard_reason("How do I learn Python quickly?", "How can I learn Python quickly?") is None
    with pytest.raises(ValueError, match="unknown near-duplicate guard"):
        Guards.of(["colour"])
    assert Guards.of(["numbers"]) == Guards(True, *[False] * (len(GUARDS) - 1))


# Different asks one word apart, each scored above the text threshold by the near vectors (a helper's
# adversarial hunt: every other guard passed them), and the contrast guard's reason for each.
CONTRASTS = [
    ("Is it legal to record a phone call in California without telling the other person?",
     "Is it illegal to record a phone call in California without telling the other person?", "prefix"),
    ("Write a SQL query that lists customers by signup date in ascending order.",
     "Write a SQL query that lists customers by signup date in descending order.", "opposites"),
    ("Draft a polite email to my landlord about the broken heating in the apartment.",
     "Draft a polite email from my landlord about the broken heating in the apartment.", "direction"),
    ("Why did the Soviet Union collapse so quickly at the end of the Cold War?",
     "When did the Soviet Union collapse so quickly at the end of the Cold War?", "question words"),
    ("Show me how to write hello world in C with a short explanation.",
     "Show me how to write hello world in C# with a short explanation.", "languages"),
    ("The patient hardly sleeps at night and feels tired all day. What could cause it?",
     "The patient mostly sleeps at night and feels tired all day. What could cause it?", "negating word"),
]


@pytest.mark.parametrize("a, b, why", CONTRASTS, ids=[c[2] for c in CONTRASTS])
def test_a_contrast_one_word_apart_is_refused_where_the_cosine_would_serve_it(a, b, why):
    from engine.core.features import near_vectors_texts
    from engine.runtime.reuse import class_threshold

    key = ("t", ("openai", "gpt-5-mini", "text"))
    va, vb = near_vectors_texts([a, b])
    asked = ReuseSettings().near_threshold
    assert float(va @ vb) >= class_threshold(key, asked)  # the cosine alone serves it

    def served(guards: Guards) -> bool:
        idx = ReuseIndex(NEAR_DIM)
        idx.add_near(key, vb[None, :], ["src"], [b], [0.0])
        return idx.near(key, va, a, asked, guards) is not None
    assert served(Guards.of([g for g in GUARDS if g != "contrast"]))  # every other guard lets it through
    assert not served(Guards())
    assert why in guard_reason(a, b)


@pytest.mark.parametrize("a, b", [
    ("How do I learn Python quickly?", "How can I learn Python fast?"),
    ("What is the best way to lose weight?", "What is a good way to lose weight?"),
    ("How do I export my contacts to a CSV file?", "How can I export my contacts to a CSV file?"),
    ("Where can I buy cheap flights to Tokyo?", "Where can I find cheap flights to Tokyo?"),
    # A review's false refusals: a hyphen splits "non-profit" into "non" and "profit" (no negation), and
    # "instead of" says what "in place of" says; i++ and ++i are no language names.
    ("Is a non-profit organization exempt from income tax?", "Is a nonprofit organization exempt from income tax?"),
    ("Can I use honey instead of sugar in bread?", "Can I use honey in place of sugar in bread?"),
])
def test_paraphrases_pass_the_contrast_guard(a, b):
    assert guard_reason(a, b) is None


def test_operators_and_signs_that_differ_are_refused_and_prose_punctuation_is_not():
    """The guards read words and numbers: "3 + 4 * 2" / "3 * 4 + 2", "a < b" / "a > b", "-5" / "5" and "$5" /
    "€5" passed every one of them, at cosines of 0.93-0.99 (a helper's hunt). The held-out pairs' figures are
    unchanged by the guard (docs/cache.md)."""
    for a, b in [("What is 3 + 4 * 2?", "What is 3 * 4 + 2?"), ("Is a < b true here?", "Is a > b true here?"),
                 ("Convert -40 degrees to kelvin", "Convert 40 degrees to kelvin"), ("Is $5 a lot?", "Is €5 a lot?"),
                 ("Loop while i < 10", "Loop while i <= 10"), ("What is 7 // 2 in Python?", "What is 7 / 2 in Python?")]:
        assert guard_reason(a, b).startswith("operators or signs differ"), (a, b)
        assert guard_reason(a, b, Guards.of([g for g in GUARDS if g != "symbols"])) is None, (a, b)
    for a, b in [("Is a well-known brand better?", "Is a well known brand better?"),
                 ("Trump - what happens now?", "Trump: what happens now?"), ("Pros and/or cons?", "Pros and or cons?")]:
        assert guard_reason(a, b) is None, (a, b)
    # Spacing is no operator ("a+b" is "a + b"), and i++ / ++i read the same operators: a for loop's step.
    for a, b in [("What is a+b squared?", "What is a + b squared?"), ("Solve x^2 = 4", "Solve x ^ 2 = 4"),
                 ("for (i = 0; i < n; i++) total += x[i]", "for (i = 0; i < n; ++i) total += x[i]")]:
        assert guard_reason(a, b) is None, (a, b)
    assert guard_reason("Is x>y?", "Is x<y?").startswith("operators or signs differ")


def test_one_letter_names_that_differ_in_code_are_refused_and_abbreviations_are_not():
    """"print(a)" / "print(i)" read as stop words ("a", "I") to every other guard (a helper's hunt)."""
    others = Guards.of([g for g in GUARDS if g != "symbols"])
    for a, b in [("What does print(a) show here?", "What does print(i) show here?"),
                 ("Why is sum(x, y) zero?", "Why is sum(x, z) zero?"), ("Sort x[i] in place", "Sort x[a] in place")]:
        assert guard_reason(a, b).startswith("one-letter names differ"), (a, b)
        assert guard_reason(a, b, others) is None, (a, b)
    for a, b in [("Name a fruit, e.g. an apple", "Name a fruit, for example an apple"),
                 ("Are N-dimensional arrays nested lists?", "Are multi-dimensional arrays nested lists?"),
                 ("Why does f(a) fail?", "Why does f( a ) fail?")]:
        assert not (guard_reason(a, b) or "").startswith("one-letter names differ"), (a, b)


def test_the_ann_index_finds_what_exact_search_finds(monkeypatch):
    monkeypatch.setattr(reuse_mod, "BRUTE_MAX", 500)  # index a small class so the test stays fast
    rng = np.random.default_rng(1)
    words = [f"w{k}" for k in range(400)]
    texts = [" ".join(rng.choice(words, 8)) + f" item {k}" for k in range(6000)]
    vecs = featurize_texts(texts, dim=NEAR_DIM)
    idx = ReuseIndex(NEAR_DIM)
    for lo in range(0, 6000, 1000):  # grows past BRUTE_MAX and on, as a live cache does
        idx.add_near("c", vecs[lo:lo + 1000], list(range(lo, lo + 1000)), texts[lo:lo + 1000], [0.0] * 1000)
    assert idx._shelves["c"].graph is not None
    picks = rng.choice(6000, 300, replace=False)
    queries = [texts[k].replace(" item ", " item  ") + " " for k in picks]  # same n-grams, other spacing
    qv = featurize_texts(queries, dim=NEAR_DIM)
    hits = idx.near_many("c", qv, queries, 0.9, Guards.of(()))
    brute = (qv @ vecs.T).argmax(axis=1)
    assert [h.source for h in hits] == list(brute)
    assert idx.near_entries == 6000


def test_a_near_duplicate_follows_its_source_while_in_flight(tmp_path):
    async def go():
        hub, cache = make_cache(tmp_path)
        src = job(0, "Draw a red car parked on a wet street at night")
        assert await cache.lookup([src]) == [0]
        follower = job(1, "draw a red car parked on a wet street at night.")
        assert await cache.lookup([follower]) == []  # no second provider call
        assert await hub.pull(0.01) == []  # and nothing to serve yet
        await cache.complete([ok(src)])
        (res,) = await hub.pull(0.01)
        assert (res.id, res.hit, res.output) == ("r1", "near", "img://out")
    run(go())


def test_recall_answers_what_it_holds_even_when_the_hub_cannot_take_the_results_again(tmp_path):
    """After a restart the driver re-admits open requests; the cache says which it holds (following a leader,
    or resolved here lately). A hub that is still down when the cache sends a resolved result again must not
    turn that answer into "nothing": the request would be generated (and billed) although its result exists."""
    async def go():
        hub, cache = make_cache(tmp_path)
        lead, follower, waiting = (job(i, "A red fox in the snow") for i in range(3))
        assert await cache.lookup([lead]) == [0]
        assert await cache.lookup([follower]) == []  # follows the leader in flight
        await cache.complete([ok(lead)])
        assert [r.id for r in await hub.pull(0.01)] == ["r1"]  # the follower's reused result
        assert await cache.lookup([waiting]) == []  # served from memory at once (exact)
        other = job(9, "A blue whale at dusk")
        assert await cache.lookup([other]) == [0]
        late = job(10, "A blue whale at dusk")
        assert await cache.lookup([late]) == []  # following `other`, still in flight

        async def down(*args):
            raise ConnectionError("hub restarting")

        hub.push = down
        uids = [follower.req.uid, late.req.uid, job(11, "never seen").req.uid]
        assert await cache.recall(uids) == uids[:2]
    run(go())


class LosingBlobs(LocalBlobStore):
    """A blob store that loses what it is given (a pluggable store that failed): nothing reads back."""

    def get(self, ref: str) -> bytes | None:
        return None


def test_followers_get_the_leaders_output_even_when_its_blob_cannot_be_read_back(tmp_path):
    """A large output goes to the blob store. The followers of the in-flight leader are answered with the output
    in hand, never dropped when the store cannot give it back: dropped, they waited for the driver's sweep."""
    async def go():
        hub = ResultHub()
        cfg = LOW_FLOOR.model_copy(update={"cache": CacheSettings(blob_dir=tmp_path / "blobs", blob_min_kb=1)})
        cache = ResultCache(NEAR, hub, ManualClock(5.0), settings=cfg, blobs=LosingBlobs(tmp_path / "blobs"))
        big = "v" * 5000
        lead, follower = job(0, "A ten-second video of waves"), job(1, "A ten-second video of waves")
        assert await cache.lookup([lead]) == [0]
        assert await cache.lookup([follower]) == []  # follows the leader in flight
        await cache.complete([ok(lead, output=big)])
        got = await hub.pull(0.01)
        assert [(r.id, r.output) for r in got] == [("r1", big)]
    run(go())


def test_a_damaged_blob_is_written_again_by_the_next_put_of_its_content(tmp_path):
    store, data = LocalBlobStore(tmp_path), b"v" * 5000
    digest = hashlib.sha256(data).hexdigest()
    (tmp_path / digest[:2]).mkdir()
    (tmp_path / digest[:2] / digest).write_bytes(b"damaged")  # a torn write, a disk error
    ref = store.put(data)
    assert store.get(ref) == data  # not left damaged: every later hit of this content would have missed


def test_a_rerouted_leaders_fallback_output_is_not_served_as_an_exact_hit_for_the_original_model(tmp_path):
    # The dispatcher reroutes a job whose model's circuit is open to the fallback model, keeping its fingerprint
    # (Dispatcher._start_reroute); the fallback's result names the model that made it.
    async def go():
        hub, cache = make_cache(tmp_path)
        lead, follower = job(0, "hi", reuse="exact", model="gpt-5-mini"), job(2, "hi", reuse="exact", model="gpt-5-mini")
        assert await cache.lookup([lead]) == [0]
        assert await cache.lookup([follower]) == []  # follows the leader in flight
        fb = Result(id=lead.req.id, tenant=lead.req.tenant, status="ok", output="from the fallback",
                    provider="anthropic", model="claude-haiku-4-5", cost_usd=0.01, done_s=1.0)
        await cache.complete([(lead.fp, fb)])
        # The follower takes the leader's answer, labelled with the model that made it.
        (got,) = await hub.pull(0.01)
        assert (got.id, got.output, got.provider, got.model) == ("r2", "from the fallback", "anthropic",
                                                                 "claude-haiku-4-5")
        later = job(1, "hi", reuse="exact", model="gpt-5-mini")
        assert await cache.lookup([later]) == [0]  # generated by its own model, not served the fallback's output
        assert await hub.pull(0.01) == []
    run(go())


def test_a_lookup_of_long_prompts_lets_the_health_check_through_and_decides_the_same(tmp_path, monkeypatch):
    """Featurising a batch of long prompts is seconds of CPU: the cache lets its event loop go between slices,
    so the driver's ping is answered while the lookup runs (a cache silent for ``actor_hang_s`` is killed as
    hung, and its open work re-admitted onto a busier cache). The slices change no decision."""
    import actors._near_index as near_mod

    words = [f"topic{k}" for k in range(400)]
    texts = [" ".join(words[(7 * i + j) % 400] for j in range(300)) for i in range(12)]  # ~3,000 chars each
    # each long prompt twice, the second with another full stop: a near duplicate that follows the first
    jobs = [job(i, t + ("." if i < 12 else "!"), model="gpt-5-mini") for i, t in enumerate(texts + texts)]

    def decide(yield_chars):
        monkeypatch.setattr(near_mod, "YIELD_CHARS", yield_chars)
        hub, cache = make_cache(tmp_path)

        async def go():
            look = asyncio.ensure_future(cache.lookup(jobs))
            ping = asyncio.ensure_future(cache.ping())
            done, _ = await asyncio.wait({look, ping}, return_when=asyncio.FIRST_COMPLETED)
            return ping in done and look not in done, await look, dict(cache.stats)
        return run(go())

    answered, misses, stats = decide(8_000)
    assert answered  # the ping came back while the lookup was still featurising
    assert misses == list(range(12)) and stats["near"] == 12  # each copy follows its original
    whole = decide(10**9)  # one slice: the loop is not let go, so the ping waits for the whole lookup
    assert not whole[0] and (whole[1], whole[2]) == (misses, stats)


def test_a_leader_that_completes_while_a_lookup_featurises_still_takes_its_identical_request(tmp_path, monkeypatch):
    """A lookup now lets the loop go while it featurises (``YIELD_CHARS``), so a ``complete`` can run between
    the arrival of a request and its decision. A request identical to a leader in flight when the lookup began
    follows that leader (one call), as the simulator decides it; it must not find the leader gone after the
    slice and be generated a second time."""
    import types

    import actors._near_index as near_mod

    monkeypatch.setattr(near_mod, "YIELD_CHARS", 64)  # several slices for the prompts below
    hub, cache = make_cache(tmp_path)
    lead = job(0, "a red fox jumping over a garden wall, watercolor", reuse="exact")
    asks = [job(i, f"portrait {'of a lighthouse keeper ' * i}in oil") for i in range(1, 5)]  # near asks, one class
    same = job(9, lead.req.prompt, reuse="exact")  # identical to the leader, arrives while it generates
    interleaved: list[str] = []

    async def let_go(_delay):  # what the event loop runs while the lookup lets it go: the leader's result
        if not interleaved:
            interleaved.append("complete")
            await cache.complete([ok(lead)])

    async def go():
        assert await cache.lookup([lead]) == [0]
        monkeypatch.setattr(near_mod, "asyncio", types.SimpleNamespace(sleep=let_go))
        misses = await cache.lookup([*asks, same])
        return misses, await hub.pull(0.01)

    misses, results = run(go())
    assert interleaved == ["complete"]  # the leader did complete mid-lookup
    assert 4 not in misses  # not generated again
    got = {r.id: r for r in results}
    assert got["r9"].output == "img://out" and got["r9"].status == "reused"


def test_a_follower_resolved_by_a_completion_that_is_still_storing_is_held_for_recall(tmp_path):
    """``complete`` takes the followers from the in-flight table, then lets the loop go while it writes the
    result to Redis. A ``recall`` (a re-admission after the hub restarted) answered in that window must still
    count them as held here, or they are sent on and generated, and billed, again. The Redis layer is replaced
    by a hook that runs the recall at that await: the ordering is what is tested, not Redis."""
    hub, cache = make_cache(tmp_path)
    lead = job(0, "a lighthouse on a cliff at dawn", reuse="exact")
    follower = job(1, lead.req.prompt, reuse="exact")
    held: list[list[str]] = []

    class RecallWhileStoring:
        up, errors, reconnects, dropped_writes = True, 0, 0, 0

        def key(self, scope, fp):
            return f"{scope}:{fp}"

        async def put_many(self, items):
            held.append(await cache.recall([follower.req.uid]))

    async def go():
        assert await cache.lookup([lead]) == [0]
        assert await cache.lookup([follower]) == []  # follows the leader
        cache.redis = RecallWhileStoring()
        await cache.complete([ok(lead)])
        return await hub.pull(0.01)

    results = run(go())
    assert [r.id for r in results] == ["r1"]  # the follower was resolved by the completion
    assert held == [[follower.req.uid]]  # and held while the completion was still storing


def test_a_sweeps_last_recall_lets_a_follower_go_so_the_leaders_result_never_reaches_it_too(tmp_path):
    """The driver's sweep re-admits a request open long past its deadline with ``force``: it is generated itself.
    If the cache kept it following, the leader's result could still reach it afterwards, and its own call
    was billed for a result nobody gets (seen in the chaos run on a slow machine). ``detach`` takes it out."""
    hub, cache = make_cache(tmp_path)
    lead = job(0, "a lighthouse on a cliff at dawn", reuse="exact")
    follower = job(1, lead.req.prompt, reuse="exact")
    other = job(2, lead.req.prompt, reuse="exact")

    async def go():
        assert await cache.lookup([lead]) == [0]
        assert await cache.lookup([follower, other]) == []  # both follow the leader
        assert await cache.recall([follower.req.uid]) == [follower.req.uid]  # a plain recall: still held
        assert await cache.recall([follower.req.uid], True) == []  # the sweep's last word: let go
        assert await cache.recall([follower.req.uid]) == []
        await cache.complete([ok(lead)])
        return await hub.pull(0.01)

    got = sorted(r.id for r in run(go()))
    assert got == ["r2"]  # the follower still waiting gets it, not the one let go (the leader: its dispatcher)
    assert cache.stats["detached"] == 1


def _ask(prompt: str = "Tell me about Rome.", **kw) -> Request:
    return Request.model_validate({"id": "q", "arrival_s": 0.0, "model": "gpt-5-mini", "prompt": prompt,
                                   "input_tokens": 10, **kw})


def test_the_exact_key_tells_apart_what_the_provider_is_sent_differently():
    """A helper's fault hunt: a 16-token answer was served to the same prompt asked uncapped (the cap is sent as
    max_tokens); NFKC and whitespace folding made "What is 2³?" the key of "What is 23?", and a newline one of a
    space; a label beside a body split two identical bodies."""
    assert fingerprint(_ask(max_output_tokens=16)) != fingerprint(_ask(max_output_tokens=4000))
    assert fingerprint(_ask("What is 2³?")) != fingerprint(_ask("What is 23?"))
    assert fingerprint(_ask("count the lines:\na\nb")) != fingerprint(_ask("count the lines: a b"))
    assert fingerprint(_ask("  Tell me  about Rome. ")) == fingerprint(_ask("Tell me about Rome."))  # spacing
    # ... but not a line's indentation, Python's syntax (a helper's hunt: one key, one answer served to both).
    inner = "What does this print?\nfor i in range(2):\n    if i:\n        print('x')"
    outer = "What does this print?\nfor i in range(2):\n    if i:\n    print('x')"
    assert fingerprint(_ask(inner)) != fingerprint(_ask(outer))
    assert fingerprint(_ask("x = 1  # one\n    y")) == fingerprint(_ask("x = 1 # one\n    y"))
    assert fingerprint(_ask("e\u0301t\u00e9")) == fingerprint(_ask("\u00e9t\u00e9"))  # NFC: one text
    assert fingerprint(_ask("a\x1fb")) == fingerprint(_ask("a b"))  # no prompt reads as two fields
    body = {"messages": [{"role": "user", "content": "Name three rivers."}]}
    assert fingerprint(_ask("row 17", body=body)) == fingerprint(_ask("row 18", body=body))


def test_a_prompt_sent_beside_a_body_without_text_keys_the_result():
    """A helper's tour: beside a ``system`` (or a temperature, a cap) a prompt is the user's text, sent as the
    user message; keyed as a label (stop 44), "Capital of Spain?" was answered with "Capital of France?"'s result,
    in the simulator and over HTTP alike."""
    from engine.core.catalog import default_catalog
    from engine.core.cost import input_bound
    from engine.core.features import near_class, near_text
    from engine.sim.simulator import simulate
    from policies import load_policy

    def asked(prompt: str, k: int, system: str = "Be brief.") -> Request:
        return Request.model_validate({"id": f"s{k}", "arrival_s": 10.0 * k, "model": "claude-haiku-4-5",
                                       "system": system, "prompt": prompt, "deadline_s": 30.0, "reuse": "near"})

    france, spain, again = asked("Capital of France?", 0), asked("Capital of Spain?", 1), asked("Capital of France?", 2)
    assert fingerprint(france) != fingerprint(spain) and fingerprint(france) == fingerprint(again)
    res = simulate([france, spain, again], load_policy("smart", default_catalog()))
    assert [int(h) for h in res.hit] == [0, 0, 1] and res.cost[1] > 0  # only the true copy is reused
    # The prompt is the text a near-duplicate search compares, and the whole body must match beside it.
    verbose = asked("Capital of France?", 3, system="Answer at length, with history.")
    assert near_text(verbose) == near_text(france) and near_class(verbose, "t") != near_class(france, "t")
    # It is sent beside the system prompt: both count in the estimate and in a budget's bound.
    alone = Request.model_validate({"id": "a", "arrival_s": 0.0, "model": "claude-haiku-4-5",
                                    "prompt": "Capital of France?"})
    assert france.input_tokens > alone.input_tokens
    spec = default_catalog().model("anthropic", "claude-haiku-4-5")
    assert input_bound(france, spec) >= france.input_tokens + len("Be brief.Capital of France?")


def test_the_simulator_reuses_across_tenants_when_the_cache_is_shared():
    """The live cache keyed requests across tenants with ``cache.share_across_tenants``; the simulator (and the
    lower bound) did not, so ``bench`` billed what a live engine reused."""
    from engine.core.catalog import default_catalog
    from engine.sim.lower_bound import lower_bound
    from engine.sim.simulator import simulate
    from policies import load_policy

    reqs = [_ask(tenant=t, arrival_s=100.0 * k, id=f"r{k}", deadline_s=30.0)
            for k, t in enumerate(("acme", "globex"))]
    for share, paid in ((False, 2), (True, 1)):
        s = Settings(cache=CacheSettings(share_across_tenants=share))
        res = simulate(reqs, load_policy("cache-only", default_catalog()), settings=s)
        assert int((res.cost > 0).sum()) == paid
        assert int((lower_bound(reqs, settings=s).per_request_usd > 0).sum()) == paid


@pytest.mark.parametrize("model, life_s", [("sora-2", 3600.0), ("veo-3.1-fast-generate-001", 172800.0)])
def test_a_video_is_served_from_the_cache_only_while_its_provider_keeps_it(tmp_path, model, life_s):
    """A video's answer is an address the provider keeps for a while (a Sora video an hour): kept the cache's 7
    days, an exact copy was served a dead address at $0 (a helper's tour). Served for nine tenths of that life."""
    clock = ManualClock(0.0)
    hub = ResultHub()
    cache = ResultCache(REUSE_EXACT, hub, clock, settings=LOW_FLOOR.model_copy(
        update={"cache": CacheSettings(blob_dir=tmp_path / "blobs")}))
    assert CacheSettings().ttl_s > life_s

    async def go():
        await generated(cache, hub, job(0, "A dog surfing", model=model, reuse="exact"), output="https://v/0")
        clock.advance(0.9 * life_s - 1.0)
        assert await cache.lookup([job(1, "A dog surfing", model=model, reuse="exact")]) == []  # served
        assert (await hub.pull(0.01))[0].output == "https://v/0"
        clock.advance(2.0)
        assert await cache.lookup([job(2, "A dog surfing", model=model, reuse="exact")]) == [0]  # made again
    run(go())
