"""A call's breakpoints where an expected fallback parts from its prefix (stop 86, ``lever86b``): at an explicit
cache (Anthropic's, the emulator's) an entry ends where a breakpoint drew a write, and a prompt reads only an entry
it holds whole. A call whose conversation has a turn waiting in a batch likely late (its fallback comes within the
TTL, ``PrefixSightings.expect``) that holds only part of the call's prefix now breaks where that turn parts from
it (``PrefixSightings.parts``, ``Decision.cache_write`` as depths), so the fallback reads that entry. Before, the
call wrote nothing for it (docs/benchmarks.md, "Stop 84", its review) and the fallback paid its prompt cold. One
rule, ``engine.core.cost.call_marks``, for the simulator and the live body; the emulator bills what the simulator
prices. No Ray."""

from __future__ import annotations

import asyncio
import random

import pytest

from engine.core.cost import CacheSplit, cache_split, price_alone, price_text
from engine.core.grouping import PrefixSightings
from engine.core.settings import Settings
from engine.runtime.scheduler import GroupTable
from engine.sim.simulator import MODES, simulate
from policies import Smart, SmartParams
from tests.unit.test_explicit_cache_entries import CAT as DEFAULT_CAT
from tests.unit.test_explicit_cache_entries import MODEL, SPEC, _provider, _req
from tests.unit.test_fallback_marks import CAT, _try, _turn
from tests.unit.test_warm_followups import PREFIX


def test_the_parts_are_the_depths_other_expected_turns_part_from_the_calls_prefix_at():
    s = PrefixSightings()
    s.expect("k", 100.0, [("a", (1, 2, 3, 4)), ("b", (1, 2, 9)), ("c", (1, 2, 3, 4, 5, 6)), ("d", (1, 7))], now=0.0)
    assert s.parts("k", 0.0, 200.0, "x", (1, 2, 3, 4, 5), least=2) == (4, 2)  # c holds it whole; d parts at 1
    assert s.parts("k", 0.0, 200.0, "a", (1, 2, 3, 4, 5), least=2) == (2,)  # a's own fallback reads nothing of it
    assert s.parts("k", 0.0, 200.0, "x", (1, 2, 3, 4, 5), least=3) == (4,)  # under the cache's minimum
    assert s.parts("k", 101.0, 200.0, "x", (1, 2, 3, 4, 5), least=2) == ()  # their calls come before the window
    assert s.parts("other", 0.0, 200.0, "x", (1, 2), least=1) == ()


class _Touched(list):
    """A key's expectations that count the entries a lookup reads."""

    touched = 0

    def __getitem__(self, i):
        _Touched.touched += 1
        return super().__getitem__(i)

    def __iter__(self):
        for e in super().__iter__():
            _Touched.touched += 1
            yield e


