"""The vectors of a replay memory: a contiguous float32 tensor searched exactly (one matmul and a top-k),
and a FAISS IVF index (inner product, the memory's stable int64 ids) kept beside it once the memory holds
``exact_limit`` vectors or more, where exact search gets slow (benchmarks/bench_memory.py measures both;
docs/memory-metrics.md has the figures). Exact search stays available (``exact=True``).

The IVF index keeps a float16 copy of the vectors by default (``IVFConfig.storage``): its search reads
the lists it probes from memory, so half the bytes is about half the time, at a recall the benchmark
measures equal to the float32 copy's. How many lists it probes (``nprobe``) is calibrated when the index
is built: the smallest ``nprobe`` whose recall@k against exact search, on a seeded sample of the stored
vectors used as queries (each one's own id left out of both answers), reaches ``target_recall``. The
measured recall is kept with the index (``VectorIndex.state``, saved in the manifest); it is measured
again once as many vectors were written since as the index held then (the contents may have turned over).

FAISS's own flat index is not the exact path: on this kind of machine its inner-product search of 32
queries is several times slower than torch's matmul + top-k over the same tensor (measured in the
benchmark, ``faiss_flat_ms``). HNSW is not used: it cannot remove ids (eviction needs that) and, measured
in the same benchmark, it is slower than the calibrated IVF index at the same recall.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from ..errors import MtpeftError

DEFAULT_EXACT_LIMIT = 20_000
STORAGES = ("fp16", "flat")
FP16_MAX = 65504.0
_INTS = ("nlist", "nprobe", "calib_queries", "calib_k", "train_per_list", "niter", "seed", "regrow", "max_nlist")


@dataclass
class IVFConfig:
    """``nlist``: inverted lists (None: about ``2 * sqrt(n)``, a power of two in [64, ``max_nlist``], fixed
    when the index is built; more lists scan fewer vectors per list but cost more to build and to pick
    from); ``nprobe``: lists searched per query (None: calibrated, the smallest reaching ``target_recall``,
    measured as recall@``calib_k`` of ``calib_queries`` stored vectors used as queries); ``storage``:
    ``"fp16"`` (a float16 copy in the lists) or ``"flat"`` (float32). k-means trains on at most
    ``train_per_list * nlist`` vectors for ``niter`` iterations (build time, not search time). The index is
    built again, with more lists, each time the memory has grown ``regrow`` times since the last build and
    the rule gives more lists (0: never)."""

    nlist: int | None = None
    nprobe: int | None = None
    target_recall: float = 0.95
    calib_queries: int = 256
    calib_k: int = 32
    storage: str = "fp16"
    train_per_list: int = 32
    niter: int = 10
    seed: int = 1234
    regrow: int = 4
    max_nlist: int = 1024

    def __post_init__(self):
        for name in _INTS:
            v, lo = getattr(self, name), 0 if name in ("seed", "regrow") else 1
            if v is None and name in ("nlist", "nprobe"):
                continue
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                none = " or None" if name in ("nlist", "nprobe") else ""
                raise MtpeftError(f"IVFConfig: {name} must be an integer >= {lo}{none}, got {v!r}")
        t = self.target_recall
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 1:
            raise MtpeftError(f"IVFConfig: target_recall must be a number in (0, 1], got {t!r}")
        if self.storage not in STORAGES:
            raise MtpeftError(f"IVFConfig: storage must be one of {STORAGES}, got {self.storage!r}")

    def lists_for(self, n: int) -> int:
        if self.nlist is not None:
            return self.nlist
        return int(min(self.max_nlist, max(64, 2 ** round(math.log2(2 * math.sqrt(max(n, 1)))))))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _np(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.numpy() if x.device.type == "cpu" and not x.requires_grad else x.detach().cpu().numpy())


def _lists(cfg: IVFConfig, n: int) -> int:
    return max(1, min(cfg.lists_for(n), n // 32))  # k-means wants ~32+ points per list


def build_ivf(vecs: Tensor, ids: Tensor, cfg: IVFConfig):
    """An IVF index (inner product; ``IndexIVFScalarQuantizer`` fp16 or ``IndexIVFFlat``) trained on a
    seeded sample of ``vecs``, holding them with ``ids``; its ``nprobe`` is ``cfg.nprobe`` or 1 (see
    :func:`calibrate`)."""
    import faiss

    n, d = vecs.shape
    nlist = _lists(cfg, n)
    g = torch.Generator().manual_seed(cfg.seed)
    sample = vecs[torch.randperm(n, generator=g)[: cfg.train_per_list * nlist]]
    quantizer = faiss.IndexFlatIP(d)
    if cfg.storage == "flat":
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    else:  # by_residual=False: the codes are the vectors themselves, in float16
        index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT, False)
    index.cp.niter, index.cp.seed = cfg.niter, cfg.seed
    index.cp.max_points_per_centroid = cfg.train_per_list
    index.cp.min_points_per_centroid = 1
    index.train(_np(sample))  # the Python wrapper keeps ``quantizer`` alive as long as ``index``
    index.nprobe = min(cfg.nprobe or 1, nlist)
    if n:
        index.add_with_ids(_np(vecs), _np(ids))
    return index


def _others(found: Tensor, own: Tensor, k: int) -> Tensor:
    """Each row of ``found`` ``[m, k + 1]`` without the query's own id ``own[i]`` (or its last entry)."""
    keep = found != own[:, None]
    keep[keep.all(1), -1] = False
    return found[keep].view(-1, k)


