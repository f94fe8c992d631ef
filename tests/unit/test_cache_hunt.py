"""The cache when one of its stores fails (a helper's hunt): a write that fails costs the entry, never a request."""

import asyncio

from actors import ResultCache, ResultHub
from actors._types import Job
from engine.core.clock import ManualClock
from engine.core.features import fingerprint
from engine.core.grouping import ReuseSettings
from engine.core.request import Request
from engine.core.result import Result
from engine.core.settings import CacheSettings, Settings

REUSE = ReuseSettings(exact=True, in_flight=True, near=True, near_threshold=0.92)


def job(i, prompt, *, reuse="exact"):
    r = Request.model_validate({"id": f"r{i}", "arrival_s": 0.0, "model": "gpt-image-1", "prompt": prompt,
                                "tenant": "acme", "reuse": reuse})
    return Job(i, r, fingerprint(r))


def ok(j, output):
    return (j.fp, Result(id=j.req.id, tenant="acme", status="ok", output=output, cost_usd=0.04, mode="sync",
                         provider=j.req.provider, model=j.req.model, done_s=1.0))


class FullDisk:
    """A blob store that cannot write (a full disk, a directory gone read-only)."""

    def put(self, data: bytes) -> str:
        raise OSError(28, "No space left on device")

    def get(self, ref: str) -> bytes | None:
        return None


def test_followers_are_answered_when_the_blob_store_cannot_write_the_leaders_output(tmp_path):
    """A large output goes to the blob store before its entry is made. A store that could not write raised out of
    ``complete``: the leader's followers, and those of every result after it in the same call, were never
    answered (they waited for the driver's sweep, then were generated and paid again). The entry is lost, the
    followers are answered from the output in hand, and the next result is stored as ever."""
    hub = ResultHub()
    cache = ResultCache(REUSE, hub, ManualClock(0.0), blobs=FullDisk(),
                        settings=Settings(cache=CacheSettings(blob_min_kb=1, blob_dir=tmp_path)))
    big, small = job(0, "A ten-second video of waves"), job(1, "A logo, flat, two colours")
    followers = [job(2, big.req.prompt), job(3, small.req.prompt)]

    async def go():
        assert await cache.lookup([big, small]) == [0, 1]
        assert await cache.lookup(followers) == []  # both follow
        await cache.complete([ok(big, "v" * 5000), ok(small, "img://logo")])
        return {r.id: r for r in await hub.pull(0.01)}

    got = asyncio.run(go())
    assert got["r2"].output == "v" * 5000 and got["r3"].output == "img://logo"
    assert cache.inflight.n_following() == 0 and not cache.generating
    assert cache.memory.get(big.fp) is None and cache.memory.get(small.fp) is not None
    assert cache.cache_stats()["blob_errors"] == 1
