"""Trace builders: from the real Azure and Mooncake traces, and a seeded synthetic workload.

Token counts, arrival times and prefix hashes from real data stay exactly as recorded. What the real data
lacks is assigned by the seeded rules below (also in docs/traces.md), so the same seed gives the same trace:

* tenant: ``tenant-a..d`` with probabilities 0.4 / 0.3 / 0.2 / 0.1;
* priority: urgent 0.10, normal 0.60, background 0.30; deadline: the settings' default for that priority;
* provider/model: the text mix ``TEXT_MIX`` (or one model forced with ``model=``). For Mooncake the draw is
  keyed on the request's first two prefix blocks, so a conversation and its follow-ups stay on one model and
  their shared prefix can hit that model's prompt cache;
* ``today=`` (``--current-models``): a drawn model shut down by that day is written as its catalog successor
  (docs/traces.md, "Current models"); without it the builders write the mix as it is, so the benchmarks hold;
* prompt: a placeholder naming the source row (Azure: unique per row; Mooncake: derived from the full
  ``hash_ids`` list, so a re-sent identical prompt is an exact duplicate); reuse: ``exact``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from datetime import date, datetime, timezone
from pathlib import Path

import numpy as np

from engine.core._tracegen_rows import (
    _PRIOS,
    _TENANT_P,
    _TENANTS,
    TEXT_MIX,
    Problems,
    _build,
    _cap_output,
    _common,
    _count,
    _current,
    _parse_model,
    _served,
)
from engine.core.catalog import Catalog, default_catalog
from engine.core.errors import TraceError
from engine.core.request import Request
from engine.core.settings import Settings
from engine.core.trace import TraceRequests, read_lines

__all__ = ["TEXT_MIX", "drawn_models", "from_azure", "from_mooncake", "synth"]


def from_azure(path: str | Path, *, seed: int = 0, model: str | None = None, catalog: Catalog | None = None,
               settings: Settings | None = None, limit: int | None = None, today: date | None = None) -> TraceRequests:
    """Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens) to requests. Arrivals start at
    0; the first one's time of day is kept as the trace's ``day_origin_s`` (timestamps read as UTC: the data
    names no zone)."""
    catalog = catalog or default_catalog()
    forced = _parse_model(model, catalog)
    p = Path(path)
    src = str(p)
    problems: Problems = []
    numbered = list(read_lines(p, problems))
    nos = [no for no, _ in numbered]
    reader = csv.DictReader(text for _, text in numbered)
    need = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
    missing = [c for c in need if c not in (reader.fieldnames or [])]
    head = next((text.strip() for _, text in numbered if text.strip()), "")
    if missing and head.startswith("{"):  # JSON lines, not a CSV: their commas are no column names
        fix = ("a Mooncake trace goes through `smartbatch trace from-mooncake`" if '"input_length"' in head else
               "if it is already a trace (id, arrival_s, model, ...), give it to `smartbatch bench` as it is")
        raise TraceError([(src, nos[0], "file", f"JSON lines, not an Azure CSV: {fix}")], hint="")
    if missing:
        got = reader.fieldnames or "an empty file"
        raise TraceError([(src, nos[0] if nos else 0, "header", f"missing column(s) {missing}; the first line must "
                           f"name {list(need)}, got {got}")], hint="")
    data = [(nos[reader.line_num - 1], row) for row in reader]
    rng = np.random.default_rng(seed)
    tenants, prios = _common(rng, len(data))
    models = rng.choice(len(TEXT_MIX), size=len(data), p=[m[2] for m in TEXT_MIX])
    parsed = []
    # Assignments are drawn for the whole file, then cut, so row i gets the same values whatever the limit.
    for i, (no, row) in enumerate(data[:limit] if limit is not None else data):
        stamp = row.get("TIMESTAMP")
        try:
            # Fractional seconds carry 7 digits; Python parses at most 6. UTC, not the machine's zone: the
            # time of day kept must not depend on where the trace is built.
            ts = datetime.strptime((stamp or "").strip()[:26], "%Y-%m-%d %H:%M:%S.%f").replace(
                tzinfo=timezone.utc).timestamp()
        except ValueError:
            problems.append((src, no, "TIMESTAMP", f"{stamp!r} is not a time like 2023-11-16 18:15:46.6805900"))
            ts = None
        ctx_tokens = _count(row.get("ContextTokens"), src, no, "ContextTokens", problems, cell=True)
        gen_tokens = _count(row.get("GeneratedTokens"), src, no, "GeneratedTokens", problems, cell=True)
        if ts is not None and ctx_tokens is not None and gen_tokens is not None:
            parsed.append((i, no, ts, ctx_tokens, gen_tokens))
    t0 = min((x[2] for x in parsed), default=0.0)  # the first row, in a file sorted by time
    rows = []
    for i, no, ts, ctx_tokens, gen_tokens in parsed:
        prov, name = _current(catalog, *(forced or TEXT_MIX[models[i]][:2]), today)
        rows.append((no, {
            "id": f"{p.stem}-{i}", "arrival_s": round(ts - t0, 6), "tenant": _TENANTS[tenants[i]],
            "provider": prov, "model": name, "prompt": f"{p.stem} request {i}",
            "input_tokens": ctx_tokens, "output_tokens": _cap_output(catalog, prov, name, gen_tokens),
            "priority": _PRIOS[prios[i]], "reuse": "exact",
        }))
    # The first arrival's time of day (a Unix day is 86,400 s), to the microsecond the stamps give.
    origin = round(t0 % 86400.0, 6) % 86400.0
    return TraceRequests(_build(rows, catalog, settings, src, problems), day_origin_s=origin)


def from_mooncake(path: str | Path, *, seed: int = 0, model: str | None = None, catalog: Catalog | None = None,
                  settings: Settings | None = None, limit: int | None = None,
                  today: date | None = None) -> list[Request]:
    """Mooncake JSONL (timestamp ms, input_length, output_length, hash_ids) to requests; hash_ids become
    prefix_blocks (512 tokens each)."""
    catalog = catalog or default_catalog()
    forced = _parse_model(model, catalog)
    p = Path(path)
    src = str(p)
    rng = np.random.default_rng(seed)
    weights = np.array([m[2] for m in TEXT_MIX])
    cum = np.cumsum(weights) / weights.sum()
    salt = int(rng.integers(1 << 62))
    problems: Problems = []
    raw = []
    first = None  # the first line with text: a CSV header says which builder the file is for
    for no, line in read_lines(p, problems):
        if line.strip():
            first = first or line
            try:
                raw.append((no, json.loads(line)))
            except (ValueError, RecursionError) as exc:
                why = exc.msg if isinstance(exc, json.JSONDecodeError) else "too deep or too long a number"
                problems.append((src, no, "line", f"not valid JSON ({why})"))
    if not raw and first and "," in first and "{" not in first and all("JSON" in p[3] for p in problems):
        # A CSV (an Azure trace's): the wrong kind of file, said once rather than per line.
        # The file is the problem, not its rows: the row builders' hint would say to fix rows (a helper's tour).
        raise TraceError([(src, problems[0][1], "file", "a CSV, not a JSONL trace: an Azure trace's CSV goes "
                                                        "through `smartbatch trace from-azure`")], hint="")
    tenants, prios = _common(rng, len(raw))
    rows = []
    for i, (no, r) in enumerate(raw[:limit] if limit is not None else raw):
        if not isinstance(r, dict):
            problems.append((src, no, "line", "a row must be a JSON object with timestamp, input_length, "
                                              "output_length and hash_ids"))
            continue
        stamp = r.get("timestamp")
        ok = not isinstance(stamp, bool) and isinstance(stamp, (int, float)) and 0 <= stamp < float("inf")
        if not ok:
            problems.append((src, no, "timestamp", f"must be a number of milliseconds >= 0, got {stamp!r:.60}"))
        n_in = _count(r.get("input_length"), src, no, "input_length", problems)
        n_out = _count(r.get("output_length"), src, no, "output_length", problems)
        blocks = r.get("hash_ids", [])
        if not isinstance(blocks, list) or not all(isinstance(b, int) and not isinstance(b, bool) for b in blocks):
            problems.append((src, no, "hash_ids", f"must be a list of whole numbers, got {blocks!r:.60}"))
            ok = False
        if not ok or n_in is None or n_out is None:
            continue
        key = hashlib.blake2b(f"{salt}:{blocks[:2]}".encode(), digest_size=8).digest()
        u = int.from_bytes(key, "big") / 2**64
        prov, name = _current(catalog, *(forced or TEXT_MIX[int(np.searchsorted(cum, u, side="right"))][:2]), today)
        digest = hashlib.blake2b(json.dumps(blocks).encode(), digest_size=8).hexdigest()
        rows.append((no, {
            "id": f"{p.stem}-{i}", "arrival_s": float(stamp) / 1000.0, "tenant": _TENANTS[tenants[i]],
            "provider": prov, "model": name, "prompt": f"mooncake prompt {digest}",
            "input_tokens": n_in, "output_tokens": _cap_output(catalog, prov, name, n_out),
            "prefix_blocks": blocks, "priority": _PRIOS[prios[i]], "reuse": "exact",
        }))
    return _build(rows, catalog, settings, src, problems)


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


def drawn_models(media: bool = False) -> tuple[tuple[str, str], ...]:
    """The models the builders draw (``media``: synth's image and video ones too), as written without ``today=``."""
    return tuple((p, m) for p, m, _ in TEXT_MIX + ((_IMAGE_MODELS + _VIDEO_MODELS) if media else ()))


def _pick(rng: np.random.Generator, options: tuple[tuple[str, str, float], ...]) -> tuple[str, str]:
    i = rng.choice(len(options), p=[o[2] for o in options])
    return options[i][0], options[i][1]


def _cover_text_providers(campaigns: list[dict]) -> None:
    """Give every text provider of ``TEXT_MIX`` at least one text campaign where there are enough of them (two
    per provider), so a small workload (the demo's) exercises each provider's path. Drawn without the generator:
    a trace that already covers them (any large one) is unchanged."""
    text = [c for c in campaigns if c["kind"] == "text"]
    providers = dict.fromkeys(p for p, _, _ in TEXT_MIX)
    if len(text) < 2 * len(providers):  # a handful of campaigns: too few to spread without bending the mix
        return
    for prov in providers:
        if any(c["provider"] == prov for c in text):
            continue
        counts = {p: sum(c["provider"] == p for c in text) for p in {c["provider"] for c in text}}
        donor = [c for c in text if counts and counts[c["provider"]] == max(counts.values()) > 1]
        if not donor:
            return
        donor[-1]["provider"], donor[-1]["model"] = next((p, m) for p, m, _ in TEXT_MIX if p == prov)


def synth(n: int = 5000, *, seed: int = 0, duration_s: float = 3600.0, catalog: Catalog | None = None,
          settings: Settings | None = None, today: date | None = None) -> list[Request]:
    """A seeded mixed workload: text campaigns sharing a system prompt (prefix blocks), image and video
    campaigns of similar prompts, exact re-submissions (8 %), near-duplicate paraphrases (5 %), look-alikes
    that change a colour or number (3 %, must not be reused), several tenants and a priority mix."""
    if n < 1:
        raise TraceError([("--n", 0, "n", f"--n must be >= 1, got {n}")], hint="")
    catalog = catalog or default_catalog()
    rng = np.random.default_rng(seed)
    images, videos = _served(_IMAGE_MODELS, catalog, today), _served(_VIDEO_MODELS, catalog, today)
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
            prov, model = _pick(rng, images)
            prefix = []
            table = catalog.model(prov, model).per_image or catalog.model(prov, model).gpu_s_per_image or {}
            params = {"size": str(rng.choice(sorted(table)))}
        else:
            prov, model = _pick(rng, videos)
            prefix = []
            spec = catalog.model(prov, model)
            table = spec.per_second or spec.gpu_s_per_video_second or {}
            resolution, dur = str(rng.choice(sorted(table))), float(rng.choice([4, 5, 8]))
            if spec.durations_s is not None and dur not in spec.durations_s:
                # The nearest length the model takes (sora-2: 5 s is 4 s), drawn as before: a seed gives the
                # same trace for every other model.
                dur = min(spec.durations_s, key=lambda a: (abs(a - dur), a))
            if dur not in (spec.durations_at or {}).get(resolution, (dur,)):  # Veo 3.1 makes 1080p at 8 s only
                dur = min(spec.durations_at[resolution], key=lambda a: (abs(a - dur), a))
            params = {"resolution": resolution, "duration_s": dur}
        campaigns.append(dict(kind=str(kind), start=start, window=window, prio_p=prio_p, provider=prov,
                              model=model, prefix=prefix, params=params,
                              tenant=_TENANTS[rng.choice(4, p=_TENANT_P)], style=str(rng.choice(_STYLES))))
    _cover_text_providers(campaigns)
    for c in campaigns if today is not None else ():  # text rows carry no params the successor could refuse
        c["model"] = catalog.current(c["provider"], c["model"], today)
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
    return _build(list(enumerate(rows, start=1)), catalog, settings, "synth", [])