def calibrate(index, vecs: Tensor, ids: Tensor, cfg: IVFConfig) -> tuple[int, float]:
    """Set ``index.nprobe`` to ``cfg.nprobe``, or (None) to the smallest one whose recall@``calib_k``
    against exact search reaches ``cfg.target_recall`` (every list where none does), on ``calib_queries``
    stored vectors drawn with ``cfg.seed`` as queries, each one's own id left out of both answers.
    Returns ``(nprobe, recall)``, the recall measured at that ``nprobe`` (at most ``index.nlist``)."""
    n, fixed = len(vecs), None if cfg.nprobe is None else min(cfg.nprobe, index.nlist)
    k = min(cfg.calib_k, n - 1)
    if k < 1:
        index.nprobe = fixed or 1
        return index.nprobe, 1.0
    rows = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + 1))[: cfg.calib_queries]
    q, own = vecs[rows], ids[rows]
    exact = torch.cat([ids[torch.topk(c @ vecs.T, k + 1, dim=1).indices] for c in q.split(32)])
    exact = _others(exact, own, k)

    def recall_at(p: int) -> float:
        index.nprobe = p
        got = _others(torch.from_numpy(index.search(_np(q), k + 1)[1]), own, k)
        return round((got[:, :, None] == exact[:, None, :]).any(-1).float().mean().item(), 4)

    if fixed is not None:
        return fixed, recall_at(fixed)
    # probing more lists scans a superset of vectors, so recall only grows with nprobe: double, then bisect
    lo, hi, r_hi = 0, 1, recall_at(1)
    while r_hi < cfg.target_recall and hi < index.nlist:
        lo, hi = hi, min(2 * hi, index.nlist)
        r_hi = recall_at(hi)
    while r_hi >= cfg.target_recall and hi - lo > 1:
        mid = (lo + hi) // 2
        r = recall_at(mid)
        if r >= cfg.target_recall:
            hi, r_hi = mid, r
        else:
            lo = mid
    index.nprobe = hi
    return hi, r_hi


