"""The memory a dispatcher takes to read an ended Gemini native image batch (``GeminiProvider.fetch``, ``GET
v1beta/batches/{id}`` read whole): a synthetic answer of ``--images`` images of ``--mb`` MB each, in the shape the
emulator and Google's batch guide give it (the responses twice: ``metadata.output`` and ``response``), served in
64 KiB chunks by an in-process transport (no server's allocations in the figure), read through the official SDK.
Prints the peak of ``tracemalloc`` over the read and its ratio to the images' base64 (one copy: what the results
hand on). Asserts no figure (only that every member was read, so no figure is of a read that lost some).

    .venv/bin/python benchmarks/bench_gemini_parse.py [--images 20] [--mb 1]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx2  # noqa: E402
import openai  # noqa: E402

from actors.providers._http import PollBackoff  # noqa: E402
from actors.providers._veo import native_root  # noqa: E402
from actors.providers.gemini_http import GeminiProvider, NativeHandle  # noqa: E402
from engine.core.catalog import default_catalog  # noqa: E402
from engine.core.clock import ManualClock  # noqa: E402
from engine.core.provider_api import CallJob, Secret  # noqa: E402
from engine.core.request import Request, validation_context  # noqa: E402
from engine.core.settings import ProvidersSettings, Settings  # noqa: E402

CHUNK = 64 * 1024  # what a socket read hands httpx at a time, about


def _answer(n: int, image_bytes: int) -> tuple[bytes, list[CallJob], int]:
    """The ended batch's operation as bytes, its members, and the base64 bytes of its images (one copy)."""
    settings = Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}}))
    cat = default_catalog()
    jobs, responses, b64 = [], [], 0
    for i in range(n):
        req = Request.model_validate({"id": f"nano-{i}", "arrival_s": 0.0, "model": "gemini-2.5-flash-image",
                                      "prompt": f"a banana, take {i}"}, context=validation_context(cat, settings))
        jobs.append(CallJob(f"k{i}", req, 0.0, 0, 0))
        data = base64.b64encode(os.urandom(image_bytes)).decode("ascii")
        b64 += len(data)
        responses.append({"metadata": {"key": f"k{i}"}, "response": {
            "candidates": [{"content": {"role": "model", "parts": [{"inlineData": {"mimeType": "image/png",
                                                                                    "data": data}}]},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 6, "candidatesTokenCount": 1290, "totalTokenCount": 1296},
            "responseId": f"r{i}"}})
    output = {"inlinedResponses": {"inlinedResponses": responses}}
    op = {"name": "batches/b1", "done": True, "response": output, "metadata": {
        "model": "models/gemini-2.5-flash-image", "displayName": "ref", "state": "BATCH_STATE_SUCCEEDED",
        "batchStats": {"requestCount": str(n), "successfulRequestCount": str(n), "failedRequestCount": "0"},
        "output": output}}
    return json.dumps(op).encode(), jobs, b64


async def _measure(body: bytes, jobs: list[CallJob]) -> tuple[int, int]:
    async def answer(request: httpx2.Request) -> httpx2.Response:
        async def chunks():
            for at in range(0, len(body), CHUNK):
                yield body[at:at + CHUNK]
        return httpx2.Response(200, headers={"content-type": "application/json"}, content=chunks())

    settings = Settings(providers=ProvidersSettings(mode="http", endpoints={"google": {}}))
    ep = settings.providers.endpoints["google"]
    p = GeminiProvider("google", default_catalog(), settings, ep, Secret("bench-key"), ManualClock(0.0))
    await p._native.close()
    p._native = openai.AsyncOpenAI(api_key="bench-key", base_url=native_root(ep.base_url), max_retries=0,
                                   http_client=httpx2.AsyncClient(transport=httpx2.MockTransport(answer)))
    handle = NativeHandle("batches/b1", jobs, PollBackoff(1.0, 2.0))
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    out = await p.fetch(handle)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    ok = sum(1 for o in out.values() if o.ok)
    assert ok == len(jobs), f"{ok} of {len(jobs)} read"  # a figure of a read that lost members would mislead
    await p.close()
    return peak - base, ok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=20)
    ap.add_argument("--mb", type=float, default=1.0, help="each image's size before base64, in MB (10^6 bytes)")
    args = ap.parse_args()
    body, jobs, b64 = _answer(args.images, int(args.mb * 1e6))
    peak, ok = asyncio.run(_measure(body, jobs))
    print(f"{ok} images of {args.mb:g} MB: {b64 / 2**20:.1f} MiB of base64 (the answer holds it twice: "
          f"{len(body) / 2**20:.1f} MiB)")
    print(f"peak while reading: {peak / 2**20:.1f} MiB = {peak / b64:.2f}x the images' base64")


if __name__ == "__main__":
    main()
