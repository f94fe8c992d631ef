"""An SDK's retry of a generation after the endpoint's replica restarted (the engine still running), with a state
directory: it takes the request id of its try, kept on disk (``_endpoint_retry_log``), and the engine answers that
id from the request it holds. Before, the table of tries was the replica's memory alone: the retry was a new
request and the provider billed the call twice. The endpoint under uvicorn, restarted on the same directory over
one engine stand-in whose requests are calls at the emulator (no Ray)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import socket
import threading
import time

import anthropic
import openai
import pytest
import uvicorn

from engine.app import endpoint
from engine.app._endpoint_retries import ANSWERED_KEEP_S, PER_CONTENT, RETRY_COUNT, SdkRetries
from engine.app._endpoint_retry_log import KeptTries, RetryLog, replay
from engine.app.endpoint import make_app
from engine.core.request import Request
from engine.core.result import Result
from engine.emulator import Emulator
from engine.runtime.outcomes import ok_result
from tests.unit.test_endpoint import serving
from tests.unit.test_endpoint_videos import WAIT_S, VideoEngine
from tests.unit.test_http_providers import CAT, MODEL, ROUTE, SPEED, direct, job_of

ASK = [{"role": "user", "content": "Name a river."}]


class TextEngine(VideoEngine):
    """``VideoEngine`` for text too: a request is one call through its own provider (OpenAI or Anthropic) at the
    emulator, and a (tenant, id) submitted again waits for the same call, as the engine's idempotency does."""

    async def _make(self, emu):
        self.providers = {name: direct(emu, name) for name in ("openai", "anthropic")}
        return self.providers["openai"]

    async def _call(self, req: Request) -> Result:
        await self._go.wait()  # ``hold``
        provider, job = self.providers[req.provider], job_of(req)
        out = await provider.call(job._replace(body=provider.sync_body(job)))
        assert out.ok, out.error
        return ok_result(req, at=0.0, cost=out.cost, mode="sync", batch_id=None, recommendation=None, reason="",
                         out=out)

    async def asubmit(self, d: dict):
        return await asyncio.shield(asyncio.wrap_future(self.submit_many([d])[0]))

    def close(self) -> None:
        self._on_loop(self.providers["anthropic"].close())
        super().close()  # and the OpenAI provider's


@contextlib.contextmanager
def engine_at_the_emulator():
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = TextEngine(emu)
        try:
            yield eng, emu
        finally:
            eng.close()


@contextlib.contextmanager
def replica(eng: TextEngine, state_dir):
    """One life of the endpoint's replica on ``state_dir``: its base URL."""
    with serving(make_app(eng, catalog=CAT, state_dir=state_dir)) as url:
        yield url


@contextlib.contextmanager
def cut_replica(eng: TextEngine, state_dir):
    """A life of the replica that ends by cutting the calls it is answering (as a restart does), not waiting."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(make_app(eng, catalog=CAT, state_dir=state_dir), log_level="critical",
                                           ws="none", lifespan="on", timeout_graceful_shutdown=0.1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        limit = time.monotonic() + WAIT_S
        while not server.started and thread.is_alive() and time.monotonic() < limit:
            time.sleep(0.01)  # as ``serving``: uvicorn says it started by a flag only
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


def billed(emu: Emulator, provider: str) -> int:
    return sum(item.route == ROUTE[provider] for item in emu.bill().items)


def chat(url: str, count: int, tenant: str = "acme") -> str:
    """An OpenAI SDK's try ``count`` of one chat call of ``tenant``: the request id it was answered under."""
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL["openai"], messages=ASK, extra_headers={RETRY_COUNT: str(count), endpoint.HEADER_TENANT: tenant})
    assert raw.parse().choices[0].message.content
    return raw.headers[endpoint.HEADER_REQUEST_ID]


def message(url: str, count: int, tenant: str = "acme") -> str:
    """An Anthropic SDK's try ``count`` of one Messages call of ``tenant``: the request id it was answered under."""
    with anthropic.Anthropic(base_url=url.removesuffix("/v1"), api_key="unused", max_retries=0,
                             timeout=WAIT_S) as client:
        raw = client.messages.with_raw_response.create(
            model=MODEL["anthropic"], max_tokens=64, messages=ASK,
            extra_headers={RETRY_COUNT: str(count), endpoint.HEADER_TENANT: tenant})
    assert raw.parse().content[0].text
    return raw.headers["request-id"]


