"""The batch queue limit a dispatcher learns from a refusal (``QueueFull._queue_refused``) against the gate that
then holds the model's batches (``SimProvider`` without draws, the live dispatcher's kernel), without Ray or a
provider: a stand-in dispatcher that the provider's refusal names a limit to.

OpenAI's batch queue limit counts input tokens ("enqueued prompt tokens"), as the emulator does."""

from __future__ import annotations

from types import SimpleNamespace as NS

from actors._queue_full import QueueFull, token_parts
from actors._types import BatchJob, Job
from engine.core.catalog import default_catalog
from engine.core.draws import Draws
from engine.core.request import Request
from engine.core.settings import Settings
from engine.runtime.providers import SimProvider, Work
from engine.runtime.ratelimit import LEARNT_LIMIT_S

MODEL = "gpt-5-mini"


def jobs(tag: str, n: int, inputs: int, output: int) -> list[Job]:
    return [Job(k, Request.model_validate({"id": f"{tag}{k}", "arrival_s": 0.0, "model": MODEL,
                                           "input_tokens": inputs, "output_tokens": output}), f"{tag}{k}")
            for k in range(n)]


class Dispatcher(QueueFull):
    """What ``_queue_refused`` reads of a dispatcher; ``named``: the limit the provider's refusal names."""

    def __init__(self, named: int):
        self.name, self._cancelled, self._open, self.now = "openai", False, {}, 0.0
        self.provider = NS(queue_refusal=lambda handle: named)
        self.clock = NS(now=lambda: self.now)
        cat = default_catalog()
        self.sim = SimProvider(cat.provider("openai"), cat, Settings(), Draws(0, 4, 0, 60.0), draw=False)

    def _all_withdrawn(self, jobs) -> bool:
        return False

    def start(self, key: str, js: list[Job], created: bool = True) -> int:
        """Send a batch through the gate now (it must start), and, ``created``, hold it as under way."""
        self.sim.enqueue(Work("batch_api", key, [j.req for j in js], [j.seq for j in js], [0] * len(js)))
        events, _ = self.sim.pump(self.now)
        assert [e.work.item for e in events] == [key], f"{key} did not start"
        if created:
            self._open[key] = (self.batch(js), js, self.now, events[0].outcome, object(), None)
        return events[0].outcome

    def refused(self, key: str, js: list[Job]) -> list[list[Job]] | None:
        """``key`` (started) refused for a full queue: the parts it goes again in, its weight released, as
        ``_follow_batch`` does."""
        tokens = self._open.pop(key)[3] if key in self._open else sum(j.req.input_tokens + j.req.output_tokens
                                                                       for j in js)
        parts = self._queue_refused(key, self.batch(js), js, object(), {})
        self.sim.finish_batch(tokens, self.now, MODEL)
        return parts

    def end(self, key: str) -> None:
        self.sim.finish_batch(self._open.pop(key)[3], self.now, MODEL)

    def pump(self) -> tuple[list[str], float | None]:
        """What the gate starts now (held as under way), and when it asks to be pumped again."""
        events, wake = self.sim.pump(self.now)
        for e in events:
            js = [Job(s, r, r.id) for s, r in zip(e.work.idxs, e.work.reqs, strict=True)]
            self._open[e.work.item] = (self.batch(js), js, self.now, e.outcome, object(), None)
        return [e.work.item for e in events], wake

    def starts(self, key: str, js: list[Job]) -> bool:
        """Whether a batch queued now starts at once (it is then held as under way)."""
        self.sim.enqueue(Work("batch_api", key, [j.req for j in js], [j.seq for j in js], [0] * len(js)))
        return key in self.pump()[0]

    @staticmethod
    def batch(js: list[Job]) -> BatchJob:
        return BatchJob("b", "batch_api", None, False, "", "", js)


