"""A replay memory split over shards answers as one: sharded search equals unsharded search, and the
insertions of several ranks end in one memory, the same on every rank and as on one process."""
from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.nn.functional as F

from mtpeft.errors import MtpeftError
from mtpeft.memory import ReplayMemory
from mtpeft.memory.index import VectorIndex
from mtpeft.memory.shards import merge_insertions, merge_topk, search_shards, shard_index

TEXTS = ["naïve café", "", "日本語のテキスト", "plain", "tab\tand\nnewline"]


def _vectors(n: int, d: int = 16, seed: int = 0) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def _index(n: int, d: int = 16) -> VectorIndex:
    index = VectorIndex(d)
    ids = torch.randperm(10 * n, generator=torch.Generator().manual_seed(1))[:n]  # ids unlike row numbers
    index.write(torch.arange(n), ids, _vectors(n, d), [])
    return index


@pytest.mark.parametrize("shards", [1, 2, 3, 7])
def test_sharded_search_equals_unsharded_search(shards):
    index = _index(101)
    q = _vectors(9, seed=5)
    parts = shard_index(index, shards)
    assert sum(p.n for p in parts) == 101 and len({int(i) for p in parts for i in p.ids}) == 101
    for k in (1, 10, 101, 130):  # past the size: -inf / -1 padding, as unsharded
        want_s, want_i = index.search(q, k)
        got_s, got_i = search_shards(parts, q, k)
        assert torch.equal(got_i, want_i), k
        torch.testing.assert_close(got_s, want_s, rtol=0, atol=1e-6)


def test_sharded_search_over_memories_finds_what_each_holds():
    """Two memories (say, one per task) searched as one: the merged answer is the best of both."""
    a, b = ReplayMemory(16, 50, seed=0), ReplayMemory(16, 50, seed=1)
    va, vb = _vectors(20, seed=2), _vectors(30, seed=3)
    a.add(va, [f"a{i}" for i in range(20)], [0] * 20, "A")
    b.add(vb, [f"b{i}" for i in range(30)], [0] * 30, "B")
    q = _vectors(4, seed=4)
    scores, _ = search_shards([a, b], q, 5)
    best = torch.topk(q @ torch.cat([va, vb]).T, 5, dim=1).values
    torch.testing.assert_close(scores, best, rtol=0, atol=1e-6)


def test_merge_topk_checks_its_input():
    with pytest.raises(MtpeftError, match="at least one"):
        merge_topk([], 3)
    s = torch.zeros(2, 3)
    with pytest.raises(MtpeftError, match="same queries"):
        merge_topk([(s, torch.zeros(2, 3, dtype=torch.long)), (torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long))], 3)


def _parts(n: int = 40, world: int = 2):
    """n examples dealt round-robin to ``world`` ranks, each with its global position."""
    emb = _vectors(n, seed=7)
    texts = [TEXTS[i % len(TEXTS)] + str(i) for i in range(n)]
    tasks = ["t1" if i < n // 2 else "t2" for i in range(n)]
    return emb, texts, tasks, [
        {"embeddings": emb[r::world], "texts": texts[r::world], "labels": [i % 3 for i in range(r, n, world)],
         "tasks": tasks[r::world], "order": list(range(r, n, world))} for r in range(world)]


def _memory_state(m: ReplayMemory):
    return m.ids.tolist(), [m.get([i])[0] for i in m.ids.tolist()], m.embeddings(m.ids.tolist())


def test_merged_insertions_give_the_memory_one_process_builds():
    emb, texts, tasks, parts = _parts()
    merged = merge_insertions(parts[::-1])  # the ranks' order does not matter: global positions decide
    one, two = ReplayMemory(16, 25, seed=3), ReplayMemory(16, 25, seed=3)  # capacity < n: the policy evicts
    one.add(emb, texts, [i % 3 for i in range(40)], tasks)
    two.add(merged["embeddings"], merged["texts"], merged["labels"], merged["tasks"])
    (i1, e1, v1), (i2, e2, v2) = _memory_state(one), _memory_state(two)
    assert i1 == i2 and e1 == e2 and torch.equal(v1, v2)
    with pytest.raises(MtpeftError, match="same global position"):
        merge_insertions([parts[0], parts[0]])


# ---- across two processes (gloo) ---------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str):
    import torch.distributed as dist

    from mtpeft.memory.shards import dist_search, gather_examples

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        index = _index(57)
        mine = shard_index(index, world)[rank]
        q = _vectors(3 + rank, seed=10 + rank)  # ranks ask different numbers of queries
        s, i = dist_search(mine, q, 8)
        want_s, want_i = index.search(q, 8)
        ok_search = torch.equal(i, want_i) and bool(torch.allclose(s, want_s, atol=1e-6))
        _, _, _, parts = _parts(world=world)
        p = parts[rank]
        got = gather_examples(p["embeddings"], p["texts"], p["labels"], p["tasks"], p["order"])
        memory = ReplayMemory(16, 25, seed=3)
        memory.add(got["embeddings"], got["texts"], got["labels"], got["tasks"])
        ids, examples, vecs = _memory_state(memory)
        with open(f"{out}/rank{rank}.json", "w", encoding="utf-8") as f:
            json.dump({"search": ok_search, "ids": ids, "vecs": vecs.tolist(), "texts": [e.text for e in examples]}, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.processes
def test_two_ranks_search_their_shards_as_one_and_insert_into_one_memory(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    emb, texts, tasks, _ = _parts()
    one = ReplayMemory(16, 25, seed=3)
    one.add(emb, texts, [i % 3 for i in range(40)], tasks)
    ids, examples, vecs = _memory_state(one)
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text(encoding="utf-8"))
        assert got["search"], f"rank {r}: distributed search differs from the unsharded one"
        assert got["ids"] == ids and got["texts"] == [e.text for e in examples]
        assert torch.equal(torch.tensor(got["vecs"], dtype=torch.float32), vecs)