@pytest.mark.parametrize(("provider", "call"), [("openai", chat), ("anthropic", message)])
def test_an_sdk_retry_after_the_replica_restarts_takes_its_tries_request_and_is_billed_once(tmp_path, provider,
                                                                                            call):
    with engine_at_the_emulator() as (eng, emu):
        with replica(eng, tmp_path) as url:
            first = call(url, 0)  # its answer lost on the way, say: the SDK retries once the replica is back
        with replica(eng, tmp_path) as url:
            again = call(url, 1)
            assert billed(emu, provider) == 1  # answered by the engine from the request it held
            assert again == first
            fresh = call(url, 0)  # a first try with the same body: a call of its own, never an old id
            theirs = call(url, 1, tenant="globex")  # another tenant's retry: its own
            assert len({first, fresh, theirs}) == 3
        with replica(eng, tmp_path) as url:  # a second restart: the retries of both tries still find them
            assert call(url, 2) == fresh and call(url, 2, tenant="globex") == theirs
        assert billed(emu, provider) == 3


class Took(TextEngine):
    """Says when it has taken a request (``took``)."""

    def __init__(self, emu: Emulator):
        super().__init__(emu)
        self.took = threading.Event()

    def submit_many(self, ds):
        futs = super().submit_many(ds)
        self.took.set()
        return futs


def test_a_retry_of_a_try_the_restart_cut_takes_the_request_the_engine_still_runs_and_is_billed_once(tmp_path):
    """The replica restarts while the engine is still making a try's answer (a slow provider): the client's
    connection is cut, its SDK retries once the replica is back, and the retry waits for that same request."""
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED) as emu:
        eng = Took(emu)
        try:
            eng.hold()
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                with cut_replica(eng, tmp_path) as url:
                    first = pool.submit(chat, url, 0)
                    assert eng.took.wait(WAIT_S)
                with pytest.raises((openai.APIConnectionError, openai.InternalServerError)):  # both retried
                    first.result(WAIT_S)
            with replica(eng, tmp_path) as url:
                eng.release()
                again = chat(url, 1)
            assert billed(emu, "openai") == 1 and eng.submitted == [again, again]
        finally:
            eng.close()


def test_without_a_state_directory_a_retry_after_a_restart_is_a_new_request():
    with engine_at_the_emulator() as (eng, emu):
        with replica(eng, None) as url:
            first = chat(url, 0)
        with replica(eng, None) as url:
            assert chat(url, 1) != first
        assert billed(emu, "openai") == 2


# -- the log alone, on an injected wall clock ----------------------------------------------------------------------
class Wall:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def sdk(count: int) -> dict[str, str]:
    return {RETRY_COUNT: str(count)}


def test_refused_and_old_tries_are_not_taken_after_a_restart_and_a_try_cut_by_it_is(tmp_path):
    wall = Wall()
    before = KeptTries(SdkRetries(clock=wall))
    before.resume(tmp_path, wall)
    ids = iter(f"req_{i}" for i in range(100))
    old = before.request_id("acme", "k-old", sdk(0), lambda: next(ids))
    before.answered("k-old", old)
    wall.now += ANSWERED_KEEP_S + 1  # past its keep by the time of the restart
    kept = before.request_id("acme", "k", sdk(0), lambda: next(ids))
    before.answered("k", kept)
    no = before.request_id("acme", "k-no", sdk(0), lambda: next(ids))
    before.refused("k-no", no)  # a 429: its retry is a new request
    cut = before.request_id("acme", "k-cut", sdk(0), lambda: next(ids))  # under way when the replica went down
    unlogged = before.request_id("acme", "k-plain", {}, lambda: next(ids))  # not an SDK's: nothing retries it
    wall.now += 5
    after = KeptTries(SdkRetries(clock=wall))
    after.resume(tmp_path, wall)
    fresh = lambda: next(ids)  # noqa: E731
    assert after.request_id("acme", "k", sdk(1), fresh) == kept  # answered 5 s before: its retry takes it
    assert after.request_id("acme", "k", sdk(0), fresh) != kept  # a first try: a call of its own, never an old id
    assert after.request_id("acme", "k-cut", sdk(1), fresh) == cut  # cut 5 s before, by the restart
    for key, rid in (("k-old", old), ("k-no", no), ("k-plain", unlogged)):
        assert after.request_id("acme", key, sdk(1), fresh) != rid
    asyncio.run(before.close()), asyncio.run(after.close())