class VectorIndex:
    """Rows ``0..n-1`` of ``embeddings`` hold the vectors; ``ids[r]`` the stable id of row ``r``."""

    def __init__(self, dim: int, exact_limit: int = DEFAULT_EXACT_LIMIT, ivf: IVFConfig | None = None):
        self.dim, self.exact_limit, self.cfg = dim, exact_limit, ivf or IVFConfig()
        self._emb = torch.empty(0, dim)
        self._ids = torch.empty(0, dtype=torch.int64)
        self.n = 0
        self.ivf = None
        self.built_at = 0  # how many vectors the IVF index was trained with (0: none built)
        self.calibrated_at = 0  # how many it held when its nprobe and recall were last measured
        self.writes = 0  # vectors written into it since
        self.recall = None  # recall@calib_k measured then, at its nprobe

    @property
    def embeddings(self) -> Tensor:
        return self._emb[: self.n]

    @property
    def ids(self) -> Tensor:
        return self._ids[: self.n]

    def state(self) -> dict | None:
        """The IVF index's measured state (None while there is none)."""
        if self.ivf is None:
            return None
        return {"nlist": int(self.ivf.nlist), "nprobe": int(self.ivf.nprobe), "recall": self.recall,
                "calibrated_at": self.calibrated_at, "writes": self.writes, "built_at": self.built_at,
                "storage": self.cfg.storage, "target_recall": self.cfg.target_recall, "k": self.cfg.calib_k}

    def check(self, vecs: Tensor, what: str) -> None:
        """Refuse vectors the IVF index's float16 copy cannot hold (before anything changes)."""
        if self.cfg.storage == "fp16" and vecs.numel() and float(vecs.abs().max()) > FP16_MAX:
            raise MtpeftError(f"{what} hold values beyond +-{FP16_MAX:g}, which the IVF index's float16 copy "
                              "cannot store; normalise the embeddings (embed_texts does) or give the memory "
                              "IVFConfig(storage='flat')")

    def _reserve(self, n: int) -> None:
        if n > self._emb.shape[0]:
            cap = max(n, 2 * self._emb.shape[0], 64)
            emb, ids = torch.empty(cap, self.dim), torch.empty(cap, dtype=torch.int64)
            emb[: self.n], ids[: self.n] = self.embeddings, self.ids
            self._emb, self._ids = emb, ids

    def _calibrate(self) -> None:
        _, self.recall = calibrate(self.ivf, self.embeddings, self.ids, self.cfg)
        self.calibrated_at, self.writes = self.n, 0

    def write(self, rows: Tensor, ids: Tensor, vecs: Tensor, gone: list[int]) -> None:
        """Put ``vecs`` (with ``ids``) at ``rows``: rows below ``n`` are replaced, the others must be exactly
        ``n, n+1, ...`` (in any order). ``gone``: the ids that left (replaced), dropped from the IVF index.
        The IVF index is (re)built, or its ``nprobe`` calibrated again, as the class says."""
        n = self.n + int((rows >= self.n).sum())
        self._reserve(n)
        self._emb[rows], self._ids[rows] = vecs, ids
        self.n = n
        grown = (self.cfg.regrow and self.n >= self.cfg.regrow * self.built_at and self.ivf is not None
                 and _lists(self.cfg, self.n) > self.ivf.nlist)  # a rebuild that adds no list is wasted work
        if (self.ivf is None and self.n >= self.exact_limit) or (self.ivf is not None and grown):
            self.ivf, self.built_at = build_ivf(self.embeddings, self.ids, self.cfg), self.n
            self._calibrate()
        elif self.ivf is not None:
            if gone:
                self.ivf.remove_ids(np.asarray(gone, dtype=np.int64))
            if len(ids):
                self.ivf.add_with_ids(_np(vecs), _np(ids))
            self.writes += len(ids)
            if self.writes >= self.calibrated_at:  # as many new vectors as it held: measure again
                self._calibrate()

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
        was found. ``exact``: None picks by size (exact below ``exact_limit``). Scores from the IVF index
        are inner products with its stored copy (float16 by default: within ~1e-3 of the exact ones for
        unit vectors)."""
        m = q.shape[0]
        if exact is False and self.ivf is None:
            raise MtpeftError(f"approximate search asked for, but the memory holds {self.n} vectors, fewer than "
                              f"its exact_limit ({self.exact_limit}): no IVF index is built; search exactly")
        if (exact is None and self.approximate()) or exact is False:
            scores, ids = self.ivf.search(_np(q), k)
            missing = ids < 0
            if missing.any():
                scores[missing] = -np.inf
            return torch.from_numpy(scores), torch.from_numpy(ids)
        kk = min(k, self.n)
        scores = torch.full((m, k), float("-inf"))
        ids = torch.full((m, k), -1, dtype=torch.int64)
        if kk:
            s, rows = torch.topk(q @ self.embeddings.T, kk, dim=1)
            scores[:, :kk], ids[:, :kk] = s, self.ids[rows]
        return scores, ids
