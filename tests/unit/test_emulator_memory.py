"""A long-running emulator keeps a bounded number of records while every total it reports stays exact."""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator

import anthropic
import openai
import pytest

from engine.core.clock import ManualClock
from engine.core.errors import ConfigError
from engine.emulator import Emulator
from engine.emulator._core import KEEP_ANSWERS_S

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")

KEY = "sk-EMULATOR-MEMORY-KEY"
KEEP = 4


def _ask(emu: Emulator, key: str, out: int) -> None:
    with openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0) as oai:
        oai.chat.completions.create(model="gpt-5-mini", extra_headers={"Idempotency-Key": key},
                                    messages=[{"role": "user", "content": f"{key} [[emulator:output_tokens={out}]]"}])


def _run(emu: Emulator) -> None:
    """Twelve calls of varied prices over both wire formats: answers, a refusal, keyed calls and a replay."""
    oai = openai.OpenAI(base_url=emu.base_url("openai"), api_key=KEY, max_retries=0)
    # the key in x-api-key, as Anthropic authenticates it (the installed SDK sends its api_key as a Bearer token)
    ant = anthropic.Anthropic(base_url=emu.anthropic_base_url("anthropic"), api_key=KEY, max_retries=0,
                              default_headers={"X-Api-Key": KEY, "Authorization": anthropic.Omit()})
    try:
        for i in range(6):
            _ask(emu, f"k{i}", i)
        for i in range(4):
            ant.messages.create(model="claude-haiku-4-5", max_tokens=64,
                                messages=[{"role": "user", "content": f"a{i} [[emulator:output_tokens={7 * i}]]"}])
        with pytest.raises(openai.APIStatusError):
            oai.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
        _ask(emu, "k5", 5)  # among the latest answers kept: replayed, billed nothing more
    finally:
        oai.close()
        ant.close()


@pytest.fixture
def emus() -> Iterator[tuple[Emulator, Emulator]]:
    # At speed-up 1 the hour an answer is kept at least (KEEP_ANSWERS_S) cannot pass during a test, however slow.
    with Emulator(latency_scale=0.0, speedup=1.0, keep_records=KEEP) as small, \
            Emulator(latency_scale=0.0, speedup=1.0) as whole:
        yield small, whole


def test_records_are_bounded_and_every_total_stays_exact(emus: tuple[Emulator, Emulator],
                                                         caplog: pytest.LogCaptureFixture) -> None:
    small, whole = emus
    with caplog.at_level(logging.WARNING, logger="engine.emulator"):
        _run(small)
    _run(whole)  # the twin keeps every record: the reference
    kept, full = small.bill(), whole.bill()
    # What a run with every record gives, to the last bit, from KEEP records.
    assert (kept.total_usd, kept.by_provider, kept.by_model) == (full.total_usd, full.by_provider, full.by_model)
    assert len(full.items) == full.items_billed == kept.items_billed and kept.items_billed > KEEP
    assert kept.items == full.items[-KEEP:] and kept.items_dropped == kept.items_billed - KEEP
    assert len(small.calls) == KEEP and len(whole.calls) == 12
    assert small.counters() == whole.counters()
    for route, status in (("chat.completions", None), ("chat.completions", 200), ("messages", 200),
                          ("chat.completions", 404)):
        assert small.count(route, status=status) == whole.count(route, status=status)
    said = [r.getMessage() for r in caplog.records if r.name == "engine.emulator"]
    # Records and items; the keyed answers (6 of them, within the hour) are all kept.
    assert len(said) == 2 and all("keep_records" in m and str(KEEP) in m for m in said), said
    origin = small.base_url("openai").rsplit("/openai/", 1)[0]
    counts = json.load(urllib.request.urlopen(origin + "/_emulator/counts", timeout=5))
    assert (counts["calls"], counts["kept"], counts["dropped"]) == (12, KEEP, 12 - KEEP)
    bill = json.load(urllib.request.urlopen(origin + "/_emulator/bill", timeout=5))
    assert bill["total_usd"] == full.total_usd and bill["items_billed"] == kept.items_billed


def test_idempotency_key_answers_are_bounded_the_oldest_forgotten(emus: tuple[Emulator, Emulator]) -> None:
    """Past the latest KEEP, an answer goes once it is KEEP_ANSWERS_S old (emulator time, moved by hand here)."""
    small, whole = emus
    clocks = [ManualClock(1e9), ManualClock(1e9)]
    for emu, clock in zip(emus, clocks, strict=True):
        emu.follow(clock)
        for i in range(KEEP + 2):
            _ask(emu, f"k{i}", i)
        clock.advance(KEEP_ANSWERS_S)
        _ask(emu, "k-late", 9)  # the answers before it are an hour old now: the bounded one forgets the oldest two
        _ask(emu, "k0", 0)  # forgotten by the bounded one, so it runs and bills again
        _ask(emu, f"k{KEEP + 1}", KEEP + 1)  # among the latest: replayed by both
    assert whole.bill().items_billed == KEEP + 3 and small.bill().items_billed == KEEP + 4
    assert [i.idempotency_key for i in small.bill().items].count("k0") == 1  # its second billing, kept
    assert len(small._app._idem) <= KEEP  # the answers held (whole reply bodies) stay bounded


def test_a_retry_of_a_call_cut_off_on_the_wire_is_replayed_after_more_than_keep_records_answers(
        emus: tuple[Emulator, Emulator]) -> None:
    """A call whose answer was lost on the wire (run and billed) is retried under its key after KEEP other answers
    (an engine's tries of one key are at most a call's timeout and its backoff apart): it is replayed, billed
    once, as an engine told the server honours keys counts it. Fails on the bound by count alone (a review): the
    answer was forgotten, the retry ran and billed again, and the bill passed the engine's spend by that call."""
    small, _ = emus
    clock = ManualClock(1e9)
    small.follow(clock)
    small.faults.script("openai", "chat.completions", [{"cut_connection": True}])
    with pytest.raises(openai.APIConnectionError):
        _ask(small, "lost", 3)
    for i in range(KEEP + 1):
        clock.advance(1.0)
        _ask(small, f"other{i}", i)
    clock.advance(KEEP_ANSWERS_S - KEEP - 2)  # still within the hour
    with openai.OpenAI(base_url=small.base_url("openai"), api_key=KEY, max_retries=0) as oai:
        again = oai.chat.completions.with_raw_response.create(
            model="gpt-5-mini", extra_headers={"Idempotency-Key": "lost"},
            messages=[{"role": "user", "content": "lost [[emulator:output_tokens=3]]"}])
    assert again.headers.get("idempotent-replayed") == "true"
    billed = small.bill()
    assert billed.items_billed == KEEP + 2, billed  # the lost call once, and the others


def test_a_negative_bound_is_refused() -> None:
    with pytest.raises(ConfigError, match="keep_records must be >= 0"):
        Emulator(keep_records=-1)