def test_the_parts_read_only_the_runs_that_part_not_all_of_a_system_prompts_batch():
    """10,000 turns of other conversations of one system prompt wait in a batch: a call of the key reads a few of
    them, as ``expected`` does, where a pass over all cost each sync call of the key 15 ms (88 ms at 50,000; a
    review of lever86b; fails on the code before: 10,000 read). The same depths as that pass, on 2,000 random
    sightings."""
    rng = random.Random(7)
    s = PrefixSightings()
    s.expect("k", 100.0, [(f"u{i}", (1, 2, 3, 4, *(rng.randrange(10**9) for _ in range(12)))) for i in range(10_000)]
             + [("v", (1, 2, 3, 4, 50, 51, 7))], now=0.0)
    s._due["k"] = _Touched(s._due["k"])
    _Touched.touched = 0
    assert s.parts("k", 0.0, 200.0, "x", (1, 2, 3, 4, 50, 51, 52, 53), least=2) == (6, 4)
    assert _Touched.touched < 1_000  # a few bisections a depth

    def passed(s, key, since, until, but, blocks, least):  # the pass over all, as the depths' definition
        out = set()
        for head, t, u in s._due.get(key, ()):
            k = next((i for i, (a, b) in enumerate(zip(head, blocks)) if a != b), min(len(head), len(blocks)))
            if u != but and since <= t <= until and least <= k < len(blocks):
                out.add(k)
        return tuple(sorted(out, reverse=True))

    for _ in range(2000):
        s = PrefixSightings()
        heads = [(f"u{i}", tuple(rng.randrange(3) for _ in range(rng.randrange(8)))) for i in range(rng.randrange(30))]
        s.expect("k", rng.choice([50.0, 150.0]), heads[:len(heads) // 2], now=0.0)
        s.expect("k", rng.choice([60.0, 250.0]), heads[len(heads) // 2:], now=0.0)
        args = ("k", rng.choice([0.0, 55.0]), rng.choice([100.0, 200.0, 300.0]), rng.choice(["u0", "u3", "x"]),
                tuple(rng.randrange(3) for _ in range(rng.randrange(8))), rng.randrange(4))
        assert s.parts(*args) == passed(s, *args), args


def test_a_later_turn_breaks_where_the_batched_turn_parts_from_it_and_writes_only_that():
    """The turn in a batch holds 21 blocks of the later turn's 22 (or 19 of another branch's 20): the call writes up
    to there, an entry the fallback holds whole (fails on the code before: ``cache_write`` False, nothing written)."""
    table = GroupTable(Smart(CAT), CAT)
    assert _try(table, _turn(1, 0.0, PREFIX + [7], 300.0)).mode == "batch_api"
    later = _try(table, _turn(2, 60.0, PREFIX + [7, 8], 30.0))
    assert later.mode == "sync" and later.cache_write == (21,) and "prefix marked" in later.reason
    again = _try(table, _turn(4, 70.0, PREFIX + [7, 8, 10], 30.0))  # t2's prefix sent within the TTL: its whole too
    assert again.cache_write == (23, 21)
    table = GroupTable(Smart(CAT), CAT)
    _try(table, _turn(1, 0.0, PREFIX + [7], 300.0))
    assert _try(table, _turn(3, 60.0, PREFIX[:-1] + [9], 30.0)).cache_write == (19,)  # another branch
    off = GroupTable(Smart(CAT, SmartParams(fallback_marks=False)), CAT)
    _try(off, _turn(1, 0.0, PREFIX + [7], 300.0))
    assert _try(off, _turn(2, 60.0, PREFIX + [7, 8], 30.0)).cache_write is False


def test_in_the_simulator_the_fallback_reads_what_the_later_turn_wrote_for_it():
    """t1 tries a batch (late in this world), t2 (a later turn, 22 blocks) is called at once: it writes the 21 t1
    holds and t1's fallback reads them. Before, t2 was sent plain and t1 wrote its 21 blocks itself (marked: t2's
    prefix was sent within the TTL), read by no one (fails on the code before: t2 cost its cold price)."""
    reqs = [_turn(1, 0.0, PREFIX + [7], 300.0), _turn(2, 60.0, PREFIX + [7, 8], 30.0)]
    slow = Settings.model_validate({"sim": {"turnaround_scale": 50.0}})
    on = simulate(reqs, Smart(CAT), catalog=CAT, settings=slow, seed=1)
    off = simulate(reqs, Smart(CAT, SmartParams(fallback_marks=False)), catalog=CAT, settings=slow, seed=1)
    assert [MODES[m] for m in on.mode] == ["sync", "sync"]
    assert all(on.done_at[i] <= r.deadline_at for i, r in enumerate(reqs))
    prov, spec = CAT.provider("anthropic"), CAT.model("anthropic", reqs[1].model)
    t2 = reqs[1]
    wrote21 = price_text(prov, spec, cache_split(prov, spec, t2.input_tokens, 22, 0, 21, 512), t2.output_tokens, "sync")
    assert on.cost[1] == pytest.approx(wrote21.total)
    assert on.cost[0] == pytest.approx(price_alone(reqs[0], CAT, "sync", warm_blocks=21).total)
    assert off.cost[1] == pytest.approx(price_alone(t2, CAT, "sync").total)
    assert on.total_cost < off.total_cost


def _live(clock):
    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.provider_api import Secret

    s = Settings()
    s = s.model_copy(update={"providers": s.providers.model_copy(update={"replay": True})})
    return AnthropicProvider("anthropic", DEFAULT_CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), clock)


def _sent(live, caches, prov, clock, r, write, hidden=None):
    """One sync call of `r` as the live provider builds its body, read and written by the emulator's caches:
    the job, the prompt the emulator saw and its cache split."""
    from engine.core.provider_api import CallJob
    from engine.emulator._text import anthropic_prompt

    job = CallJob(f"k{r.id}", r, 0.0, 0, 0, write)
    job = job._replace(body=live.sync_body(job))
    prompt = anthropic_prompt(job.body, None, hidden)
    return job, prompt, caches.use(prov, SPEC, MODEL, prompt, clock.now())


def test_a_calls_depths_leave_entries_the_emulator_reads_as_the_simulator_prices():
    """A call of eight blocks named (8, 4): one write of eight, an entry at four too. A prompt parting from it after
    the fourth block reads those four at the emulator and in the simulator, and pays the same in both (fails on the
    code before: the body marked only the eighth block, so the emulator read nothing, "0 == 2048")."""
    from engine.core.clock import ManualClock
    from engine.core.provider_api import CallJob, Usage
    from engine.emulator._cache import PromptCaches

    clock, prov, caches, sim = ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches(), _provider()
    live = _live(clock)
    calls = [(_req(0, list(range(1, 9)), 4196), (8, 4)), (_req(1, [1, 2, 3, 4, 50, 51], 3172), False)]
    try:
        splits = []
        for i, (r, write) in enumerate(calls):
            r = r.model_copy(update={"provider": "anthropic", "prompt": "p"})
            job, _, split = _sent(live, caches, prov, clock, r, write)  # the body as ``call`` passes it to the belief
            live._keep_warm(job, Usage(r.input_tokens, 1, split.read, split.write))
            assert sim._sync_price(r, SPEC, clock.now(), write)[0] == pytest.approx(
                price_text(prov, SPEC, split, 1, "sync").total)
            splits.append(split)
            clock.advance(1.0)
    finally:
        asyncio.run(live.close())
    assert splits[0] == CacheSplit(0, 4096, 100) and splits[1].read == 2048
    assert live._warm_blocks(CallJob("k9", calls[1][0], 0.0, 0, 0)) == 4  # the belief keeps the entry at four


def test_live_sync_bodies_with_depths_cost_at_the_emulator_what_the_simulator_prices_call_by_call():
    """As ``test_explicit_cache_entries``'s 400 calls, some now naming depths (a subset of their prefix's lengths,
    the deepest first): each costs at the emulator what the simulator prices."""
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Usage
    from engine.emulator._cache import PromptCaches

    clock, prov, caches, sim = ManualClock(0.0), DEFAULT_CAT.provider("anthropic"), PromptCaches(), _provider()
    live = _live(clock)
    rng, ids = random.Random(86), {}
    try:
        for i in range(300):
            path = tuple([rng.randrange(2)] + [rng.randrange(2) for _ in range(rng.randrange(7))])
            blocks = [ids.setdefault(path[:k + 1], len(ids) + 1) for k in range(len(path))]
            r = _req(i, blocks, 512 * len(blocks) + rng.choice([100, -100, -300, 600]))
            r = r.model_copy(update={"provider": "anthropic", "prompt": "p"})
            clock.advance(400.0 if rng.random() < 0.05 else 40.0 + rng.random() * 0.01)
            u = rng.random()
            write = (tuple(sorted(rng.sample(range(1, len(blocks) + 1), rng.randint(1, len(blocks))), reverse=True))
                     if u < 0.5 else u < 0.8)
            job, prompt, split = _sent(live, caches, prov, clock, r, write)
            live._keep_warm(job, Usage(r.input_tokens, 1, split.read, split.write))
            assert sim._sync_price(r, SPEC, clock.now(), write)[0] == pytest.approx(
                price_text(prov, SPEC, split, 1, "sync").total), (i, blocks, r.input_tokens, write, split)
    finally:
        asyncio.run(live.close())


def test_the_live_belief_notes_the_entries_a_calls_body_broke_at_not_its_depths_drawn_again_at_the_read():
    """The belief holds an entry of eight blocks the provider no longer has: a call named (10, 6, 4) breaks at eight
    (its belief) and ten, and writes ten from nothing, which leaves entries at eight and ten. Its depths drawn again
    at its read (0) noted entries at six and four, never marked: the next calls that hold six or four were marked
    there and billed a write of what they would have sent plain, a belief of warmth that could also pull a turn
    out of its batch (a review of lever86b; fails on the code before: "[6, 4, 8, 10] == [0, 0, 8, 10]"). The
    belief now reads the body's marks."""
    from engine.core.clock import ManualClock
    from engine.core.grouping import WarmNote
    from engine.core.provider_api import CallJob, Usage
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    clock, prov, caches = ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches()
    live, ten = _live(clock), list(range(1, 11))
    up = {"provider": "anthropic", "prompt": "p"}
    try:
        live._warm.see([WarmNote("anthropic", MODEL, tuple(ten[:8]), 400.0)], 10.0)
        job = CallJob("k0", _req(0, ten).model_copy(update=up), 0.0, 0, 0, (10, 6, 4))
        job = job._replace(body=live.sync_body(job))
        assert [k for k, c in enumerate(job.body["messages"][0]["content"]) if "cache_control" in c] == [7, 9]
        split = caches.use(prov, SPEC, MODEL, anthropic_prompt(job.body), clock.now())
        assert (split.read, split.write) == (0, 5120)
        live._keep_warm(job, Usage(job.req.input_tokens, 1, split.read, split.write))
        clock.advance(1.0)
        believed = [live._warm_blocks(CallJob(f"q{k}", _req(k, ten[:k] + [90 + k]).model_copy(update=up), 0.0, 0, 0))
                    for k in (6, 4, 8, 10)]
    finally:
        asyncio.run(live.close())
    assert believed == [0, 0, 8, 10]  # what the emulator holds


def test_a_calls_depths_reach_the_dispatchers_gate_as_decided():
    """A call waits at its dispatcher's gate as a ``Work`` whose ``cache_write`` the body is built from when the gate
    lets it start: queued as ``cache_write and kind in (...)``, the depths became ``True`` and the live call wrote
    its whole prefix, where the simulator priced the depths (fails on the code before: "True == (21,)")."""
    from actors import Dispatcher, ResultHub
    from actors._types import BatchJob, Job
    from engine.core.clock import ManualClock
    from tests.unit.helpers import Recorder
    from tests.unit.test_actors import CAT as ACTORS_CAT
    from tests.unit.test_actors import ledger, req

    async def go():
        d = Dispatcher("openai", ACTORS_CAT, Settings(), 0, ManualClock(0.0), [Recorder()], ResultHub(), None,
                       ledger(100.0))
        queued = []
        d.sim.enqueue = queued.append
        for kind, write in (("sync", (21,)), ("sync", True), ("batch_api", (21,))):
            job = Job(0, req(0), "fp")
            d._enqueue(kind, BatchJob("b", kind, None, write, "process_individually", "now", [job]), [job])
        return [w.cache_write for w in queued]

    assert asyncio.run(go()) == [(21,), True, False]


def test_the_live_belief_counts_blocks_past_the_bodys_own_system_text():
    """A replayed line whose body carries a system text of its own (2 tokens) puts those tokens first, so its
    usage counts them: a read of its two-block entry is 1,026 tokens, which the belief took for three blocks, an
    entry never written. The next turn, of four blocks, was marked at the third and paid a write of it, priced
    plain by the simulator (a review of stop 86, "a belief a block too deep"; fails on the code before: the
    emulator billed 0.0040728 against 0.0036942 priced, the belief 3). The system's own tokens are read with the
    entry at the emulator, priced plain by the simulator: a few tokens' worth, within the tolerance here."""
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Usage
    from engine.emulator._cache import PromptCaches

    clock, prov, caches, sim = ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches(), _provider()
    live, believed, splits = _live(clock), [], []
    try:
        for i, (blocks, write) in enumerate([([1, 2], True), ([1, 2, 3], False), ([1, 2, 3, 4], False)]):
            r = _req(i, blocks, 512 * len(blocks) + 100).model_copy(
                update={"provider": "anthropic", "prompt": "p", "body": {"system": "abcdefgh"}})
            job, prompt, split = _sent(live, caches, prov, clock, r, write)
            believed.append(live._keep_warm(job, Usage(r.input_tokens, 1, split.read, split.write)))
            assert sim._sync_price(r, SPEC, clock.now(), write)[0] == pytest.approx(
                price_text(prov, SPEC, split, 1, "sync").total, rel=1e-2), (i, split)
            splits.append(split)
            clock.advance(1.0)
    finally:
        asyncio.run(live.close())
    assert [s.read > 0 for s in splits] == [False, True, True] and splits[2].write == 0
    assert believed == [2, 2, 2]  # the one entry the emulator holds, two blocks and the system before them


_FOUR_MARKS = {"system": [{"type": "text", "text": f"rule {k}", "cache_control": {"type": "ephemeral"}}
                          for k in range(4)]}
_MESSAGES = {"messages": [{"role": "user", "content": "a question of the caller's own " * 150}]}


@pytest.mark.parametrize("body", [_FOUR_MARKS, _MESSAGES], ids=["four-own-marks", "messages"])
def test_a_body_that_leaves_the_engine_no_breakpoint_is_priced_as_the_wire_bills_it(body):
    """A replayed line whose body carries four ``cache_control`` marks of its own leaves the engine none of
    Anthropic's four; a body of messages (a caller's own prompt) is sent as written. Either way the wire marks none
    of its prefix blocks, and the emulator bills them plain, where the simulator priced a write of two blocks and
    then reads of them (a review of stop 86, "bodies with 3-4 marks of their own" and "a real prompt renders no
    blocks"; fails on the code before: the first call priced 0.004152 against 0.003384 at the emulator with four
    marks, 0.004272 against 0.003504 of messages). Each call
    now costs what the emulator bills, and the belief holds none of its blocks."""
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Usage
    from engine.emulator._cache import PromptCaches

    clock, prov, caches, sim = ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches(), _provider()
    live, believed = _live(clock), []
    try:
        for i, (blocks, write) in enumerate([([1, 2], True), ([1, 2, 3], False), ([1, 2, 3], (3, 2))]):
            r = _req(i, blocks, 512 * len(blocks) + 100).model_copy(
                update={"provider": "anthropic", "prompt": "p", "body": body})
            job, prompt, split = _sent(live, caches, prov, clock, r, write)
            believed.append(live._keep_warm(job, Usage(prompt.tokens, 1, split.read, split.write)))
            r = r.model_copy(update={"input_tokens": prompt.tokens})  # the caller's prompt, counted as the wire does
            assert sim._sync_price(r, SPEC, clock.now(), write)[0] == pytest.approx(
                price_text(prov, SPEC, split, 1, "sync").total, rel=1e-3), (i, split)
            clock.advance(1.0)
    finally:
        asyncio.run(live.close())
    assert believed == [0, 0, 0]


@pytest.mark.parametrize("body", [_FOUR_MARKS, _MESSAGES], ids=["four-own-marks", "messages"])
def test_a_batch_of_bodies_that_leave_no_breakpoint_is_priced_as_the_wire_bills_it(body):
    """As above, members of one batch: the simulator priced the first member's write of the shared blocks and the
    later members' reads of them, the wire marked none (fails on the code before: "Mismatched elements: 5 / 5"
    with four marks and of messages)."""
    from engine.core.clock import ManualClock
    from engine.core.cost import price_batch
    from engine.core.provider_api import CallJob
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    live, first = _live(ManualClock(0.0)), list(range(1, 11))
    paths = [first] + [first[:k] + [100 + k] for k in (4, 6, 8)] + [first + [99]]
    reqs = [_req(i, p, 512 * len(p) + 100).model_copy(update={"provider": "anthropic", "prompt": "p", "body": body})
            for i, p in enumerate(paths)]
    try:
        bodies = live.batch_body([CallJob(f"k{i}", r, 0.0, 0, 0, False) for i, r in enumerate(reqs)])
    finally:
        asyncio.run(live.close())
    prov, caches = DEFAULT_CAT.provider("anthropic"), PromptCaches()
    prompts = [anthropic_prompt(b["params"]) for b in bodies]
    billed = [price_text(prov, SPEC, caches.use(prov, SPEC, MODEL, p, 10.0), 1, "batch_api").total for p in prompts]
    reqs = [r.model_copy(update={"input_tokens": p.tokens}) for r, p in zip(reqs, prompts, strict=True)]
    assert billed == pytest.approx([p.total for p in price_batch(reqs, DEFAULT_CAT, "batch_api")], rel=1e-3)


_EPHEMERAL = {"type": "ephemeral"}
_TOOL = {"name": "lookup", "description": "finds a record " * 100, "input_schema": {"type": "object", "properties": {}}}


def test_the_live_belief_counts_blocks_past_the_bodys_own_tools_too():
    """Tools come before the system text in Anthropic's prompt, and with them the system prompt Anthropic adds for
    tool use (the catalog's ``tool_prompt``, 346 tokens): a replayed line with one tool of 396 tokens read its
    two-block entry as 1,768 tokens, which the belief took for three blocks, and the next turn was marked at the
    third and paid a write of 512 tokens at 1.25x, which the simulator does not price (a review of ``fid86``, which
    counted the system text alone; fails on the code before: "512 == 0", believed [2, 3, 4])."""
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Usage
    from engine.emulator._cache import PromptCaches

    clock, prov, caches = ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches()
    live, believed, splits, hidden = _live(clock), [], [], DEFAULT_CAT.tool_prompt("anthropic", MODEL)
    try:
        for i, (blocks, write) in enumerate([([1, 2], True), ([1, 2, 3], False), ([1, 2, 3, 4], False)]):
            r = _req(i, blocks, 512 * len(blocks) + 100).model_copy(
                update={"provider": "anthropic", "prompt": "p", "body": {"system": "abcdefgh", "tools": [_TOOL]}})
            job, prompt, split = _sent(live, caches, prov, clock, r, write, hidden)
            believed.append(live._keep_warm(job, Usage(r.input_tokens, 1, split.read, split.write)))
            splits.append(split)
            clock.advance(1.0)
    finally:
        asyncio.run(live.close())
    assert [s.read > 0 for s in splits] == [False, True, True] and splits[2].write == 0, splits
    assert believed == [2, 2, 2]


def test_the_live_belief_notes_no_blocks_of_a_body_sent_as_written():
    """Outside a replay a body's prompt is the caller's question, sent as written (``message_parts``): no prefix
    block goes on the wire, yet the read of the body's own marked system text (1,250 tokens) was taken for two of
    the blocks the request named, believed warm for the policy's next estimate though no entry holds them (a review
    of ``fid86``; fails on the code before: believed [2, 2, 2])."""
    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.clock import ManualClock
    from engine.core.provider_api import Secret, Usage
    from engine.emulator._cache import PromptCaches

    s, clock, prov, caches = Settings(), ManualClock(10.0), DEFAULT_CAT.provider("anthropic"), PromptCaches()
    live = AnthropicProvider("anthropic", DEFAULT_CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), clock)
    body, believed, splits = {"system": [{"type": "text", "text": "rule " * 1000, "cache_control": _EPHEMERAL}]}, [], []
    try:
        for i, blocks in enumerate([[1, 2], [1, 2, 3], [1, 2, 3, 4]]):
            r = _req(i, blocks, 512 * len(blocks) + 1300).model_copy(
                update={"provider": "anthropic", "prompt": "what is the rule?", "body": body})
            job, prompt, split = _sent(live, caches, prov, clock, r, True)
            believed.append(live._keep_warm(job, Usage(prompt.tokens, 1, split.read, split.write)))
            splits.append(split)
            clock.advance(1.0)
    finally:
        asyncio.run(live.close())
    assert [s.read for s in splits] == [0, 1250, 1250]  # the caller's own entry, read at 0.1x all the same
    assert believed == [0, 0, 0]


def test_a_responses_body_has_no_room_without_its_input_translated(monkeypatch):
    """A Responses body goes to Anthropic as messages, so the engine marks none of it (``mark_room`` 0); the rule
    asked ``as_messages``, which translated the whole ``input`` at each price of each member (94 us a call at 50
    items where the count of marks took 0.9 us: the policy prices every candidate batch; a review of ``fid86``;
    fails on the code before: "2 == 0" translations). A body that cannot be translated is refused, priced nothing."""
    import engine.core.responses_input as responses_input
    from engine.core._cost_cache import mark_room

    translated = []
    monkeypatch.setattr(responses_input, "_translate", lambda *a, **k: translated.append(a) or {"messages": []})
    resp = {"instructions": "be brief", "input": [{"role": "user", "content": "hi"}] * 50}
    assert [mark_room(resp), mark_room({"input": "hi"}), mark_room(_MESSAGES), mark_room(None)] == [0, 0, 0, 4]
    assert mark_room({"system": [{"type": "text", "text": "r", "cache_control": _EPHEMERAL}]}) == 3
    assert len(translated) == 0
