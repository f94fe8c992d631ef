"""The columnar wire format (actors._wire): what an actor receives equals what was sent, record for record."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from actors._types import BatchJob, Job
from actors._wire import ARRAY_MIN_ROWS, PACK_MIN_ROWS, pack
from engine.core.request import Request
from engine.core.result import Result
from engine.core.tracegen import synth


def _trip(x):
    return pickle.loads(pickle.dumps(pack(x), protocol=5))


def _requests() -> list[Request]:
    reqs = list(synth(300, seed=3))
    reqs.append(Request(id="chat", arrival_s=1.5, model="gpt-4o-mini", deadline_s=60, max_output_tokens=64,
                        body={"messages": [{"role": "user", "content": "hi"}], "temperature": 0.2}))
    reqs.append(Request(id="img", arrival_s=2, model="gpt-image-1", prompt="a red fox", deadline_s=600,
                        params={"size": "1024x1024", "quality": "high"}))
    reqs.append(Request(id="vid", arrival_s=3, model="sora-2", prompt="waves", deadline_s=3600,
                        priority="background", params={"seed": 7}))
    return reqs


def test_requests_come_back_equal_with_the_same_explicit_fields_and_stay_frozen():
    reqs = _requests()
    assert len({r.kind for r in reqs}) == 3, "the sample covers text, image and video"
    back = _trip(reqs)
    assert back == reqs
    assert [r.model_fields_set for r in back] == [r.model_fields_set for r in reqs]
    assert [r.model_dump() for r in back] == [r.model_dump() for r in reqs]
    assert [type(v) for r in back for v in r.__dict__.values()] == \
        [type(v) for r in reqs for v in r.__dict__.values()], "every value keeps its Python type"
    with pytest.raises(ValidationError):
        back[0].prompt = "changed"
    assert back[-2].model_copy(update={"id": "x"}).id == "x" and back[-2].id == "img"


def test_jobs_batches_and_results_come_back_equal():
    reqs = _requests()[:ARRAY_MIN_ROWS + 6]
    jobs = [Job(k, r, f"fp{k}", attempts=k % 3, hedges=k % 2, claim=None if k % 4 else f"c{k}", cache_shard=k % 2)
            for k, r in enumerate(reqs)]
    batches = [BatchJob(f"b{k}", "batch_api", None if k else 12.5, bool(k), "process_as_batch", "why",
                        jobs[k * 20:(k + 1) * 20]) for k in range(3)] + [
        BatchJob(f"s{k}", "sync", None, False, "process_individually", "alone", [j]) for k, j in enumerate(jobs[60:])]
    results = [Result(id=r.id, status="ok", tenant=r.tenant, output=f"out {k}", usage={"input": k, "output": 3},
                      cost_usd=0.001 * k, mode="sync", done_s=float(k), deadline_met=bool(k % 2),
                      raw={"id": k} if k % 3 else None) for k, r in enumerate(reqs)]
    assert _trip(jobs) == jobs
    assert all(type(j) is Job for j in _trip(jobs))
    assert _trip(batches) == batches
    assert _trip(results) == results
    pairs = [(r.uid, res) for r, res in zip(reqs, results)]
    assert _trip(pairs) == pairs


def test_what_it_does_not_recognise_or_is_short_travels_as_it_is():
    n = PACK_MIN_ROWS
    mixed = [Job(0, _requests()[0], "fp")] * n + [("a", 1)]
    assert pack(mixed) is mixed
    ragged = [(1, 2)] * n + [(1, 2, 3)]
    assert pack(ragged) is ragged
    short = _requests()[:n - 1]
    assert pack(short) is short
    for x in ([], [1, 2] * n, "text", None, {"a": [1]}, [[1], [2]] * n):
        assert pack(x) is x
    assert pack(_requests()[:n]) is not _requests()[:n]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.none(), st.text(max_size=5)),
    st.one_of(st.integers(min_value=-(1 << 70), max_value=1 << 70), st.floats(allow_nan=False))), min_size=PACK_MIN_ROWS, max_size=2 * ARRAY_MIN_ROWS))
def test_columns_of_numbers_keep_each_value_and_its_type(rows):
    back = _trip(rows)
    assert back == rows
    assert [tuple(map(type, r)) for r in back] == [tuple(map(type, r)) for r in rows]


def test_records_the_c_pickler_cannot_send_still_travel_as_ray_would_send_them():
    from ray import cloudpickle  # Ray's own pickler (no Ray started): it sends what the records hold

    jobs = [Job(k, r, f"fp{k}", claim=lambda: "made here") for k, r in enumerate(_requests()[:PACK_MIN_ROWS])]
    back = cloudpickle.loads(cloudpickle.dumps(pack(jobs)))
    assert [j._replace(claim=None) for j in back] == [j._replace(claim=None) for j in jobs]
    assert [j.claim() for j in back] == ["made here"] * PACK_MIN_ROWS
