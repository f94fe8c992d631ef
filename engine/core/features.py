"""Feature vectors, compatibility keys and fingerprints of requests.

* ``near_vectors``: the one near-duplicate vector of a request, used by the simulator, the lower bound and
  the live cache actor alike. 256 float32 columns with unit
  rows: the first 128 columns of a sentence embedding (WordLlama, ``engine.core.embedding``, loaded once per
  process from its package's files) beside 128 columns of hashed n-grams, weighted so that a cosine is
  ``0.8 * embedding cosine + 0.2 * n-gram cosine``. The embedding sees a paraphrase ("is a platform to host" /
  "serves as a repository for"); the n-grams keep the wording apart when topics agree. Without the embedding
  package the vector is 256 hashed columns (and a log line says so). Requests whose parameters differ (an
  image's ``seed``) are never near duplicates: their vectors are nearly orthogonal.
* ``featurize_texts``: hashed n-gram vectors (signed feature hashing of word unigrams and bigrams, character
  3- and 4-grams of the normalised prompt, and the parameters), L2-normalised so a dot product is a cosine.
  Character n-grams are hashed for all requests at once with numpy; only word hashing runs per word.
* ``compat_key``: what must be equal for two requests to share one batch (same provider and model; for media
  also the output-shaping parameters such as size, resolution, duration, steps).
* ``fingerprint``: a stable hash of everything that determines the output, for exact reuse.

All hashes are stable across processes and machines (crc32 / blake2b, never Python's ``hash``), so vectors and
fingerprints stored in an external cache stay valid after a restart.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import unicodedata
import zlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

from engine.core import embedding as _embedding
from engine.core._logkeys import get_logger
from engine.core.body_tokens import sends_prompt
from engine.core.request import Request, split_body

if TYPE_CHECKING:
    import numpy as np

__all__ = ["DEFAULT_DIM", "MEDIA_COMPAT_PARAMS", "NEAR_DIM", "compat_key", "compat_kind", "featurize", "featurize_texts",
           "fingerprint", "near_class", "near_context", "near_min_threshold", "near_space", "near_text", "near_vectors", "near_vectors_texts",
           "exact_prompt", "normalise_prompt"]

DEFAULT_DIM = 1024
# Near-duplicate search reads every probed vector once per batch, so its cost is memory traffic: 256 columns
# hold the embedding and the n-grams at the precision and recall of wider ones (benchmarks/bench_cache.py).
NEAR_DIM = 256
# WordLlama is trained with nested (Matryoshka) dimensions, so its first 128 columns are a 128-d embedding.
_EMB_COLS = 128
_EMB_WEIGHT = 0.8  # share of the embedding in a near cosine; chosen on the tune half of the real pairs
# The lowest cosine at which these vectors grant a near duplicate, per kind (a policy may ask for more, never
# less). Text: the lowest threshold keeping precision >= 99.5 % on the tune half of both real pair sets
# (tests/unit/test_embedding.py re-derives it). Image and video have no labelled pairs: their prompts are short
# lists of visual attributes, where one swapped word ("sunset" / "sunrise", "cyberpunk" / "steampunk") that no
# guard knows still scores up to 0.91, so they ask for more (docs/cache.md).
_EMBEDDING_MIN = {"text": 0.925, "image": 0.95, "video": 0.95}
_log = get_logger("smartbatch.features")
# Parameters that change the shape of the work: jobs that differ in them cannot run in one GPU batch.
MEDIA_COMPAT_PARAMS: tuple[str, ...] = ("size", "resolution", "duration_s", "steps", "fps", "quality", "sampler")
_WORD = re.compile(r"\w+", re.UNICODE)
# numpy is imported where a vector is built, not at import: every actor imports this module for its hashes
# (``compat_key``, ``fingerprint``), and numpy cost a worker that builds no vector about 90 ms of CPU at start.
_MIX = 0x9E3779B97F4A7C15
_CHUNK_CHARS = 16_384
_SPACES = re.compile("(?<=[^ \n]) {2,}")  # within a line: a line's indentation is code's syntax
_SEP = "\x1f"  # between a fingerprint's fields


def normalise_prompt(text: str) -> str:
    """NFKC, trimmed, inner whitespace folded to one space. Case is kept: it can change an output."""
    # ASCII is its own NFKC, and str.split() splits on exactly the characters re's \s matches (both ask
    # str.isspace()): 5x faster on a 4 kB prompt than normalize() and a regex, the same text (tested).
    if not text.isascii():
        text = unicodedata.normalize("NFKC", text)
    return " ".join(text.split())


def exact_prompt(text: str) -> str:
    """A prompt as the exact-reuse key reads it: NFC, trimmed, runs of spaces within a line folded to one. Not
    NFKC, nor every whitespace: "What is 2³?" and "What is 23?", or a newline and a space (a question about line
    counts, a Makefile's tabs), are other questions, and were served one another's answers (a helper's fault
    hunt); nor a line's indentation, which is Python's and YAML's syntax (two snippets with a print in another
    block were one key; stop 54). Near reuse still finds the variants that are the same question. Case is kept:
    it can change an output."""
    if not text.isascii():
        text = unicodedata.normalize("NFC", text)
    return _SPACES.sub(" ", text.strip().replace(_SEP, " "))


def compat_key(req: Request) -> tuple:
    """Requests with equal keys may share a batch."""
    if req.kind == "text":
        return (req.provider, req.model, "text")
    shape = tuple((k, str(req.params[k])) for k in MEDIA_COMPAT_PARAMS if k in req.params)
    return (req.provider, req.model, req.kind, shape)


def compat_kind(key: tuple) -> str | None:
    """The kind a ``compat_key`` names (its third field), or None for a key of another shape."""
    return key[2] if isinstance(key, tuple) and len(key) > 2 and isinstance(key[2], str) else None


def fingerprint(req: Request, *, share_across_tenants: bool = False) -> str:
    """Hex digest of what determines the output: tenant scope, provider, model, kind, normalised prompt,
    parameters, and (for text) the prefix blocks and input size standing in for prompt text a trace may
    lack. Not the id, arrival, priority, deadline or reuse setting."""
    parts = [
        # Shared: a scope no tenant can be (tenants hold no control character). "*" was, and a tenant named so
        # in an engine that keeps tenants apart was served what another engine shared (a helper's hunt).
        "\x00*" if share_across_tenants else req.tenant, req.provider, req.model, req.kind,
        # A prompt beside a body that has its own text is a label, not sent: the body is hashed below (two labels
        # split one body). Beside a body without (a system prompt, sampling settings) it is the user's text:
        # left out, "Capital of France?" was answered with "Capital of Spain?"'s result (a helper's tour).
        exact_prompt(req.prompt) if sends_prompt(req.body, req.kind) else "",
        json.dumps(req.params, sort_keys=True, separators=(",", ":"), default=str) if req.params else "",
    ]
    if req.kind == "text":
        parts.append(",".join(map(str, req.prefix_blocks)))
        parts.append(str(req.input_tokens))
        # The cap is sent (max_tokens): a 16-token answer was served to the same prompt asked uncapped.
        parts.append(str(req.max_output_tokens))
    if shape := _unnamed(req.body):  # temperature, tools, a system prompt...: all of the body shapes the output
        parts.append(json.dumps(shape, sort_keys=True, separators=(",", ":"), default=str))
    # exact_prompt turns the separator inside a prompt into a space: no prompt reads as two fields.
    return hashlib.blake2b(_SEP.join(parts).encode(), digest_size=16).hexdigest()


def _char_ngram_hashes(texts: Sequence[str], n: int) -> tuple[np.ndarray, np.ndarray]:
    """(doc index, 64-bit hash) of every character n-gram of every text, computed in one numpy pass."""
    import numpy as np

    encoded = [t.encode("utf-8") for t in texts]
    lens = np.fromiter((len(e) for e in encoded), dtype=np.int64, count=len(encoded))
    buf = np.frombuffer(b"".join(encoded), dtype=np.uint8).astype(np.uint64)
    if buf.size < n:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    doc = np.repeat(np.arange(len(texts), dtype=np.int64), lens)
    m = buf.size - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(257) + buf[j:j + m] + np.uint64(1)
    h = (h + np.uint64(n)) * np.uint64(_MIX)
    h ^= h >> np.uint64(29)
    same_doc = doc[:m] == doc[n - 1:n - 1 + m]
    return doc[:m][same_doc], h[same_doc]


def featurize_texts(texts: Sequence[str], params: Sequence[dict] | None = None, *,
                    dim: int = DEFAULT_DIM, normalised: bool = False) -> np.ndarray:
    """Feature matrix ``(len(texts), dim)`` float32 with unit rows (all-zero rows for empty input).
    ``normalised``: the texts are ``normalise_prompt``'s already (it is idempotent, so this only saves time)."""
    import numpy as np

    if dim < 16:
        raise ValueError(f"dim must be >= 16, got {dim}")
    norm = [t.lower() for t in texts] if normalised else [normalise_prompt(t).lower() for t in texts]
    out = np.empty((len(norm), dim), dtype=np.float32)
    # A few dozen kB of text at a time: a prompt of thousands of characters has ~2.3 hashes per character, and
    # arrays of all of a batch's hashes at once spill out of the CPU's caches (4x slower on 4 kB prompts).
    # Each row's sums run in the same order either way, so the rows are equal bit for bit.
    start = 0
    while start < len(norm):
        stop, size = start + 1, len(norm[start])
        while stop < len(norm) and size + len(norm[stop]) <= _CHUNK_CHARS:
            size += len(norm[stop])
            stop += 1
        out[start:stop] = _featurize_chunk(norm[start:stop], None if params is None else params[start:stop], dim)
        start = stop
    return out


