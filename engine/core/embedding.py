"""Sentence embeddings for near-duplicate search, loaded offline from a package's own files.

The model is WordLlama's ``l2_supercat`` at 256 dimensions (MIT; PyPI ``wordllama``): a static token
embedding (a 32,000 x 256 float matrix distilled from Llama 2 70B) mean-pooled over the tokens of a text and
L2-normalised, exactly as ``WordLlamaInference.embed(texts, norm=True)`` computes it. Its weights and tokenizer
ship inside the wheel, and they are read here straight from the installed package's files with ``safetensors``
and ``tokenizers``: nothing is downloaded, no network code runs (WordLlama's own loader would fall back to a
download, and its import configures the root logger), and the package is located with ``find_spec``, which
executes none of its code.

The model is read once per process (``load_embedder`` is cached): about 0.1 s cold, then embedding runs at
tens of thousands of short texts per second on one core (``benchmarks/bench_cache.py`` prints both).
``EmbeddingUnavailable`` (an ``ImportError``) means the package or its files are missing; callers fall back to
the hashed n-gram vectors of ``engine.core.features``.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

__all__ = ["EMBED_DIM", "MODEL", "EmbeddingUnavailable", "Embedder", "embedding_installed", "load_embedder"]

EMBED_DIM = 256
MODEL = "wordllama l2_supercat_256"
_PACKAGE = "wordllama"
_WEIGHTS = ("weights", "l2_supercat_256.safetensors")
_TOKENIZER = ("tokenizers", "l2_supercat_tokenizer_config.json")
_TENSOR = "embedding.weight"
_CHUNK = 4096  # texts tokenised per call: bounds the memory of the token ids
_TOKENS_PER_STEP = 512  # token rows summed per reduceat (512 KiB of float32 rows)


class EmbeddingUnavailable(ImportError):
    """The embedding package, or a file it should ship, is not installed."""


class Embedder:
    """Mean-pooled static token embeddings: ``embed(texts)`` -> ``(n, 256)`` float32 unit rows."""

    def __init__(self, table: np.ndarray, tokenizer) -> None:
        import numpy as np  # here, not at import: see ``engine.core.features``

        self.table = np.ascontiguousarray(table, dtype=np.float32)
        self.dim = self.table.shape[1]
        self._tok = tokenizer  # a tokenizers.Tokenizer; no special tokens are added, as WordLlama does
        # The same ids without character offsets, which pooling never reads: 5.5 against 10 us a text here
        # (tokenizers >= 0.20; the ids of 69,278 texts of the real pairs and synthetic prompts are equal).
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._leading: dict[int, np.ndarray] = {self.dim: self.table}

    def embed(self, texts: Sequence[str], dims: int | None = None) -> np.ndarray:
        """Unit rows (an all-zero row for a text with no tokens); one tokenizer call per 4,096 texts.
        ``dims``: only the leading columns, normalised on their own. The model is trained with nested
        dimensions, so they are an embedding of their own, and summing only them halves the memory the
        pooling reads (the near-duplicate vectors use 128)."""
        import numpy as np

        dims = self.dim if dims is None else dims
        if not 0 < dims <= self.dim:
            raise ValueError(f"dims must be in 1..{self.dim}, got {dims}")
        table = self._leading.get(dims)
        if table is None:  # a contiguous copy: a strided view of the wide table would read every column
            table = self._leading[dims] = np.ascontiguousarray(self.table[:, :dims])
        out = np.zeros((len(texts), dims), dtype=np.float32)
        for lo in range(0, len(texts), _CHUNK):
            id_lists = [e.ids for e in self._encode(list(texts[lo:lo + _CHUNK]), add_special_tokens=False)]
            lens = np.fromiter(map(len, id_lists), dtype=np.int64, count=len(id_lists))
            has = np.flatnonzero(lens)
            if not has.size:
                continue
            ids = np.fromiter(itertools.chain.from_iterable(id_lists), dtype=np.int64, count=int(lens.sum()))
            np.clip(ids, 0, table.shape[0] - 1, out=ids)
            ends = np.cumsum(lens[has])
            sums = np.empty((has.size, dims), dtype=np.float32)
            # Sum each text's token rows with reduceat, ~512 tokens at a time: the gathered rows then stay
            # in cache (one gather of all the tokens runs 2-3x slower on this 2-core machine).
            steps = np.searchsorted(ends, np.arange(_TOKENS_PER_STEP, ends[-1], _TOKENS_PER_STEP), side="right")
            cut = np.unique(np.r_[0, steps, has.size]).tolist()
            for a, b in zip(cut[:-1], cut[1:]):
                t0 = ends[a - 1] if a else 0
                starts = np.r_[t0, ends[a:b - 1]] - t0
                sums[a:b] = np.add.reduceat(table[ids[t0:ends[b - 1]]], starts, axis=0)
            norms = np.linalg.norm(sums, axis=1, keepdims=True)
            norms[norms == 0] = 1.0
            out[lo + has] = sums / norms  # the mean, normalised, is the sum normalised
        return out

    def __repr__(self) -> str:
        return f"Embedder({MODEL}, vocab={self.table.shape[0]}, dim={self.dim})"


def _package_dir() -> Path:
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError) as exc:
        raise EmbeddingUnavailable(f"cannot locate the {_PACKAGE!r} package: {exc}") from exc
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddingUnavailable(f"the {_PACKAGE!r} package is not installed (pip install wordllama)")
    return Path(next(iter(spec.submodule_search_locations)))


def _files() -> tuple[Path, Path]:
    root = _package_dir()
    weights, tokenizer = root.joinpath(*_WEIGHTS), root.joinpath(*_TOKENIZER)
    for f in (weights, tokenizer):
        if not f.is_file():
            raise EmbeddingUnavailable(f"{_PACKAGE} is installed at {root} but lacks {f.name}; reinstall it")
    return weights, tokenizer


def embedding_installed() -> bool:
    """Whether ``load_embedder`` would find the package, its files and their readers, told without reading the
    model: a driver that only asks (the start's ``near_threshold`` warning) would otherwise hold the 32,000-row
    table for the engine's life (0.4 CPU-s and about 80 MB, a review measured in stop 84)."""
    try:
        _files()
    except EmbeddingUnavailable:
        return False
    return all(importlib.util.find_spec(name) is not None for name in ("safetensors", "tokenizers"))


@functools.lru_cache(maxsize=1)
def load_embedder() -> Embedder:
    """The process's one embedder, read from the installed package's files on first use; raises
    ``EmbeddingUnavailable`` when the package or its files are missing (the failure is not cached: a test
    that patches this function, or an install meanwhile, is seen on the next call)."""
    weights, tokenizer = _files()
    try:
        from safetensors.numpy import load_file
        from tokenizers import Tokenizer
    except ImportError as exc:
        raise EmbeddingUnavailable(f"{_PACKAGE}'s dependencies are missing: {exc}") from exc
    table = load_file(str(weights))[_TENSOR]
    if table.ndim != 2 or table.shape[1] != EMBED_DIM:
        raise EmbeddingUnavailable(f"{weights} holds a {table.shape} table, expected (vocab, {EMBED_DIM})")
    tok = Tokenizer.from_file(str(tokenizer))
    tok.no_padding()
    tok.no_truncation()
    return Embedder(table, tok)