def test_the_log_keeps_two_windows_at_most_and_skips_a_cut_line(tmp_path):
    wall = Wall(ANSWERED_KEEP_S * 1000)
    log = RetryLog(tmp_path, wall)
    assert log.open() == []
    for i in range(5 * 12):  # five windows, a line every 10 s
        log.note("try", "acme", "k", f"req_{i}")
        wall.now += 10.0
    asyncio.run(log.close())
    wall.now += 10.0  # the restart, 10 s after the stop's line
    lines = [json.loads(raw) for p in sorted(tmp_path.glob("retries-*.jsonl")) for raw in p.read_bytes().splitlines()]
    assert len(lines) <= 2 * 12 and {line["id"] for line in lines} >= {f"req_{i}" for i in range(48, 60)}
    with open(tmp_path / f"retries-{int(wall.now // ANSWERED_KEEP_S) % 2}.jsonl", "ab") as f:
        f.write(b'{"e":"try","t":"acme","k":"k2","id":"req_cut","a')  # a power loss cut the last line
    again = RetryLog(tmp_path, wall)
    got = replay(again.open(), wall.now)
    asyncio.run(again.close())
    # The tries of "k" a table keeps (PER_CONTENT), latest last: the one a retry takes, 10 s after its last sign.
    assert [(rid, age) for _, rid, age in got] == [(f"req_{i}", 10.0) for i in range(60 - PER_CONTENT, 60)]


# -- a review (stop 73, logrev): tries longer than a window of the log, and a quiet replica's restart -------------
def _tries(tmp_path, wall: Wall) -> KeptTries:
    tries = KeptTries(SdkRetries(clock=wall))
    tries.resume(tmp_path, wall)
    return tries


def test_a_try_under_way_longer_than_two_windows_is_taken_by_its_retry_after_a_restart(tmp_path):
    """A generation with a long deadline (the SDKs wait 600 s) under way while the log turns its files twice: its
    try's line went with the file emptied, and its retry after a restart was a new request, paid again."""
    wall = Wall(ANSWERED_KEEP_S * 1000 + 100)
    ids = iter(f"req_{i}" for i in range(100))
    fresh = lambda: next(ids)  # noqa: E731
    before = _tries(tmp_path, wall)
    long = before.request_id("acme", "k-long", sdk(0), fresh)
    late = before.request_id("acme", "k-late", sdk(0), fresh)
    create = before.table.request_id("k-batch", sdk(0), fresh)  # a batch create's, kept by its batch's record
    for step in range(1, 4):  # other calls, one a window: the files are emptied in turn under the long tries
        wall.now += ANSWERED_KEEP_S
        if step == 2:  # answered at last, its retry's answer lost on the way (and the first line of its window)
            before.answered("k-late", late)
        if step == 3:  # early in the next window: that of its try's last line is emptied, "k-late" in its keep
            wall.now -= 90
        other = before.request_id("acme", f"k-{step}", sdk(0), fresh)
        before.answered(f"k-{step}", other)
    wall.now += 5  # the replica restarts, "k-long" still under way in the engine
    asyncio.run(before.close())
    after = _tries(tmp_path, wall)
    assert after.request_id("acme", "k-long", sdk(1), fresh) == long
    assert after.request_id("acme", "k-late", sdk(1), fresh) == late
    assert after.table.request_id("k-batch", sdk(1), fresh) != create  # not this log's: not written again
    asyncio.run(after.close())


def test_a_try_a_restart_of_a_quiet_replica_cut_is_taken_by_its_retry(tmp_path):
    """No line for a while before the restart (a quiet replica, one slow call): the age of the try it cut counted
    from its try's own line, so its retry was a new request past 120 s of the try, however soon after the restart."""
    wall = Wall()
    ids = iter(f"req_{i}" for i in range(100))
    fresh = lambda: next(ids)  # noqa: E731
    before = _tries(tmp_path, wall)
    slow = before.request_id("acme", "k", sdk(0), fresh)
    wall.now += ANSWERED_KEEP_S + 60  # nothing else on the replica meanwhile
    asyncio.run(before.close())  # the replica stops (its call cut)
    wall.now += 2
    after = _tries(tmp_path, wall)
    assert after.request_id("acme", "k", sdk(1), fresh) == slow
    asyncio.run(after.close())


