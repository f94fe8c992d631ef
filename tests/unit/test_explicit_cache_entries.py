"""The simulator's explicit prompt cache (Anthropic's) reads as the provider and the emulator do: an entry ends
where a write ended, and a call reads only an entry whose whole prefix its prompt holds. Read block by block, a
shorter turn read the leading blocks of a longer turn's write (Mooncake seeds 0-3: 46-57 batch members a seed,
docs/simulator.md, "Explicit caches"). The emulator's own rule:
``test_fallback_marks.py::test_at_the_emulators_explicit_cache_a_write_is_read_only_by_a_prompt_that_holds_it_whole``.
No Ray; the provider is the simulator's, driven directly."""

from __future__ import annotations

import pytest

from engine.core.catalog import default_catalog
from engine.core.cost import price_alone, price_batch
from engine.core.draws import Draws
from engine.core.request import Request
from engine.core.settings import Settings
from engine.runtime.providers import SimProvider

CAT = default_catalog()
MODEL = "claude-sonnet-4-5"
SPEC = CAT.provider("anthropic").models[MODEL]


def _req(i: int, blocks: list[int], tokens: int | None = None) -> Request:
    return Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": MODEL, "output_tokens": 1,
                                   "input_tokens": tokens or 512 * len(blocks), "prefix_blocks": blocks})


def _provider() -> SimProvider:
    s = Settings()
    return SimProvider(CAT.provider("anthropic"), CAT, s, Draws(10, s.sim.max_attempts, 0, s.sim.batch_slot_s),
                       draw=False)


def test_a_shorter_turn_reads_nothing_of_a_longer_turns_write_and_a_longer_one_reads_it_whole():
    """An eight-block write, then at once a four-block prompt that starts with it: no entry ends at its fourth
    block, so it is sent plain (before: it read the four blocks). A ten-block prompt that holds the eight reads
    them, and a write of its own leaves an entry at its tenth block, which the next ten-block turn reads whole."""
    prov = _provider()
    long_ = list(range(1, 9))
    prov._sync_price(_req(0, long_), SPEC, 10.0, True)
    short_price, short_cached = prov._sync_price(_req(1, long_[:4]), SPEC, 11.0, False)
    assert (short_price, short_cached) == (price_alone(_req(1, long_[:4]), CAT, "sync").total, 0)
    longer = long_ + [9, 10]
    _, cached = prov._sync_price(_req(2, longer), SPEC, 12.0, True)
    assert cached == 10  # it read eight and wrote two
    _, again = prov._sync_price(_req(3, longer + [11]), SPEC, 13.0, False)
    assert again == 10


def test_a_turn_that_parts_from_a_write_reads_only_an_entry_both_hold():
    """Block ids name a whole prefix, so a prompt parting from an eight-block write after its fourth block
    shares blocks 1-4 and no entry ends there: it reads nothing. An earlier four-block write makes that entry."""
    prov = _provider()
    prov._sync_price(_req(0, list(range(1, 9))), SPEC, 10.0, True)
    parting = [1, 2, 3, 4, 50, 51]
    assert prov._sync_price(_req(1, parting), SPEC, 11.0, False)[1] == 0
    prov._sync_price(_req(2, [1, 2, 3, 4]), SPEC, 12.0, True)
    assert prov._sync_price(_req(3, parting), SPEC, 13.0, False)[1] == 4


def test_an_entry_ends_at_the_writes_last_whole_block():
    """A prompt's partial last block goes with its tail (the live body marks its last whole block), so the same
    prompt sent again reads its whole blocks only: 3,584 of 4,000 tokens (before: all 4,000)."""
    prov = _provider()
    r = _req(0, list(range(1, 9)), tokens=4000)
    prov._sync_price(r, SPEC, 10.0, True)
    assert prov._sync_price(_req(1, list(range(1, 9)), tokens=4000), SPEC, 11.0, False)[1] == 7


