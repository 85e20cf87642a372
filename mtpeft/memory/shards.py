"""A replay memory's vectors split over shards (in one process, or one shard per rank), searched as one.

Each shard answers its own top-k; ``merge_topk`` keeps the best k of the answers, which is exactly the
unsharded top-k for exact search (any of the global top k is in its own shard's top k). Across ranks
(``dist_search``) each rank searches its shard for every rank's queries and the answers are gathered.
Insertions made on several ranks (each its share of a task's examples) end in one consistent memory with
``gather_examples``: every rank gathers all of them, in their global order, and offers them to its
memory; the memory's policy is seeded, so every rank (and one process given the same examples in the same
order) ends with the same memory.
Everything travels as tensors (texts as UTF-8 bytes), never pickled.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import MtpeftError
from .index import VectorIndex


def merge_topk(parts: Sequence[tuple[Tensor, Tensor]], k: int) -> tuple[Tensor, Tensor]:
    """The best ``k`` of several ``(scores [m, k_s], ids [m, k_s])`` answers to the same ``m`` queries,
    best first (ties in shard order); ``-inf`` / ``-1`` past what exists."""
    if not parts:
        raise MtpeftError("merge_topk needs at least one shard's answer")
    m = parts[0][0].shape[0]
    if any(s.shape[0] != m or i.shape != s.shape for s, i in parts):
        raise MtpeftError("merge_topk: every shard must answer the same queries with scores and ids of one shape")
    scores = torch.cat([s for s, _ in parts], 1)
    ids = torch.cat([i for _, i in parts], 1)
    scores = scores.masked_fill(ids < 0, float("-inf"))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :k]
    out_s = torch.full((m, k), float("-inf"), dtype=scores.dtype)
    out_i = torch.full((m, k), -1, dtype=torch.int64)
    n = order.shape[1]
    out_s[:, :n], out_i[:, :n] = scores.gather(1, order), ids.gather(1, order)
    out_i[out_s == float("-inf")] = -1
    return out_s, out_i


def shard_index(index: VectorIndex, n: int) -> list[VectorIndex]:
    """``index``'s vectors dealt over ``n`` shards (row r to shard r mod n), each a ``VectorIndex`` with the
    same settings and ids (each builds its own IVF index once it holds ``exact_limit`` vectors)."""
    if not isinstance(n, int) or n < 1:
        raise MtpeftError(f"shard_index: n must be a positive integer, got {n!r}")
    shards = []
    for r in range(n):
        part = VectorIndex(index.dim, index.exact_limit, index.cfg)
        vecs, ids = index.embeddings[r::n], index.ids[r::n]
        if len(ids):
            part.write(torch.arange(len(ids)), ids, vecs, [])
        shards.append(part)
    return shards


def search_shards(shards: Sequence, queries: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
    """Search every shard (anything with ``search(q, k, exact)``: a ``VectorIndex``, a ``ReplayMemory``) and
    merge: for exact search, the same answer as one index holding every shard's vectors."""
    return merge_topk([s.search(queries, k, exact) for s in shards], k)


# ---- across ranks (torch.distributed, any backend) ---------------------------------------------------
def _gather_rows(x: Tensor) -> list[Tensor]:
    """Every rank's ``x`` (``[n_r, ...]``, n_r may differ), in rank order."""
    import torch.distributed as dist

    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(sizes, n)
    top = max(int(s) for s in sizes)
    padded = torch.zeros((top, *x.shape[1:]), dtype=x.dtype)
    padded[: x.shape[0]] = x
    out = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return [o[: int(s)] for o, s in zip(out, sizes)]


def dist_search(shard, queries: Tensor, k: int, exact: bool | None = None) -> tuple[Tensor, Tensor]:
    """This rank's queries answered over every rank's shard: each rank searches its ``shard`` for all ranks'
    queries, the answers are gathered and merged (the global top-k, as ``search_shards``)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    every = _gather_rows(queries.float())
    asked = torch.cat(every)
    s, i = shard.search(asked, k, exact)
    scores, ids = _gather_rows(s), _gather_rows(i)
    lo = sum(len(q) for q in every[:rank])
    mine = slice(lo, lo + len(queries))
    return merge_topk([(sc[mine], ix[mine]) for sc, ix in zip(scores, ids)], k)


def _texts_to_tensor(texts: Sequence[str]) -> tuple[Tensor, Tensor]:
    raw = [t.encode("utf-8") for t in texts]
    lengths = torch.tensor([len(b) for b in raw], dtype=torch.int64)
    flat = torch.frombuffer(bytearray(b"".join(raw)), dtype=torch.uint8) if sum(map(len, raw)) else \
        torch.zeros(0, dtype=torch.uint8)
    return flat, lengths


def _tensor_to_texts(flat: Tensor, lengths: Tensor) -> list[str]:
    data, out, at = flat.numpy().tobytes(), [], 0
    for n in lengths.tolist():
        out.append(data[at: at + n].decode("utf-8"))
        at += n
    return out


def merge_insertions(parts: Sequence[dict]) -> dict:
    """Several ranks' new examples as one list in their global order: each part holds ``embeddings [n, d]``,
    ``texts``, ``labels``, ``tasks`` and ``order`` (each example's position in the global sequence)."""
    emb = torch.cat([torch.as_tensor(p["embeddings"], dtype=torch.float32) for p in parts])
    order = torch.cat([torch.as_tensor(p["order"], dtype=torch.int64) for p in parts])
    if len(torch.unique(order)) != len(order):
        raise MtpeftError("merge_insertions: two examples claim the same global position; give each rank's "
                          "examples their own positions (e.g. the indices of its share)")
    texts = [t for p in parts for t in p["texts"]]
    labels = [int(x) for p in parts for x in p["labels"]]
    tasks = [t for p in parts for t in p["tasks"]]
    perm = torch.argsort(order).tolist()
    return {"embeddings": emb[perm], "texts": [texts[j] for j in perm], "labels": [labels[j] for j in perm],
            "tasks": [tasks[j] for j in perm], "order": order[perm]}


def gather_examples(embeddings: Tensor, texts: Sequence[str], labels, tasks: Sequence[str], order) -> dict:
    """Every rank's new examples, gathered onto every rank in their global order (``merge_insertions``); give
    the result to ``memory.add`` on each rank for one consistent memory. ``tasks``: task names."""
    emb = torch.as_tensor(embeddings, dtype=torch.float32)
    n = emb.shape[0]
    if not (len(texts) == len(tasks) == n == len(labels) == len(order)):
        raise MtpeftError(f"gather_examples: {n} embeddings but {len(texts)} texts, {len(labels)} labels, "
                          f"{len(tasks)} tasks, {len(order)} positions; give one of each per example")
    flat, lengths = _texts_to_tensor(texts)
    tflat, tlengths = _texts_to_tensor(tasks)
    cols = {"embeddings": _gather_rows(emb), "flat": _gather_rows(flat), "lengths": _gather_rows(lengths),
            "tflat": _gather_rows(tflat), "tlengths": _gather_rows(tlengths),
            "labels": _gather_rows(torch.as_tensor(labels, dtype=torch.int64)),
            "order": _gather_rows(torch.as_tensor(order, dtype=torch.int64))}
    parts = []
    for r in range(len(cols["order"])):
        parts.append({"embeddings": cols["embeddings"][r], "texts": _tensor_to_texts(cols["flat"][r], cols["lengths"][r]),
                      "labels": cols["labels"][r].tolist(), "order": cols["order"][r],
                      "tasks": _tensor_to_texts(cols["tflat"][r], cols["tlengths"][r])})
    return merge_insertions(parts)
