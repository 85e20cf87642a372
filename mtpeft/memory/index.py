"""The vectors of a replay memory: a contiguous float32 tensor searched exactly (one matmul and a top-k),
and a FAISS IVF index (inner product, the memory's stable int64 ids) kept beside it once the memory holds
``exact_limit`` vectors or more, where exact search gets slow (benchmarks/bench_memory.py measures both;
docs/memory-metrics.md has the figures). Exact search stays available (``exact=True``).

FAISS's own flat index is not the exact path: on this kind of machine its inner-product search of 32
queries is several times slower than torch's matmul + top-k over the same tensor (measured in the
benchmark, ``faiss_flat_ms``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import MtpeftError

DEFAULT_EXACT_LIMIT = 20_000


@dataclass
class IVFConfig:
    """``nlist``: inverted lists (None: about ``4 * sqrt(n)``, a power of two in [64, ``max_nlist``], fixed
    when the index is built; more lists search faster but take longer to build); ``nprobe``: lists
    searched per query; k-means trains on at most ``train_per_list * nlist`` vectors for ``niter``
    iterations (build time, not search time). The index is built again, with more lists, each time the
    memory has grown ``regrow`` times since the last build and the rule gives more lists (0: never)."""

    nlist: int | None = None
    nprobe: int = 16
    train_per_list: int = 32
    niter: int = 10
    seed: int = 1234
    regrow: int = 4
    max_nlist: int = 1024

    def __post_init__(self):
        for name in ("nprobe", "train_per_list", "niter", "seed", "regrow", "max_nlist", "nlist"):
            v, lo = getattr(self, name), 0 if name in ("seed", "regrow") else 1
            if (v is not None or name != "nlist") and (not isinstance(v, int) or isinstance(v, bool) or v < lo):
                none = " or None" if name == "nlist" else ""
                raise MtpeftError(f"IVFConfig: {name} must be an integer >= {lo}{none}, got {v!r}")

    def lists_for(self, n: int) -> int:
        if self.nlist is not None:
            return self.nlist
        return int(min(self.max_nlist, max(64, 2 ** round(math.log2(4 * math.sqrt(max(n, 1)))))))


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().cpu().numpy())


def _lists(cfg: IVFConfig, n: int) -> int:
    return max(1, min(cfg.lists_for(n), n // 32))  # k-means wants ~32+ points per list


def build_ivf(vecs: Tensor, ids: Tensor, cfg: IVFConfig):
    """An ``IndexIVFFlat`` (inner product) trained on a seeded sample of ``vecs``, holding them with ``ids``."""
    import faiss

    n, d = vecs.shape
    nlist = _lists(cfg, n)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = vecs[torch.randperm(n, generator=g)[: cfg.train_per_list * nlist]]
    quantizer = faiss.IndexFlatIP(d)
    index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed = cfg.niter, cfg.seed
    index.cp.max_points_per_centroid = cfg.train_per_list
    index.cp.min_points_per_centroid = 1
    index.train(_np(sample))  # the Python wrapper keeps ``quantizer`` alive as long as ``index``
    index.nprobe = cfg.nprobe
    if n:
        index.add_with_ids(_np(vecs), _np(ids))
    return index


class VectorIndex:
    """Rows ``0..n-1`` of ``embeddings`` hold the vectors; ``ids[r]`` the stable id of row ``r``."""

    def __init__(self, dim: int, exact_limit: int = DEFAULT_EXACT_LIMIT, ivf: IVFConfig | None = None):
        self.dim, self.exact_limit, self.cfg = dim, exact_limit, ivf or IVFConfig()
        self._emb = torch.empty(0, dim)
        self._ids = torch.empty(0, dtype=torch.int64)
        self.n = 0
        self.ivf = None
        self.built_at = 0  # how many vectors the IVF index was trained with (0: none built)

    @property
    def embeddings(self) -> Tensor:
        return self._emb[: self.n]

    @property
    def ids(self) -> Tensor:
        return self._ids[: self.n]

    def _reserve(self, n: int) -> None:
        if n > self._emb.shape[0]:
            cap = max(n, 2 * self._emb.shape[0], 64)
            emb, ids = torch.empty(cap, self.dim), torch.empty(cap, dtype=torch.int64)
            emb[: self.n], ids[: self.n] = self.embeddings, self.ids
            self._emb, self._ids = emb, ids

    def write(self, rows: Tensor, ids: Tensor, vecs: Tensor, gone: list[int]) -> None:
        """Put ``vecs`` (with ``ids``) at ``rows``: rows below ``n`` are replaced, the others must be exactly
        ``n, n+1, ...`` (in any order). ``gone``: the ids that left (replaced), dropped from the IVF index."""
        n = self.n + int((rows >= self.n).sum())
        self._reserve(n)
        self._emb[rows], self._ids[rows] = vecs, ids
        self.n = n
        grown = (self.cfg.regrow and self.n >= self.cfg.regrow * self.built_at and self.ivf is not None
                 and _lists(self.cfg, self.n) > self.ivf.nlist)  # a rebuild that adds no list is wasted work
        if (self.ivf is None and self.n >= self.exact_limit) or (self.ivf is not None and grown):
            self.ivf, self.built_at = build_ivf(self.embeddings, self.ids, self.cfg), self.n
        elif self.ivf is not None:
            if gone:
                self.ivf.remove_ids(np.asarray(gone, dtype=np.int64))
            if len(ids):
                self.ivf.add_with_ids(_np(vecs), _np(ids))

    def keep(self, mask: Tensor) -> None:
        """Drop the rows where ``mask`` is False (the others keep their order)."""
        gone = self.ids[~mask]
        emb, ids = self.embeddings[mask].clone(), self.ids[mask].clone()
        self._emb, self._ids, self.n = emb, ids, len(ids)
        if self.ivf is not None and len(gone):
            self.ivf.remove_ids(_np(gone))

    def approximate(self) -> bool:
        return self.ivf is not None and self.n >= self.exact_limit

    def search(self, q: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
        """``(scores [m, k], ids [m, k])``, best first; ``-inf`` and id ``-1`` fill the places beyond what
        was found. ``exact``: None picks by size (exact below ``exact_limit``)."""
        m = q.shape[0]
        if exact is False and self.ivf is None:
            raise MtpeftError(f"approximate search asked for, but the memory holds {self.n} vectors, fewer than "
                              f"its exact_limit ({self.exact_limit}): no IVF index is built; search exactly")
        if (exact is None and self.approximate()) or exact is False:
            scores, ids = self.ivf.search(_np(q), k)
            scores, ids = torch.from_numpy(scores), torch.from_numpy(ids)
            return scores.masked_fill(ids < 0, float("-inf")), ids
        kk = min(k, self.n)
        scores = torch.full((m, k), float("-inf"))
        ids = torch.full((m, k), -1, dtype=torch.int64)
        if kk:
            s, rows = torch.topk(q @ self.embeddings.T, kk, dim=1)
            scores[:, :kk], ids[:, :kk] = s, self.ids[rows]
        return scores, ids