def test_in_a_batch_a_member_reads_only_the_entry_an_earlier_member_wrote_whole():
    """Members run in order: the first marks the eight blocks the second shares, and a later batch's member
    holding only four of them reads nothing of that entry (before stop 84: it read four blocks of the write). At
    an automatic cache it still reads its four blocks (OpenAI keeps every prefix)."""
    a, b, c = _req(0, list(range(1, 9))), _req(1, list(range(1, 10))), _req(2, [1, 2, 3, 4])
    left: list[tuple[int, ...]] = []  # what the simulator keeps warm: the ends of the entries
    prices = price_batch([a, b], CAT, "batch_api", left=left)
    assert prices[1].total < price_alone(b, CAT, "batch_api").total  # it reads the first's eight blocks
    assert left == [(8,), (8,)]  # the second refreshes the entry it read
    later = price_batch([c], CAT, "batch_api", warm=[e for ends in left for e in ends])
    assert later[0].total == pytest.approx(price_alone(c, CAT, "batch_api").total)
    auto = [r.model_copy(update={"provider": "openai", "model": "gpt-5"}) for r in (a, b, c)]
    assert price_batch(auto, CAT, "batch_api")[2].total < price_alone(auto[2], CAT, "batch_api").total


def test_a_member_leaves_an_entry_where_a_later_member_parts_from_it_sooner_at_the_same_write():
    """A write is billed once up to its last breakpoint and leaves an entry at each (Anthropic takes four a
    request): the first member, whose eight blocks the second shares, also puts a breakpoint at its fourth block,
    the whole of what the third holds of it, so the third reads those four, and the first pays what its one
    write cost before (stop 86; before: the third was sent plain, "0.0030795 == 0.0003147")."""
    a, b, c = _req(0, list(range(1, 9))), _req(1, list(range(1, 10))), _req(2, [1, 2, 3, 4])
    left: list[tuple[int, ...]] = []
    prices = price_batch([a, b, c], CAT, "batch_api", left=left)
    assert prices[0].total == pytest.approx(price_batch([a, b], CAT, "batch_api")[0].total)  # the same write
    from engine.core.cost import CacheSplit, price_text
    read4 = price_text(CAT.provider("anthropic"), SPEC, CacheSplit(2048, 0, 0), 1, "batch_api").total
    assert prices[2].total == pytest.approx(read4)
    assert left == [(4, 8), (8,), (4,)]  # each entry's end; the third refreshes the one it read


def test_a_member_puts_at_most_anthropics_four_breakpoints_the_deepest_kept():
    """Five later members parting from a ten-block member at 3, 4, 6, 8 and 10 blocks: it writes the ten and
    leaves entries at the three deepest of the others (four breakpoints); the member parting at three reads
    nothing. With a warm entry read at two blocks, that read takes one of the four: two more at most."""
    from engine.core.cost import entry_marks, shared_prefix_depths

    first = list(range(1, 11))
    later = [first[:k] + [100 + k] for k in (3, 4, 6, 8)] + [first + [99]]
    reqs = [_req(0, first)] + [_req(i + 1, blocks) for i, blocks in enumerate(later)]
    depths = shared_prefix_depths(reqs, 512, 1024)
    assert depths[0] == (10, 8, 6, 4, 3)
    assert entry_marks(depths[0], 0, 10, 512, 1024) == (10, 8, 6, 4)
    assert entry_marks(depths[0], 2, 10, 512, 1024) == (10, 8, 6)
    assert entry_marks(depths[0], 8, 10, 512, 1024) == (10,)  # only past its read
    assert entry_marks((10, 8, 1), 0, 10, 512, 1024) == (10, 8)  # one block: under Sonnet's 1,024 tokens
    left: list[tuple[int, ...]] = []
    prices = price_batch(reqs, CAT, "batch_api", left=left)
    assert left[0] == (4, 6, 8, 10)
    # The one parting at three reads nothing (it pays as if first in the batch: it writes for the others).
    assert prices[1].total == pytest.approx(price_batch(reqs[1:], CAT, "batch_api")[0].total)
    assert prices[2].total < price_batch(reqs[2:], CAT, "batch_api")[0].total  # the one parting at four reads