def _featurize_chunk(norm: Sequence[str], params: Sequence[dict] | None, dim: int) -> np.ndarray:
    import numpy as np

    n_docs = len(norm)
    unigrams: list[str] = []
    bigrams: list[str] = []
    n_uni = np.zeros(n_docs, dtype=np.int64)
    n_bi = np.zeros(n_docs, dtype=np.int64)
    for i, t in enumerate(norm):
        words = _WORD.findall(t)
        if params is not None and params[i]:
            words += [f"\x00{k}={v}" for k, v in sorted(params[i].items())]
        unigrams += words
        bigrams += [f"{a} {b}" for a, b in zip(words, words[1:])]
        n_uni[i] = len(words)
        n_bi[i] = max(len(words) - 1, 0)
    doc_parts, hash_parts, w_parts = [], [], []
    docs = np.arange(n_docs, dtype=np.int64)
    for grams, counts, weight in ((unigrams, n_uni, 1.5), (bigrams, n_bi, 2.0)):
        h = np.fromiter(map(zlib.crc32, map(str.encode, grams)), dtype=np.uint64, count=len(grams))
        doc_parts.append(np.repeat(docs, counts))
        hash_parts.append((h + np.uint64(1)) * np.uint64(_MIX))
        w_parts.append(np.full(h.size, weight))
    for n in (3, 4):
        d, h = _char_ngram_hashes(norm, n)
        doc_parts.append(d)
        hash_parts.append(h)
        w_parts.append(np.full(d.size, 0.5))
    doc = np.concatenate(doc_parts)
    h = np.concatenate(hash_parts)
    w = np.concatenate(w_parts)
    # A mask where the width is a power of two: the same column as the modulo, without a 64-bit division each.
    col = ((h >> np.uint64(1)) & np.uint64(dim - 1) if dim & (dim - 1) == 0
           else (h >> np.uint64(1)) % np.uint64(dim)).astype(np.int64)
    sign = np.where((h & np.uint64(1)) == 1, 1.0, -1.0)
    flat = np.bincount(doc * dim + col, weights=w * sign, minlength=n_docs * dim)
    mat = flat.reshape(n_docs, dim).astype(np.float32)
    lengths = np.sqrt(np.einsum("ij,ij->i", mat, mat))
    lengths[lengths == 0] = 1.0
    mat *= (1.0 / lengths)[:, None]
    return mat


