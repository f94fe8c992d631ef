"""Near-duplicate precision/recall on real paraphrase pairs (tuned on one half, measured on the other), and cache
lookup speed. Prints every figure of docs/cache.md.

    .venv/bin/python benchmarks/bench_cache.py [--data ../shared/data/real] [--redis-url redis://...]
                                               [--skip-speed] [--skip-quality] [--seed 0] [--show-wrong]
                                               [--splits N]

Quality (``engine/core/_pair_eval.py``): each pair file is split at random (``--seed``) into a tune half and a
held-out half by duplicate cluster, so no text is in both. On a half, the cache holds every ``similar`` text and
each ``origin`` asks for its top-1 match, as GPTCache's own benchmark does; a hit is right when the match lies
in the origin's cluster (QQP repeats questions across rows: rows are joined by union-find). The text threshold
is the lowest one keeping precision >= 99.5 % on the tune halves of both files, and on both pooled with one
wrong hit to spare; the held-out halves say what it is worth. Every figure is given under the raw labels and,
beside it, "folded" ones (texts equal but for case, punctuation and spacing are one question);
``--show-wrong`` lists the hits the raw labels call wrong with the evidence to judge them, and ``--splits N``
repeats the whole measurement on N random splits to show how much a figure moves with the split. Speed: a batch of 1,000 lookups against 100,000 entries of one class, exact (fingerprint dict,
then Redis MGET if a URL is given) and near (``engine/runtime/reuse.py``), with the agreement of the index
with exact search; and the embedding's cold load and throughput.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _real import DATA  # noqa: E402

from engine.core import embedding  # noqa: E402
from engine.core._pair_eval import Scored, choose_threshold, clusters, load_pairs, score, split  # noqa: E402
from engine.core.features import (  # noqa: E402
    NEAR_DIM,
    featurize_texts,
    near_min_threshold,
    near_space,
    near_vectors_texts,
)
from engine.core.similarity import GUARDS, Guards  # noqa: E402
from engine.runtime.reuse import ReuseIndex  # noqa: E402

DEFAULT_DATA = DATA
SWEEP = (0.85, 0.88, 0.9, 0.91, 0.92, 0.925, 0.93, 0.94, 0.95, 0.96)
TARGET = 0.995
# Image prompts that differ in one visual attribute no guard knows (should stay apart), and rewordings.
MEDIA_PAIRS = (
    ("a castle on a hill at sunset, fantasy art", "a castle on a hill at sunrise, fantasy art", False),
    ("a futuristic city skyline at night, cyberpunk style", "a futuristic city skyline at night, steampunk style",
     False),
    ("portrait of an old man, studio lighting, 85mm", "portrait of an old woman, studio lighting, 85mm", False),
    ("a bowl of ramen, top view, food photography", "a bowl of pho, top view, food photography", False),
    ("a cat sleeping on a sofa, watercolor", "a cat sleeping on a sofa, oil painting", False),
    ("a cat sleeping on a sofa, watercolor", "a dog sleeping on a sofa, watercolor", False),
    ("A cat sleeping on a sofa, watercolor.", "a cat sleeping on a sofa, watercolor", True),
    ("a cat sleeping on a sofa, watercolor", "watercolor painting of a cat asleep on a couch", True),
    ("timelapse of clouds over a mountain lake", "time-lapse of clouds moving over a lake in the mountains", True),
)


def hashed(texts: list[str]) -> np.ndarray:
    return featurize_texts(texts, dim=NEAR_DIM)


def _row(t: dict, mark: str = "", f: dict | None = None) -> str:
    row = (f"| {t['threshold']}{mark} | {t['hits']} | {t['right']} | {t['wrong']} | {t['precision']:.2%} | "
           f"{t['recall']:.2%} | {t['same_text']} |")
    return row if f is None else row + f" {f['wrong']} | {f['precision']:.2%} | {f['recall']:.2%} |"


def _both(s: Scored, t: float) -> str:
    """The raw and the folded figures of ``s`` at ``t``, one table row."""
    return _row(s.at(t), f=s.at(t, folded=True))


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


HEAD = "| threshold | hits | right | wrong | precision | recall | same text |\n|---|---|---|---|---|---|---|"
HEAD_BOTH = ("| threshold | hits | right | wrong | precision | recall | same text | wrong, folded | precision, folded "
             "| recall, folded |\n|---|---|---|---|---|---|---|---|---|---|")


def split_figures(pairs: dict[str, list[dict]], seed: int) -> tuple[float | None, dict[str, Scored]]:
    """The threshold the tune halves of split ``seed`` choose, and the scored held-out halves."""
    halves = {name: split(rows, seed) for name, rows in pairs.items()}
    tune = [score(h[0], near_vectors_texts) for h in halves.values()]
    return choose_threshold(tune, TARGET), {name: score(h[1], near_vectors_texts) for name, h in halves.items()}


def splits_table(pairs: dict[str, list[dict]], n: int) -> None:
    """The whole measurement (threshold chosen on the tune halves, figures on the held-out ones) on ``n`` splits."""
    print(f"\n### {n} random splits (seeds 0-{n - 1}): held out, at the threshold each split's tune halves choose\n")
    cols = " | ".join(f"{name} precision | {name} recall | {name} precision, folded" for name in pairs)
    print(f"| seed | threshold | {cols} |\n|---|---|" + "---|---|---|" * len(pairs))
    for seed in range(n):
        chosen, held = split_figures(pairs, seed)
        t = 1.0 if chosen is None else chosen
        cells = " | ".join(f"{s.at(t)['precision']:.2%} | {s.at(t)['recall']:.2%} | "
                           f"{s.at(t, folded=True)['precision']:.2%}" for s in held.values())
        print(f"| {seed} | {chosen} | {cells} |")


def show_wrong(pairs: dict[str, list[dict]], held: dict[str, Scored], chosen: float) -> None:
    """Every held-out hit the raw labels call wrong, with the evidence to judge it by hand."""
    for name, s in held.items():
        audit = s.audit(chosen)
        linked = clusters(pairs[name])  # every labelled pair of the file, tune and held out
        n_linked = sum(linked(w.origin) == linked(w.match) for w in audit)
        runner_up = sum(w.partner_rank == 2 for w in audit)
        print(f"\n### {name}, held out: the {len(audit)} hits its labels call wrong at {chosen}, to read by hand\n")
        print(f"Linked as duplicates through the pairs of the whole file (both halves): {n_linked}; right under the folded "
              f"labels (equal but for case, punctuation and spacing): {sum(w.right_folded for w in audit)}; the origin's "
              f"labelled duplicate was the runner-up: {runner_up}.\n")
        print("| cosine | origin | its match | right, folded | labelled duplicate: rank, cosine |\n|---|---|---|---|---|")
        for w in audit:
            print(f"| {w.sim:.3f} | {_cell(w.origin)} | {_cell(w.match)} | {'yes' if w.right_folded else 'no'} | "
                  f"{w.partner_rank}, {w.partner_sim:.3f} |")


def quality(data: Path, seed: int, wrong: bool = False, n_splits: int = 1) -> None:
    pairs = load_pairs(data)
    halves = {name: split(rows, seed) for name, rows in pairs.items()}
    t0 = time.perf_counter()
    tune = {name: score(h[0], near_vectors_texts) for name, h in halves.items()}
    held = {name: score(h[1], near_vectors_texts) for name, h in halves.items()}
    scored_s = time.perf_counter() - t0
    chosen = choose_threshold(list(tune.values()), TARGET)
    print(f"vectors: {near_space()}; split seed {seed}; scoring both halves took {scored_s:.1f} s")
    for name, (tu, he) in halves.items():
        print(f"- {name}: {len(tu)} tune rows, {len(he)} held-out rows")
    print(f"\ntext threshold chosen on the tune halves (precision >= {TARGET:.1%} on each, and pooled with one "
          f"wrong hit more): {chosen}; "
          f"in use (features.near_min_threshold('text')): {near_min_threshold('text')}")
    print("\n### held out, at the chosen threshold (raw labels; folded: texts equal but for case, punctuation and "
          "spacing are one question)\n")
    print("| data |" + HEAD_BOTH[1:].replace("|\n|", "|\n|---|", 1))
    for name, s in held.items():
        print(f"| {name} |" + _both(s, 1.0 if chosen is None else chosen)[1:])
    for name, rows in halves.items():
        base = score(rows[1], hashed)
        print(f"\n### {name}, held out, sweep (all guards)\n\n{HEAD_BOTH}")
        for t in SWEEP:
            print(_both(held[name], t).replace(f"| {t} |", f"| {t} (chosen) |", 1) if t == chosen
                  else _both(held[name], t))
        print(f"\n{name}, held out, without guards:\n\n{HEAD}")
        for t in SWEEP:
            print(_row(held[name].at(t, guarded=False)))
        print(f"\n{name}, held out, hashed n-grams alone (the fallback), all guards:\n\n{HEAD}")
        for t in SWEEP:
            print(_row(base.at(t)))
    if wrong and chosen is not None:
        show_wrong(pairs, held, chosen)
    if n_splits > 1:
        splits_table(pairs, n_splits)
    print(f"\nguards: {list(GUARDS)}")
    print(f"\n### image prompts (no labelled pairs); image threshold {near_min_threshold('image')}\n")
    print("| cosine | same picture? | a | b |\n|---|---|---|---|")
    for a, b, same in MEDIA_PAIRS:
        v = near_vectors_texts([a, b])
        print(f"| {float(v[0] @ v[1]):.3f} | {'yes' if same else 'no'} | {a} | {b} |")


def speed(n_entries: int = 100_000, batch: int = 1000, redis_url: str | None = None, runs: int = 20) -> dict:
    from engine.core.features import fingerprint
    from engine.core.tracegen import synth

    reqs = synth(n_entries, seed=7)
    texts = [f"{r.prompt} #{k}" for k, r in enumerate(reqs)]  # distinct entries
    t0 = time.perf_counter()
    vecs = near_vectors_texts(texts)
    feat_all_s = time.perf_counter() - t0
    fps = [fingerprint(r) + f"{k}" for k, r in enumerate(reqs)]
    idx = ReuseIndex(vecs.shape[1])
    t0 = time.perf_counter()
    for k, fp in enumerate(fps):
        idx.add(fp, k, 0.0)
    idx.add_near("class", vecs, list(range(n_entries)), texts, [0.0] * n_entries)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    pick = rng.choice(n_entries, batch, replace=False)
    q_fps = [fps[k] if j % 2 else f"missing-{k}" for j, k in enumerate(pick)]
    # Queries: half are small edits of stored texts (should hit), half are unrelated (should miss).
    q_texts = [f"Please {texts[k][0].lower()}{texts[k][1:]}" if j % 2 else f"unrelated question number {k}?"
               for j, k in enumerate(pick)]
    t0 = time.perf_counter()
    q_vecs = near_vectors_texts(q_texts)
    feat_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    found = [idx.exact(fp) for fp in q_fps]
    exact_ms = (time.perf_counter() - t0) * 1e3
    threshold = near_min_threshold(None)  # the "class" key has no kind: the strictest minimum
    batch_ms = []
    for _ in range(runs):
        t0 = time.perf_counter()
        near = idx.near_many("class", q_vecs, q_texts, threshold, Guards())
        batch_ms.append((time.perf_counter() - t0) * 1e3)
    one_ms = []
    for j in range(batch):  # one query per call, as a request arriving alone
        t0 = time.perf_counter()
        idx.near("class", q_vecs[j], q_texts[j], threshold, Guards())
        one_ms.append((time.perf_counter() - t0) * 1e3)
    # Exact search for comparison: which queries have a true match at the threshold, and is it the one the
    # index returned?
    sims = q_vecs @ vecs.T
    brute, best = sims.argmax(1), sims.max(1)
    should = [j for j in range(batch) if best[j] >= threshold]
    tops = idx.top_many("class", q_vecs[should])  # before the guards: the index's own answer
    agree = float(np.mean([t is not None and t.source == brute[j] for j, t in zip(should, tops)])) if should else 1.0
    planted = float(np.mean([h is not None and h.source == k for j, (h, k) in enumerate(zip(near, pick)) if j % 2]))
    out = {"entries": n_entries, "batch": batch, "threshold": threshold, "index_build_s": round(build_s, 2),
           "featurize_100k_s": round(feat_all_s, 1), "exact_lookup_ms": round(exact_ms, 2),
           "exact_found": sum(f is not None for f in found), "featurize_batch_ms": round(feat_ms, 1),
           "near_batch_ms_median": round(float(np.median(batch_ms)), 1),
           "near_batch_ms_p99": round(float(np.percentile(batch_ms, 99)), 1),
           "near_one_query_ms_p50": round(float(np.median(one_ms)), 3),
           "near_one_query_ms_p99": round(float(np.percentile(one_ms, 99)), 3),
           "near_hits": sum(h is not None for h in near), "queries_with_a_match_by_exact_search": len(should),
           "index_finds_that_match": agree, "near_hits_on_planted_edits": planted}
    if redis_url:
        import redis

        r = redis.Redis.from_url(redis_url)
        pipe = r.pipeline(transaction=False)
        for k, fp in enumerate(fps):
            pipe.set(f"smartbatch-bench:{fp}", b"x" * 200, ex=600)
            if k % 10_000 == 9_999:
                pipe.execute()
        pipe.execute()
        t0 = time.perf_counter()
        vals = r.mget([f"smartbatch-bench:{fp}" for fp in q_fps])
        out["redis_mget_ms"] = round((time.perf_counter() - t0) * 1e3, 2)
        out["redis_found"] = sum(v is not None for v in vals)
        for k in range(0, len(fps), 10_000):
            r.delete(*[f"smartbatch-bench:{fp}" for fp in fps[k:k + 10_000]])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--redis-url", default=None)
    ap.add_argument("--seed", type=int, default=0, help="seed of the tune/held-out split")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--show-wrong", action="store_true",
                    help="print every held-out hit the labels call wrong, with both texts, to audit by hand")
    ap.add_argument("--splits", type=int, default=1,
                    help="also repeat the measurement on this many random splits (seeds 0..N-1), about 5 s each")
    args = ap.parse_args()
    t0 = time.perf_counter()
    try:
        embedder = embedding.load_embedder()
    except ImportError as exc:
        print(f"embedding unavailable ({exc}): hashed n-grams only")
    else:
        load_s = time.perf_counter() - t0
        sample = [f"How do I cook rice number {k} in a pressure cooker?" for k in range(10_000)]
        t0 = time.perf_counter()
        embedder.embed(sample)
        rate = len(sample) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for lo in range(0, len(sample), 40):  # about what one cache lookup featurises under load
            near_vectors_texts(sample[lo:lo + 40])
        near_rate = len(sample) / (time.perf_counter() - t0)
        print(f"embedding: {embedder!r}; cold load {load_s:.2f} s (once per process); {rate:,.0f} texts/s; "
              f"near-duplicate vectors (embedding and n-grams), 40 texts a call: {near_rate:,.0f} texts/s")
    if not args.skip_quality:
        quality(args.data, args.seed, args.show_wrong, args.splits)
    if not args.skip_speed:
        print("\n### lookup speed\n")
        for k, v in speed(redis_url=args.redis_url).items():
            print(f"- {k}: {v}")


if __name__ == "__main__":
    main()