def test_the_simulator_bills_a_run_of_writing_calls_as_the_emulators_cache_does():
    """150 calls at one Sonnet, each marking its whole prefix (as a marked call's body does), whose prompts
    share, extend and part from one another's (block ids drawn along a tree, as Mooncake's name a whole prefix),
    now and then after the TTL: each call costs in the simulator what the emulator's cache splits it into
    (before: the first shorter or parting prompt after a longer write was priced reading blocks the emulator
    sent plain)."""
    import random

    from engine.core.cost import price_text
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import Prompt

    prov, rng = CAT.provider("anthropic"), random.Random(84)
    caches, sim, ids = PromptCaches(), _provider(), {}
    block = 512 * 4  # characters of a 512-token block
    t = 0.0
    for i in range(150):
        path = tuple([rng.randrange(3)] + [rng.randrange(2) for _ in range(rng.randrange(9))])
        blocks = [ids.setdefault(path[:k + 1], len(ids) + 1) for k in range(len(path))]
        t += 400.0 if rng.random() < 0.05 else 2.0
        text = "".join(f"{b:0{block}d}" for b in blocks)
        bounds = tuple(block * (k + 1) for k in range(len(blocks)))
        split = caches.use(prov, SPEC, MODEL, Prompt(text + "t" * 400, (bounds[-1],), "t", bounds), t)
        req = _req(i, blocks, tokens=512 * len(blocks) + 100)
        assert sim._sync_price(req, SPEC, t, True)[0] == pytest.approx(
            price_text(prov, SPEC, split, req.output_tokens, "sync").total), (i, blocks, split)


def test_a_write_ends_at_the_prompts_last_whole_block_and_bills_its_partial_block_plain():
    """The live body renders a partial last block with the tail and marks its last whole block, so Anthropic (and
    the emulator) writes 3,584 of a 4,000-token, eight-block prompt and sends 416 plain. The simulator billed the
    416 as a write too (1.25x, not 1x), on every writing call, a sync one or a batch member marked for a later one."""
    from engine.core.cost import CacheSplit, price_text

    prov = CAT.provider("anthropic")
    blocks = list(range(1, 9))
    live = price_text(prov, SPEC, CacheSplit(0, 3584, 416), 1, "sync").total
    assert _provider()._sync_price(_req(0, blocks, tokens=4000), SPEC, 10.0, True)[0] == pytest.approx(live)
    first, again = price_batch([_req(0, blocks, tokens=4000), _req(1, blocks, tokens=4000)], CAT, "batch_api")
    assert first.total == pytest.approx(price_text(prov, SPEC, CacheSplit(0, 3584, 416), 1, "batch_api").total)
    assert again.total == pytest.approx(price_text(prov, SPEC, CacheSplit(3584, 0, 416), 1, "batch_api").total)


def test_the_live_batch_body_marks_only_where_an_entry_ends_so_anthropic_bills_what_the_simulator_prices():
    """The live batch body also marked each member at the run of blocks an earlier member merely held: a four-block
    member after an eight-block write got a breakpoint at its fourth block, where no entry ends, and Anthropic (the
    emulator) wrote it, 1.25x where the simulator priced it plain. Each member's body, sent to the emulator's cache
    in order, now costs what ``price_batch`` prices it."""
    import asyncio

    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.clock import ManualClock
    from engine.core.cost import price_text
    from engine.core.provider_api import CallJob, Secret
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    s = Settings()
    s = s.model_copy(update={"providers": s.providers.model_copy(update={"replay": True})})
    live = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), ManualClock(0.0))
    reqs = [_req(0, list(range(1, 9)), 4196), _req(1, list(range(1, 10)), 4708), _req(2, [1, 2, 3, 4], 2148),
            _req(3, [1, 2, 3, 4, 5, 6], 3172)]
    reqs = [r.model_copy(update={"provider": "anthropic", "prompt": "p"}) for r in reqs]
    try:
        bodies = live.batch_body([CallJob(f"k{i}", r, 0.0, 0, 0, False) for i, r in enumerate(reqs)])
    finally:
        asyncio.run(live.close())
    prov, caches = CAT.provider("anthropic"), PromptCaches()
    billed = [price_text(prov, SPEC, caches.use(prov, SPEC, MODEL, anthropic_prompt(b["params"]), 10.0), 1,
                         "batch_api").total for b in bodies]
    assert billed == pytest.approx([p.total for p in price_batch(reqs, CAT, "batch_api")])
    # Since stop 86 the first member's body also breaks at the four and six blocks the later ones hold of it, in
    # its one write: the emulator reads them those entries (before: the third wrote its four blocks again for the
    # fourth, 0.0039975 at the emulator against 0.0032295 alone).
    assert [sum("cache_control" in c for c in b["params"]["messages"][0]["content"]) for b in bodies] == [3, 2, 1, 1]
    assert billed[2] < price_alone(reqs[2], CAT, "batch_api").total
    assert billed[3] < price_alone(reqs[3], CAT, "batch_api").total