def test_a_learnt_limit_counts_input_tokens_as_the_provider_does():
    # Short prompts, long answers: 100 input tokens and 1,000 output each. The account takes 1,000 input tokens.
    d = Dispatcher(named=1_000)
    d.start("a", jobs("a", 3, 100, 1_000))  # 300 input tokens under way
    # Refused beside it (800 + 300 > 1,000): it goes again whole, 800 input tokens, not in 8 parts of one request
    # (weighed with their output, 1,100 tokens each, every request was a part of its own).
    assert [len(p) for p in d.refused("b", jobs("b", 8, 100, 1_000))] == [8]
    # A batch of 500 input tokens fits beside the 300 under way and starts (weighed with its output it waited).
    assert d.starts("c", jobs("c", 5, 100, 1_000))
    assert not d.starts("e", jobs("e", 3, 100, 1_000))  # 300 + 500 + 300 is past the limit: it waits


def test_token_parts_cut_by_input_tokens():
    parts = token_parts(jobs("x", 10, 100, 5_000), 450)
    assert [len(p) for p in parts] == [4, 4, 2]


def test_a_learnt_limit_counts_batches_started_but_not_yet_created_and_a_second_refusal_keeps_the_count():
    d = Dispatcher(named=1_000)
    d.start("a", jobs("a", 2, 99, 1))  # 198 under way
    d.start("p", jobs("p", 4, 99, 1), created=False)  # 396 taken at the gate, its create not yet made
    # Refused for the queue (the provider counts both): learnt from the dispatcher's open batches alone, the
    # limit's count missed the one being created, and a 495-token part started beside both, past the limit.
    assert [len(p) for p in d.refused("b", jobs("b", 5, 99, 1))] == [5]
    assert not d.starts("b0", jobs("b0", 5, 99, 1))  # 198 + 396 + 495 > 1,000: waits
    d.end("a")
    assert d.pump()[0] == ["b0"]  # 396 + 495 fits
    d.start("q", jobs("q", 1, 99, 1), created=False)  # 99 more, not yet created: 990 held
    # A second refusal learns the limit again; the count kept holds the 396 + 495 + 99 under way or being created
    # (rebuilt from the open batches, it held 495, and 20 more started past the limit).
    assert d.refused("f", jobs("f", 1, 50, 1)) is not None
    assert not d.starts("g", jobs("g", 1, 20, 1))


def test_a_named_limit_is_forgotten_after_a_while_and_learnt_again_if_still_in_force():
    d = Dispatcher(named=1_000)
    d.start("a", jobs("a", 8, 100, 1))
    assert d.refused("b", jobs("b", 5, 100, 1)) is not None
    assert not d.starts("c", jobs("c", 5, 100, 1))  # waits for room...
    assert d.pump() == ([], LEARNT_LIMIT_S)  # ... until the limit is forgotten (a raised tier takes more)
    d.now = LEARNT_LIMIT_S
    assert d.pump()[0] == ["c"] and d.sim.enqueued.learnt(MODEL, d.now) is None
    assert d.refused("e", jobs("e", 2, 100, 1)) is not None  # refused again: learnt again, for as long
    assert d.sim.enqueued.learnt(MODEL, d.now + LEARNT_LIMIT_S - 1.0) == 1_000


def test_a_limit_guessed_from_what_was_under_way_lasts_while_that_is_under_way():
    d = Dispatcher(named=0)  # the refusal names no figure: what is under way is taken for the limit
    d.start("a", jobs("a", 3, 100, 1))
    assert d.refused("b", jobs("b", 6, 100, 1)) is not None
    assert not d.starts("b0", jobs("b0", 3, 100, 1))
    d.now = 10.0
    d.end("a")  # what the guess stood for ended: forgotten (before, kept for good, it serialised every batch)
    assert d.pump()[0] == ["b0"] and d.starts("c", jobs("c", 9, 100, 1))
    assert d.sim.enqueued.learnt(MODEL, d.now) is None