def featurize(requests: Sequence[Request], *, dim: int = DEFAULT_DIM) -> np.ndarray:
    """Hashed n-gram feature matrix of requests (prompt and parameters), one call for any number. Near-duplicate
    search uses ``near_vectors``."""
    return featurize_texts([r.prompt for r in requests], [r.params for r in requests], dim=dim)


def near_vectors(requests: Sequence[Request]) -> np.ndarray:
    """The near-duplicate vectors of requests: ``near_vectors_texts`` of their ``near_text`` and parameters."""
    return near_vectors_texts([near_text(r) for r in requests], [r.params for r in requests])


def _unnamed(body: dict | None) -> dict | None:
    """``body`` without its ``model``: it equals the request's (validated), which the keys hold already, and the
    engine sets it on the wire. Named there, as the endpoint's and a batch file's bodies do, and not in a
    driver's, the same call had two keys and was paid twice (a helper's tour)."""
    return {k: v for k, v in body.items() if k != "model"} if body and "model" in body else body


def near_text(req: Request) -> str:
    """The text a near-duplicate search compares. A chat request (a ``body`` whose ``messages`` end with the
    user's turn) compares its last user message: the thresholds were tuned on questions, and a shared
    conversation would otherwise carry any two questions past them (docs/cache.md, the ``context`` guard). Any
    other request compares its whole prompt. What else must be equal is ``near_context``."""
    split = _chat_split(req)
    return req.prompt if split is None else split[0]


def near_context(req: Request) -> str | None:
    """A digest of what two near duplicates must share besides ``near_text``, or None without a ``body``: for a
    chat request everything else in the body (system prompt, earlier turns, tools, sampling settings, the last
    message's images or files); for another body all of it that is not prompt text (tools, an answer format,
    the roles of the messages, an image block: a request with tools and one without read the same text, and
    one was served the other's answer)."""
    body = _unnamed(req.body)
    if not body:
        return None
    if sends_prompt(body, req.kind):  # the prompt is the text compared; all of the body shapes the output
        return _digest(body)
    split = _chat_split(req)
    return _digest(split_body(body)[1] if split is None else split[1])


