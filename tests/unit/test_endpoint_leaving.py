"""A client that leaves in the middle of a batch create or cancel (Ray Serve then cancels its handler), and
creates that run at once: the endpoint's files-and-batches store over the tests' fake engine, no HTTP (a
helper's hunt: a create left its lines taken and billed with no batch on record, a cancel left its batch
cancelling for its whole window and refused the retry, and two creates at once both passed the line limit)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import pytest

from engine.app._endpoint_batches import FilesAndBatches
from tests.unit.test_endpoint import CAT, FakeEngine, batch_line


class Gated(FakeEngine):
    """``submit_many`` (an engine waiting for room) or ``cancel_requests`` (a slow withdrawal) waits at a gate."""

    def __init__(self, gate_cancel: bool = False):
        super().__init__()
        self.entered, self.gate = threading.Event(), threading.Event()
        self.gate_cancel = gate_cancel

    def _wait(self) -> None:
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"

    def submit_many(self, ds):
        if not self.gate_cancel:
            self._wait()
        return super().submit_many(ds)

    def cancel_requests(self, futs) -> int:
        if self.gate_cancel:
            self._wait()
        return super().cancel_requests(futs)


class Http:
    """What ``create_batch`` reads of a request."""

    headers: dict[str, str] = {}

    def __init__(self, body: dict):
        self._body = body

    async def json(self) -> dict:
        return self._body


def upload(store: FilesAndBatches, ids: list[str], tenant: str = "default") -> Http:
    data = ("\n".join(batch_line(cid, f"question {cid}") for cid in ids) + "\n").encode()
    f = store._add_file("in.jsonl", "batch", data, tenant=tenant)
    http = Http({"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"})
    if tenant != "default":
        http.headers = {"X-Smartbatch-Tenant": tenant}
    return http


async def until(probe: Callable[[], Any], what: str, timeout_s: float = 5.0) -> Any:
    """Yield to the loop until ``probe`` holds (bounded): the store's own tasks make it true."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while not (got := probe()):
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)
    return got


async def left(task: asyncio.Task) -> None:
    """The client leaves: Serve cancels the handler."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_a_create_whose_client_leaves_mid_call_still_makes_a_listed_batch_that_ends(tmp_path):
    async def go():
        eng = Gated()
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, state_dir=tmp_path)
        create = asyncio.create_task(store.create_batch(upload(store, ["a", "b", "c"])))
        await asyncio.to_thread(eng.entered.wait, 10)
        await left(create)
        eng.gate.set()  # the engine takes the lines all the same
        (listed,) = (await until(lambda: store.batches, "the batch on record")).values()
        done = await until(lambda: listed.status == "completed" and listed, "the batch's end")
        assert eng.submitted == [f"{listed.id}/{cid}" for cid in "abc"]  # each line once
        assert store.files[done.output_file_id].data.count(b"\n") == 3
        assert (await store.list_batches(Http({})))["data"][0]["id"] == listed.id
        await store.shutdown()
    asyncio.run(go())


def test_the_open_lines_limit_is_shared_but_its_refusal_quotes_only_the_callers_own_lines():
    """The limit guards the engine's places, so one tenant's lines count against another's batch; what other
    tenants hold is theirs, so the refusal tells the caller its own count, never theirs."""
    async def go():
        eng = Gated()
        eng.gate.set()
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, max_open_lines=4)
        assert (await store.create_batch(upload(store, ["a-slow", "b-slow", "c-slow"], tenant="acme")))[
            "status"] == "in_progress"
        refused = await store.create_batch(upload(store, ["d-slow", "e-slow"], tenant="globex"))
        said = refused["errors"]["data"][0]["message"]
        assert refused["status"] == "failed" and "your earlier batches hold 0 of them" in said and "3" not in said
        again = await store.create_batch(upload(store, ["g-slow", "h-slow"], tenant="acme"))
        assert "your earlier batches hold 3 of them" in again["errors"]["data"][0]["message"]
        eng.release()
        await store.shutdown()
    asyncio.run(go())


def test_two_creates_at_once_do_not_both_pass_the_open_lines_limit():
    async def go():
        eng = Gated()
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, max_open_lines=5)
        first = asyncio.create_task(store.create_batch(upload(store, ["a-slow", "b-slow", "c-slow"])))
        await asyncio.to_thread(eng.entered.wait, 10)  # the first is being admitted
        second = await store.create_batch(upload(store, ["d-slow", "e-slow", "f-slow"]))
        assert second["status"] == "failed" and second["errors"]["data"][0]["code"] == "request_limit_exceeded"
        assert "your earlier batches hold 3 of them" in second["errors"]["data"][0]["message"]
        eng.gate.set()
        assert (await first)["status"] == "in_progress"
        eng.release()
        await store.shutdown()
    asyncio.run(go())


def test_a_create_whose_client_left_still_counts_its_lines_against_the_limit_until_they_are_on_record():
    async def go():
        eng = Gated()
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, max_open_lines=5)
        first = asyncio.create_task(store.create_batch(upload(store, ["a-slow", "b-slow", "c-slow"])))
        await asyncio.to_thread(eng.entered.wait, 10)
        await left(first)  # its lines are still being admitted
        second = await store.create_batch(upload(store, ["d-slow", "e-slow", "f-slow"]))
        assert second["status"] == "failed" and "your earlier batches hold 3 of them" in second["errors"]["data"][0]["message"]
        eng.gate.set()
        (made,) = [b for b in (await until(lambda: len(store.batches) == 2 and store.batches, "both on record")).values()
                   if b.status == "in_progress"]
        assert len(made.futures) == 3 and not +store._admitting
        eng.release()
        await store.shutdown()
    asyncio.run(go())


def test_a_cancel_whose_client_leaves_mid_call_still_ends_the_batch_and_a_retry_is_answered():
    async def go():
        eng = Gated(gate_cancel=True)
        store = FilesAndBatches(eng, CAT, window_default_s=86400.0, cancel_wait_s=0.05)
        made = await store.create_batch(upload(store, ["a", "b-slow"]))  # b is in a call that runs on
        job = store.batches[made["id"]]
        await until(lambda: "a" in job.results, "the first line's answer")
        cancel = asyncio.create_task(store.cancel_batch(Http({}), job.id))
        await asyncio.to_thread(eng.entered.wait, 10)
        await left(cancel)
        again = await store.cancel_batch(Http({}), job.id)  # the client's retry: the batch, cancelling (was a 409)
        assert again["status"] == "cancelling"
        eng.gate.set()
        # The running line never ends here: the wait for it (cancel_wait_s) ends the batch (it stayed cancelling).
        await until(lambda: job.status == "cancelled", "the cancelled batch")
        assert job.view()["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
        assert b'"custom_id":"b-slow"' in store.files[job.error_file_id].data
        assert eng.withdrawn == [f"{job.id}/b-slow"]  # withdrawn once, by the cancel the client left
        eng.release()
        await store.shutdown()
    asyncio.run(go())