def test_a_wall_clock_stepped_back_at_the_restart_keeps_the_tries_just_answered(tmp_path):
    """NTP steps the wall clock back a second across the restart: the tries answered just before were ahead of
    the new clock, their age below 0, and dropped; their retries were new requests."""
    wall = Wall()
    ids = iter(f"req_{i}" for i in range(100))
    fresh = lambda: next(ids)  # noqa: E731
    before = _tries(tmp_path, wall)
    done = before.request_id("acme", "k", sdk(0), fresh)
    before.answered("k", done)
    asyncio.run(before.close())
    wall.now -= 1.0
    after = _tries(tmp_path, wall)
    assert after.request_id("acme", "k", sdk(1), fresh) == done
    asyncio.run(after.close())


def test_a_try_a_crash_of_a_quiet_replica_cut_is_taken_by_its_retry(tmp_path):
    """As above, but the replica's actor is killed (no stop, no line at its end): the beats written while the try
    was under way tell when the crash may have cut it."""
    wall = Wall()
    ids = iter(f"req_{i}" for i in range(100))
    fresh = lambda: next(ids)  # noqa: E731
    before = _tries(tmp_path, wall)
    slow = before.request_id("acme", "k", sdk(0), fresh)
    wall.now += ANSWERED_KEEP_S + 60
    before.log.beat()  # the timer's (below), the last before the crash
    wall.now += 3  # killed, and restarted
    after = _tries(tmp_path, wall)
    assert after.request_id("acme", "k", sdk(1), fresh) == slow
    asyncio.run(after.close()), asyncio.run(before.close())


def test_the_beats_run_while_a_try_is_under_way_and_stop_with_the_log(tmp_path):
    async def life():
        tries = KeptTries(SdkRetries())
        tries.resume(tmp_path)
        tries.log._beat_s = 0.0  # at the loop's next turn
        beats = asyncio.get_running_loop().create_future()
        beat = tries.log.beat

        def first_beat() -> None:
            tries.log._beat_s = 3600.0  # the next one far off: one beat in the file
            beat()
            beats.set_result(None)

        tries.log.beat = first_beat
        rid = tries.request_id("acme", "k", sdk(0), lambda: "req_slow")
        await asyncio.wait_for(beats, WAIT_S)
        assert tries.log._beating is not None  # under way: the next beat is set
        tries.answered("k", rid)
        await tries.close()
        assert tries.log._beating is None
        return [json.loads(raw)["e"] for p in sorted(tmp_path.glob("retries-*.jsonl")) for raw in p.read_bytes().splitlines()]

    assert asyncio.run(life()) == ["try", "alive", "answered", "alive"]


def test_a_line_written_after_a_cut_line_is_not_glued_to_it(tmp_path):
    """A power loss cut the last line of a file; the restarted endpoint's first line in that file was appended to
    the cut bytes, made one line that is no JSON, and skipped at the next restart: its try's retry paid again."""
    wall = Wall()
    with open(tmp_path / f"retries-{int(wall.now // ANSWERED_KEEP_S) % 2}.jsonl", "ab") as f:
        f.write(b'{"e":"try","t":"acme","k":"k0","id":"req_cut","a')
    ids = iter(f"req_{i}" for i in range(100))
    fresh = lambda: next(ids)  # noqa: E731
    before = _tries(tmp_path, wall)
    slow = before.request_id("acme", "k", sdk(0), fresh)  # under way when the replica is killed
    wall.now += 3
    after = _tries(tmp_path, wall)
    assert after.request_id("acme", "k", sdk(1), fresh) == slow
    asyncio.run(after.close()), asyncio.run(before.close())


def test_a_close_that_finds_the_fsync_just_done_ends_and_does_not_spin():
    """The worker thread's fsync can be done with its callback (``_synced``) not yet run when ``close`` looks:
    awaiting a done future yields nothing, and ``close`` spun at full CPU for good (seen in
    ``bench_retry_log.py``, 1 run in 3). Run on a thread of its own: on the code before, this test's loop never
    yields, so no timeout inside it could end it."""
    ended = threading.Event()

    async def go(tmp: str) -> None:
        log = RetryLog(tmp, lambda: 1000.0)
        log.open()
        log.note("try", "acme", "k", "req_0")
        fut = asyncio.get_running_loop().create_future()
        fut.add_done_callback(log._synced)  # as ``_sync_soon`` does
        log._syncing = fut
        fut.set_result(None)  # done: its callback is scheduled, not run
        await log.close()
        ended.set()

    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        threading.Thread(target=asyncio.run, args=(go(tmp),), daemon=True).start()
        assert ended.wait(10.0), "close() did not end"