def _chat_split(req: Request) -> tuple[str, dict] | None:
    """(the last user message's text, the body with that text taken out) of a chat request, else None."""
    body = _unnamed(req.body)
    if not body or req.kind != "text" or "input" in body or "prompt" in body:
        return None
    messages = body.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, dict) or last.get("role") != "user":
        return None
    content = last.get("content")
    text = content if isinstance(content, str) else "\n".join(
        b["text"] for b in content if isinstance(b, dict) and b.get("type") == "text"
        and isinstance(b.get("text"), str)) if isinstance(content, list) else ""
    if not text.strip():
        return None
    rest = "" if isinstance(content, str) else [b for b in content if not (isinstance(b, dict) and b.get("type") == "text")]
    return text, {**body, "messages": [*messages[:-1], {**last, "content": rest}]}


def _digest(context: dict) -> str:
    return hashlib.blake2b(json.dumps(context, sort_keys=True, separators=(",", ":"), default=str).encode(),
                           digest_size=12).hexdigest()


def near_class(req: Request, scope: str) -> tuple:
    """The class a near-duplicate search runs in: ``(scope, compat_key)``, and the context digest of
    ``near_context`` when there is one. Its second field is the compatibility class, which shards the cache."""
    ctx = near_context(req)
    if req.kind == "text" and req.max_output_tokens is not None:
        # The cap is sent, as the exact key knows: a 16-token answer was served near to the same question asked
        # uncapped, the cap being the request's own field and not its body's (a helper's hunt).
        ctx = f"{ctx or ''}|max_output_tokens={req.max_output_tokens}"
    return (scope, compat_key(req)) if ctx is None else (scope, compat_key(req), ctx)


@functools.lru_cache(maxsize=1)
def _fallback_noted(reason: str) -> None:
    _log.warning("near-duplicate vectors use hashed n-grams only (%s); recall of paraphrases is low", reason)


def near_space() -> str:
    """Which vectors ``near_vectors`` makes in this process (thresholds are tuned per space)."""
    try:
        _embedding.load_embedder()
    except ImportError:
        return f"ngrams-{NEAR_DIM}"
    return f"{_embedding.MODEL}[:{_EMB_COLS}]+ngrams-{NEAR_DIM - _EMB_COLS}"


def near_min_threshold(kind: str | None, *, load: bool = True) -> float:
    """The lowest cosine at which ``near_vectors`` of this kind may be near duplicates: tuned for the embedding
    (text 0.925; image and video 0.95); 0 for the hashed fallback (its policy threshold and the engine's floor
    ``sim.near_floor`` decide, as before the embedding). ``load=False`` tells it from the installed files without
    reading the model, for a process that makes no vectors."""
    try:
        if load:
            _embedding.load_embedder()
        elif not _embedding.embedding_installed():
            return 0.0
    except ImportError:
        return 0.0
    return _EMBEDDING_MIN.get(kind or "", max(_EMBEDDING_MIN.values()))


def near_vectors_texts(texts: Sequence[str], params: Sequence[dict] | None = None) -> np.ndarray:
    """``(len(texts), NEAR_DIM)`` float32 unit rows (zero rows for empty texts): embedding and n-grams, or
    n-grams alone when the embedding package is missing."""
    import numpy as np

    try:
        embedder = _embedding.load_embedder()
    except ImportError as exc:
        _fallback_noted(str(exc))
        mat = featurize_texts(texts, dim=NEAR_DIM)
    else:
        mat = np.empty((len(texts), NEAR_DIM), dtype=np.float32)
        # unit rows of the leading columns (zero for a text with no tokens)
        norm = [normalise_prompt(t) for t in texts]
        mat[:, :_EMB_COLS] = embedder.embed(norm, dims=_EMB_COLS)
        mat[:, :_EMB_COLS] *= np.sqrt(_EMB_WEIGHT)
        mat[:, _EMB_COLS:] = featurize_texts(norm, dim=NEAR_DIM - _EMB_COLS, normalised=True) * np.sqrt(1 - _EMB_WEIGHT)
        lengths = np.linalg.norm(mat, axis=1, keepdims=True)  # 1, or less when one part is empty
        lengths[lengths == 0] = 1.0
        mat /= lengths
    if params is not None:
        for i, p in enumerate(params):
            if p:
                mat[i] *= _param_signs(json.dumps(p, sort_keys=True, separators=(",", ":"), default=str))
    return mat


@functools.lru_cache(maxsize=4096)
def _param_signs(key: str) -> np.ndarray:
    """A fixed +-1 pattern per parameter set: rows of equal parameters keep their cosine, rows of different
    ones become nearly orthogonal (a sum of 256 random-signed terms), so no guard can be fooled by a seed."""
    import numpy as np

    seed = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    signs = np.where(np.random.default_rng(seed).random(NEAR_DIM) < 0.5, -1.0, 1.0).astype(np.float32)
    signs.flags.writeable = False
    return signs