def test_live_sync_bodies_sent_to_the_emulator_cost_what_the_simulator_prices_call_by_call():
    """400 sync calls at one Sonnet through the live body (its marks from its own belief of the cache) and the
    emulator's cache, prompts along a small tree with partial last blocks, 40 s apart (a read keeps an entry past
    its write's TTL), some asking for a write: each costs what the simulator prices. Before: the simulator billed a
    partial last block as written; the body marked the believed run of warm blocks, inside an entry, which
    Anthropic then writes; and the belief let an entry a hit refreshed go cold (scratch, 400 calls: 169 differed)."""
    import asyncio
    import random

    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.clock import ManualClock
    from engine.core.cost import price_text
    from engine.core.provider_api import CallJob, Secret, Usage
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    s = Settings()
    s = s.model_copy(update={"providers": s.providers.model_copy(update={"replay": True})})
    clock, prov, caches, sim = ManualClock(0.0), CAT.provider("anthropic"), PromptCaches(), _provider()
    live = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), clock)
    rng, ids = random.Random(7), {}
    try:
        for i in range(400):
            path = tuple([rng.randrange(2)] + [rng.randrange(2) for _ in range(rng.randrange(6))])
            blocks = [ids.setdefault(path[:k + 1], len(ids) + 1) for k in range(len(path))]
            r = _req(i, blocks, 512 * len(blocks) + rng.choice([100, -100, -300, 600]))
            r = r.model_copy(update={"provider": "anthropic", "prompt": "p"})
            clock.advance(400.0 if rng.random() < 0.05 else 40.0 + rng.random() * 0.01)
            job = CallJob(f"k{i}", r, 0.0, 0, 0, rng.random() < 0.6)
            split = caches.use(prov, SPEC, MODEL, anthropic_prompt(live.sync_body(job)), clock.now())
            live._keep_warm(job, Usage(r.input_tokens, 1, split.read, split.write))
            assert sim._sync_price(r, SPEC, clock.now(), job.cache_write)[0] == pytest.approx(
                price_text(prov, SPEC, split, 1, "sync").total), (i, blocks, r.input_tokens, split)
    finally:
        asyncio.run(live.close())


@pytest.mark.parametrize("mode", ["sync", "batch_api"])
def test_a_member_marks_no_block_a_later_one_holds_only_in_its_partial_last_block(mode):
    """A later member of 1,535 tokens holds blocks 1-2 whole and block 3 in its tail, so it reads an entry at
    block 2, never one at block 3: the writer marks two blocks, not three, and the batch costs no more than its
    members alone (hypothesis found it: $0.010365 against $0.009213)."""
    writer, reader = _req(0, [1, 2, 3], 1536), _req(1, [1, 2, 3, 4], 1535)
    together = price_batch([writer, reader], CAT, mode)
    assert sum(p.total for p in together) < sum(price_alone(r, CAT, mode).total for r in (writer, reader))
    assert together[1].cached_input > 0  # it reads the writer's two blocks


