"""A batch's results lines that are JSON but not of the shape the provider documents (Google's compatibility
layer answers its errors as a list; a status given as a string; an error that is a bare string; a result type
the engine does not know). One such line raised in the read of the whole file: every member, the finished and
billed ones too, went back to be sent again (a fault hunt)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from engine.emulator import Emulator
from tests.unit.test_http_providers import (
    CAT,
    EMU_CANCEL_S,
    SPEED,
    VALIDATING_S,
    Rig,
    assert_batch_member,
    batch_key,
    billed_by_custom_id,
    jobs_of,
)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


@pytest.fixture
def emu() -> Iterator[Emulator]:  # as test_http_providers' own
    with Emulator(CAT, latency_scale=0.0, speedup=SPEED, cancel_s=EMU_CANCEL_S, validating_s=VALIDATING_S["openai"],
                  finalizing_s=1.0) as e:
        yield e


def _openai_list_error(line: dict) -> dict:
    return {**line, "response": {"status_code": 400, "body": [
        {"error": {"code": 400, "message": "Unknown name \"store\"", "status": "INVALID_ARGUMENT"}}]}}


def _openai_status_text(line: dict) -> dict:
    return {**line, "response": {**line["response"], "status_code": "200"}}


def _anthropic_result_text(line: dict) -> dict:
    return {**line, "result": "succeeded"}


def _anthropic_error_text(line: dict) -> dict:
    return {**line, "result": {"type": "errored", "error": "Unknown name \"store\""}}


def _anthropic_unknown_type(line: dict) -> dict:
    return {**line, "result": {**line["result"], "type": "superseded"}}


# (provider, the line as changed, what becomes of the member: "refused" fails naming the provider's words, not
# billed; "unread" ran and may be billed, so it fails at its bound and is not sent again; "again" is an error of no
# type, which Anthropic's errored results are not billed for and the engine retries, as an api_error)
CASES = [
    ("openai", _openai_list_error, "refused"),
    ("openai", _openai_status_text, "unread"),
    ("anthropic", _anthropic_result_text, "unread"),
    ("anthropic", _anthropic_error_text, "again"),
    ("anthropic", _anthropic_unknown_type, "unread"),
]


def _reshape(rig: Rig, provider: str, target: str, change: Callable[[dict], dict]) -> None:
    """The provider reads its results file as the emulator wrote it, then ``target``'s line is changed."""
    reader = "_lines" if provider == "openai" else "_results"
    inner = getattr(rig.d.provider, reader)

    async def read(*args: Any) -> tuple[list[dict], list[str | None]]:
        lines, unread = await inner(*args)
        return [change(line) if line.get("custom_id") == target else line for line in lines], unread

    setattr(rig.d.provider, reader, read)


@pytest.mark.parametrize("provider,change,outcome", CASES, ids=[c[1].__name__.strip("_") for c in CASES])
def test_a_results_line_of_another_shape_fails_its_member_alone_and_no_finished_member_goes_again(
        emu, provider, change, outcome):
    jobs = jobs_of(provider, claims=True)
    odd = jobs[1]

    async def go():
        rig = Rig(emu, provider)
        _reshape(rig, provider, batch_key(odd), change)
        try:
            await rig.reserve(jobs)
            await rig.run("batch_api", jobs)
            await rig.resolved(jobs)
            back = [j.req.id for j in rig.grouper.readmitted()]
            assert back == ([odd.req.id] if outcome == "again" else [])  # no finished member sent again
            billed = billed_by_custom_id(emu)  # every member ran once (the emulator answered them all)
            for j in jobs:
                if j is not odd:
                    assert_batch_member(rig.results[j.req.id], j, billed[batch_key(j)], provider)
            if outcome == "again":
                assert odd.req.id not in rig.results
                return
            r = rig.results[odd.req.id]
            assert r.status == "failed"
            if outcome == "refused":
                assert 'Unknown name "store"' in r.error and r.cost_usd == 0.0
            else:
                assert "may be billed" in r.error
                stats = await rig.d.stats()
                assert stats["possibly_billed"] == 1
            await rig.until(lambda: not rig.budget.book.claims, "every claim settled")
        finally:
            await rig.close()
    asyncio.run(go())
