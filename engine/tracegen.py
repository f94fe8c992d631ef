"""Trace builders: from the real Azure and Mooncake traces, and a seeded synthetic workload.

Token counts, arrival times and prefix hashes from real data stay exactly as recorded. What the real data
lacks is assigned by the seeded rules below (also in docs/traces.md), so the same seed gives the same trace:

* tenant: ``tenant-a..d`` with probabilities 0.4 / 0.3 / 0.2 / 0.1;
* priority: urgent 0.10, normal 0.60, background 0.30; deadline: the settings' default for that priority;
* provider/model: the text mix ``TEXT_MIX`` (or one model forced with ``model=``). For Mooncake the draw is
  keyed on the request's first two prefix blocks, so a conversation and its follow-ups stay on one model and
  their shared prefix can hit that model's prompt cache;
* prompt: a placeholder naming the source row (Azure: unique per row; Mooncake: derived from the full
  ``hash_ids`` list, so a re-sent identical prompt is an exact duplicate); reuse: ``exact``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from datetime import datetime
from pathlib import Path

import numpy as np

from engine.catalog import Catalog, default_catalog
from engine.errors import TraceError
from engine.request import Request, validation_context
from engine.settings import Settings

__all__ = ["TEXT_MIX", "from_azure", "from_mooncake", "synth"]

TEXT_MIX: tuple[tuple[str, str, float], ...] = (
    ("openai", "gpt-5-mini", 0.30),
    ("openai", "gpt-5", 0.15),
    ("anthropic", "claude-sonnet-4-5", 0.25),
    ("anthropic", "claude-haiku-4-5", 0.10),
    ("google", "gemini-2.5-flash", 0.20),
)
_TENANTS = ("tenant-a", "tenant-b", "tenant-c", "tenant-d")
_TENANT_P = (0.4, 0.3, 0.2, 0.1)
_PRIOS = ("urgent", "normal", "background")
_PRIO_P = (0.10, 0.60, 0.30)


def _parse_model(model: str | None) -> tuple[str, str] | None:
    if model is None:
        return None
    if "/" not in model:
        raise TraceError([("--model", 0, "model", f"{model!r}: write it as provider/model, e.g. openai/gpt-5")])
    prov, name = model.split("/", 1)
    return prov, name


def _common(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    tenants = rng.choice(len(_TENANTS), size=n, p=_TENANT_P)
    prios = rng.choice(len(_PRIOS), size=n, p=_PRIO_P)
    return tenants, prios


def _build(rows: list[dict], catalog: Catalog, settings: Settings | None) -> list[Request]:
    ctx = validation_context(catalog, settings)
    return [Request.model_validate(r, context=ctx) for r in rows]


def _cap_output(catalog: Catalog, prov: str, model: str, out: int) -> int:
    return min(out, catalog.model(prov, model).max_output_tokens)


def from_azure(path: str | Path, *, seed: int = 0, model: str | None = None, catalog: Catalog | None = None,
               settings: Settings | None = None, limit: int | None = None) -> list[Request]:
    """Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens) to requests."""
    catalog = catalog or default_catalog()
    forced = _parse_model(model)
    p = Path(path)
    try:
        with p.open(newline="", encoding="utf-8") as fh:
            data = list(csv.DictReader(fh))
    except OSError as exc:
        raise TraceError([(str(p), 0, "file", f"cannot read: {exc.strerror}")]) from exc
    need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
    if data and not need <= set(data[0]):
        raise TraceError([(str(p), 1, "header", f"expected columns {sorted(need)}, got {sorted(data[0])}")])
    rng = np.random.default_rng(seed)
    tenants, prios = _common(rng, len(data))
    models = rng.choice(len(TEXT_MIX), size=len(data), p=[m[2] for m in TEXT_MIX])
    rows, t0 = [], None
    # Assignments are drawn for the whole file, then cut, so row i gets the same values whatever the limit.
    for i, row in enumerate(data[:limit] if limit is not None else data):
        try:
            # Fractional seconds carry 7 digits; Python parses at most 6.
            ts = datetime.strptime(row["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            ctx_tokens, gen_tokens = int(row["ContextTokens"]), int(row["GeneratedTokens"])
        except (ValueError, KeyError) as exc:
            raise TraceError([(str(p), i + 2, "row", f"cannot parse {row}: {exc}")]) from exc
        t0 = ts if t0 is None else t0
        prov, name = forced or TEXT_MIX[models[i]][:2]
        rows.append({
            "id": f"{p.stem}-{i}", "arrival_s": round(ts - t0, 6), "tenant": _TENANTS[tenants[i]],
            "provider": prov, "model": name, "prompt": f"{p.stem} request {i}",
            "input_tokens": ctx_tokens, "output_tokens": _cap_output(catalog, prov, name, gen_tokens),
            "priority": _PRIOS[prios[i]], "reuse": "exact",
        })
    return _build(rows, catalog, settings)


def from_mooncake(path: str | Path, *, seed: int = 0, model: str | None = None, catalog: Catalog | None = None,
                  settings: Settings | None = None, limit: int | None = None) -> list[Request]:
    """Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids) to requests; hash_ids become
    prefix_blocks (512 tokens each)."""
    catalog = catalog or default_catalog()
    forced = _parse_model(model)
    p = Path(path)
    rng = np.random.default_rng(seed)
    weights = np.array([m[2] for m in TEXT_MIX])
    cum = np.cumsum(weights) / weights.sum()
    salt = int(rng.integers(1 << 62))
    raw = []
    try:
        with p.open(encoding="utf-8") as fh:
            for no, line in enumerate(fh, start=1):
                if line.strip():
                    try:
                        raw.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise TraceError([(str(p), no, "line", f"not valid JSON: {exc.msg}")]) from exc
    except OSError as exc:
        raise TraceError([(str(p), 0, "file", f"cannot read: {exc.strerror}")]) from exc
    tenants, prios = _common(rng, len(raw))
    rows = []
    for i, r in enumerate(raw[:limit] if limit is not None else raw):
        blocks = [int(b) for b in r.get("hash_ids", [])]
        key = hashlib.blake2b(f"{salt}:{blocks[:2]}".encode(), digest_size=8).digest()
        u = int.from_bytes(key, "big") / 2**64
        prov, name = forced or TEXT_MIX[int(np.searchsorted(cum, u, side="right"))][:2]
        digest = hashlib.blake2b(json.dumps(blocks).encode(), digest_size=8).hexdigest()
        rows.append({
            "id": f"{p.stem}-{i}", "arrival_s": float(r["timestamp"]) / 1000.0, "tenant": _TENANTS[tenants[i]],
            "provider": prov, "model": name, "prompt": f"mooncake prompt {digest}",
            "input_tokens": int(r["input_length"]),
            "output_tokens": _cap_output(catalog, prov, name, int(r["output_length"])),
            "prefix_blocks": blocks, "priority": _PRIOS[prios[i]], "reuse": "exact",
        })
    return _build(rows, catalog, settings)


# --- synthetic workload -------------------------------------------------------------------------------------

_PRODUCTS = ["espresso machine", "trail running shoe", "noise-cancelling headphones", "standing desk",
             "cast iron skillet", "mechanical keyboard", "yoga mat", "electric kettle", "camping tent",
             "smart thermostat", "leather wallet", "robot vacuum", "air purifier", "road bike helmet"]
_TONES = ["friendly", "formal", "playful", "concise", "luxurious", "technical"]
_TASKS = ["Write a {tone} product description for a {item}.",
          "Summarise customer reviews of the {item} in a {tone} voice.",
          "Draft a {tone} marketing email announcing a sale on the {item}.",
          "List five {tone} social media captions for the {item}."]
_SUBJECTS = ["a red vintage car", "a golden retriever puppy", "a lighthouse on a cliff", "a bowl of ramen",
             "a futuristic city skyline", "an astronaut riding a horse", "a cup of coffee on a wooden table",
             "a snowy mountain cabin", "a koi pond", "a hot air balloon"]
_STYLES = ["watercolor", "photorealistic", "studio ghibli", "oil painting", "isometric 3d", "neon cyberpunk"]
_LIGHT = ["at sunset", "at night", "in soft morning light", "under studio lights", "in the rain"]
_COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
_IMAGE_MODELS = (("openai", "gpt-image-1", 0.3), ("google", "imagen-4", 0.2), ("modal-h100", "flux-1-dev", 0.5))
_VIDEO_MODELS = (("openai", "sora-2", 0.25), ("google", "veo-3-fast", 0.25), ("modal-h100", "wan-2.1-t2v", 0.5))


def _pick(rng: np.random.Generator, options: tuple[tuple[str, str, float], ...]) -> tuple[str, str]:
    i = rng.choice(len(options), p=[o[2] for o in options])
    return options[i][0], options[i][1]


def synth(n: int = 5000, *, seed: int = 0, duration_s: float = 3600.0, catalog: Catalog | None = None,
          settings: Settings | None = None) -> list[Request]:
    """A seeded mixed workload: text campaigns sharing a system prompt (prefix blocks), image and video
    campaigns of similar prompts, exact re-submissions (8 %), near-duplicate paraphrases (5 %), look-alikes
    that change a colour or number (3 %, must not be reused), several tenants and a priority mix."""
    if n < 1:
        raise TraceError([("synth", 0, "n", "--n must be >= 1")])
    catalog = catalog or default_catalog()
    rng = np.random.default_rng(seed)
    n_campaigns = max(3, n // 150)
    campaigns = []
    for c in range(n_campaigns):
        kind = rng.choice(["text", "image", "video"], p=[0.6, 0.25, 0.15])
        start = float(rng.uniform(0, duration_s * 0.9))
        window = float(rng.uniform(60, 900))
        prio_p = [(0.5, 0.5, 0.0), (0.05, 0.75, 0.2), (0.0, 0.3, 0.7)][rng.choice(3, p=[0.15, 0.55, 0.30])]
        if kind == "text":
            prov, model = _pick(rng, TEXT_MIX)
            prefix = [int(x) for x in (10_000_000 + c * 100 + np.arange(int(rng.integers(2, 7))))]
            params: dict = {}
        elif kind == "image":
            prov, model = _pick(rng, _IMAGE_MODELS)
            prefix = []
            table = catalog.model(prov, model).per_image or catalog.model(prov, model).gpu_s_per_image or {}
            params = {"size": str(rng.choice(sorted(table)))}
        else:
            prov, model = _pick(rng, _VIDEO_MODELS)
            prefix = []
            spec = catalog.model(prov, model)
            table = spec.per_second or spec.gpu_s_per_video_second or {}
            params = {"resolution": str(rng.choice(sorted(table))), "duration_s": float(rng.choice([4, 5, 8]))}
        campaigns.append(dict(kind=str(kind), start=start, window=window, prio_p=prio_p, provider=prov,
                              model=model, prefix=prefix, params=params,
                              tenant=_TENANTS[rng.choice(4, p=_TENANT_P)], style=str(rng.choice(_STYLES))))
    rows: list[dict] = []
    for i in range(n):
        u = rng.random()
        if rows and u < 0.08:  # exact re-submission of an earlier request
            src = rows[int(rng.integers(len(rows)))]
            row = dict(src, id=f"synth-{i}", arrival_s=min(src["arrival_s"] + float(rng.exponential(300)),
                                                           duration_s * 1.2))
            rows.append(row)
            continue
        if rows and u < 0.16:  # a paraphrase (reuse welcome) or a look-alike that changes the output
            src = rows[int(rng.integers(len(rows)))]
            if u < 0.13:
                prompt = "Please " + src["prompt"][0].lower() + src["prompt"][1:]
            elif src["kind"] == "text":
                prompt = src["prompt"].replace("five", "ten") if "five" in src["prompt"] else "Do not " + src[
                    "prompt"][0].lower() + src["prompt"][1:]
            else:
                old = next((c for c in _COLOURS if c in src["prompt"]), None)
                prompt = src["prompt"].replace(old, "blue" if old != "blue" else "green") if old else (
                    src["prompt"] + " with two moons")
            row = dict(src, id=f"synth-{i}", prompt=prompt, reuse="near",
                       arrival_s=min(src["arrival_s"] + float(rng.exponential(300)), duration_s * 1.2))
            rows.append(row)
            continue
        c = campaigns[int(rng.integers(n_campaigns))]
        arrival = c["start"] + float(rng.uniform(0, c["window"]))
        prio = _PRIOS[rng.choice(3, p=c["prio_p"])]
        reuse = str(rng.choice(["exact", "near", "none"], p=[0.7, 0.2, 0.1]))
        row = {"id": f"synth-{i}", "arrival_s": round(arrival, 3), "tenant": c["tenant"], "provider": c["provider"],
               "model": c["model"], "kind": c["kind"], "priority": prio, "reuse": reuse, "params": dict(c["params"])}
        if c["kind"] == "text":
            tpl = _TASKS[int(rng.integers(len(_TASKS)))]
            row["prompt"] = tpl.format(tone=rng.choice(_TONES), item=rng.choice(_PRODUCTS)) + f" Ref {i}."
            row["prefix_blocks"] = c["prefix"]
            row["input_tokens"] = len(c["prefix"]) * 512 + int(rng.integers(40, 600))
            row["output_tokens"] = int(rng.integers(80, 900))
        else:
            colour = rng.choice(_COLOURS)
            subj = str(rng.choice(_SUBJECTS)).replace("a red", f"a {colour}")
            row["prompt"] = f"{subj}, {c['style']} style, {rng.choice(_LIGHT)}"
        if prio == "urgent":
            row["deadline_s"] = float(rng.uniform(120, 600)) if c["kind"] != "text" else float(rng.uniform(30, 300))
        elif prio == "normal":
            row["deadline_s"] = float(rng.uniform(1800, 4 * 3600))
        rows.append(row)
    return _build(rows, catalog, settings)