def test_a_batch_members_entries_fit_the_four_breakpoints_its_bodys_own_marks_leave():
    """A replayed member whose body carries two marks of its own (its system) has room for two breakpoints of the
    engine's: the furthest were kept on the wire and the entries at four and six blocks never written, while the
    simulator priced them read and the later members were marked there as if they were, so Anthropic (the
    emulator) billed them a write (a review of stop 86: 0.0047651 against 0.0012327, 0.0031472 against
    0.0013863). Each entry now fits the room the body leaves, in the simulator and on the wire alike."""
    import asyncio

    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.clock import ManualClock
    from engine.core.cost import price_text
    from engine.core.provider_api import CallJob, Secret
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    s = Settings()
    s = s.model_copy(update={"providers": s.providers.model_copy(update={"replay": True})})
    live = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), ManualClock(0.0))
    system = [{"type": "text", "text": f"rule {k}", "cache_control": {"type": "ephemeral"}} for k in range(2)]
    first = list(range(1, 11))
    paths = [first] + [first[:k] + [100 + k] for k in (4, 6, 8)] + [first + [99]]
    reqs = [_req(i, p, 512 * len(p) + 100).model_copy(update={"provider": "anthropic", "prompt": "p",
                                                               "body": {"system": system}})
            for i, p in enumerate(paths)]
    try:
        bodies = live.batch_body([CallJob(f"k{i}", r, 0.0, 0, 0, False) for i, r in enumerate(reqs)])
    finally:
        asyncio.run(live.close())
    prov, caches = CAT.provider("anthropic"), PromptCaches()
    billed = [price_text(prov, SPEC, caches.use(prov, SPEC, MODEL, anthropic_prompt(b["params"]), 10.0), 1,
                         "batch_api").total for b in bodies]
    # The system's few tokens sit in the emulator's prefix and not in the simulator's blocks: a hundredth apart.
    assert billed == pytest.approx([p.total for p in price_batch(reqs, CAT, "batch_api")], rel=1e-2)
    assert [sum("cache_control" in c for c in b["params"]["messages"][0]["content"]) for b in bodies][0] == 2


def test_the_live_belief_keeps_a_members_shallower_entries_when_the_member_that_parts_there_fails():
    """The first member writes eight blocks and breaks at the fourth for the third, which fails: the simulator keeps
    that entry warm (its writer ran), and the live provider, which noted only what each call read or wrote whole,
    did not, so the next batch's four-block member was sent plain where the simulator priced a read (a review of
    stop 86: 0.0039975 at the emulator against 0.0012327). The belief now notes the entries the body broke at."""
    import asyncio

    from actors.providers.anthropic_http import AnthropicProvider
    from engine.core.clock import ManualClock
    from engine.core.cost import price_text
    from engine.core.provider_api import CallJob, Secret, Usage
    from engine.emulator._cache import PromptCaches
    from engine.emulator._text import anthropic_prompt

    s = Settings()
    s = s.model_copy(update={"providers": s.providers.model_copy(update={"replay": True})})
    live = AnthropicProvider("anthropic", CAT, s, s.providers.endpoints["anthropic"], Secret("sk-x"), ManualClock(0.0))
    prov, caches, warm = CAT.provider("anthropic"), PromptCaches(), set()
    first = list(range(1, 9))
    batches = [([first, first + [9], first[:4] + [50]], [2]), ([first[:4] + [60]], [])]
    billed, priced = [], []
    try:
        for n, (paths, failed) in enumerate(batches):
            reqs = [_req(10 * n + i, p, 512 * len(p) + 100).model_copy(update={"provider": "anthropic", "prompt": "p"})
                    for i, p in enumerate(paths)]
            jobs = [CallJob(r.id, r, 0.0, 0, 0, False) for r in reqs]
            bodies, left = live.batch_body(jobs), []
            prices = price_batch(reqs, CAT, "batch_api", warm=warm, failed=failed, left=left)
            for i, (j, b, p, ends) in enumerate(zip(jobs, bodies, prices, left, strict=True)):
                if i in failed:  # billed nothing, read and wrote nothing
                    continue
                warm.update(ends)
                split = caches.use(prov, SPEC, MODEL, anthropic_prompt(b["params"]), 10.0 + n)
                live._keep_warm(j, Usage(split.read + split.write + split.plain, 1, split.read, split.write))
                billed.append(price_text(prov, SPEC, split, 1, "batch_api").total)
                priced.append(p.total)
    finally:
        asyncio.run(live.close())
    assert billed == pytest.approx(priced)
    assert priced[-1] < price_alone(_req(10, first[:4] + [60], 2148), CAT, "batch_api").total  # the read priced
