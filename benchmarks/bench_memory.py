"""The replay memory: add throughput, and search latency of 32 queries for k = 32 at 1e4, 1e5 and 1e6 items.

Synthetic clustered float32 embeddings (d = 384, L2-normalised; ``--clusters`` Gaussian clusters whose
noise has ``--spread`` times the norm of the centre: cosine to the centre about 0.7 at 1.0, neighbours
at cosine 0.5-0.6 as with MiniLM keys of real tasks), queries drawn from the same clusters. How hard
the data is decides the recall: ``real_embeddings`` measures the calibrated IVF index on MiniLM keys of
the built-in tasks too (``--real-per-task``, cached after the first run). At each size the memory
(default settings: exact below 20,000 items, then IVF with float16 lists and ``nprobe`` calibrated to
recall@32 >= 0.95) is filled from empty in batches (``adds_per_s`` counts its IVF builds and
calibrations), then, interleaved in one process: brute-force torch matmul + top-k over the same tensor
(``torch_matmul_topk``, the reference), the memory's exact path, what the memory picks by size
(``memory_auto``), its IVF index at several ``nprobe`` (``ivf_fp16_nprobe<p>``; at sizes below the exact
limit a side index built as the memory would build it), the same lists in float32 (``IndexIVFFlat``,
calibrated the same way: ``ivf_flat_cal``), FAISS's HNSW (``hnsw_ef<e>``, up to ``--max-hnsw``) and flat
inner-product index (up to ``--max-flat``). Recall@k of each approximate search is against the exact top-k
ids of ``--recall-queries`` fresh queries (timings use the first ``--queries`` of them). The machine's load
average is recorded at the start and end of each size.

Run: `OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/bench_memory.py` (writes
benchmarks/results/memory.json); `--sizes 10000 100000` to skip 1e6; `--quick` for 1e4 and 1e5 with
fewer repeats.
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F
from common import add_common_args, print_table, save

from mtpeft.memory import DEFAULT_EXACT_LIMIT, IVFConfig, ReplayMemory
from mtpeft.memory.index import build_ivf, calibrate


class Clusters:
    def __init__(self, d: int, clusters: int, spread: float, seed: int = 0):
        self.g = torch.Generator().manual_seed(seed)
        self.centres = torch.randn(clusters, d, generator=self.g)
        self.noise = spread / d ** 0.5 * self.centres.norm(dim=1).mean()

    def draw(self, n: int) -> torch.Tensor:
        c = self.centres[torch.randint(len(self.centres), (n,), generator=self.g)]
        return F.normalize(c + self.noise * torch.randn(c.shape, generator=self.g), dim=-1)


def timed(contenders: dict, repeats: int, warmup: int, flush_mib: int = 0) -> dict[str, float]:
    """Per contender, run interleaved, in a new (seeded) order each round, so each follows each other one
    alike (a search right after the exact matmul runs slower, whichever it is): ``<name>_ms`` the median wall time,
    ``<name>_min_ms`` the fastest, ``<name>_cpu_ms`` the median CPU time of this process (one thread: on a
    shared machine the CPU time is the closest to what the call costs on an idle core; the wall time adds
    the waits for a core). Before each timed call, ``flush_mib`` MiB of other data are read (untimed): every
    contender starts with caches holding something else, as a search between training steps does, and none
    profits from the one before it (a search at nprobe 4 right after one at nprobe 2 finds half its lists
    cached)."""
    junk = torch.ones(flush_mib * 2**18)
    for _ in range(warmup):
        for f in contenders.values():
            f()
    items, order = list(contenders.items()), random.Random(0)
    wall, cpu = {k: [] for k in contenders}, {k: [] for k in contenders}
    for _ in range(repeats):
        order.shuffle(items)
        for k, f in items:
            junk.sum()
            t, c = time.perf_counter(), time.process_time()
            f()
            cpu[k].append((time.process_time() - c) * 1000)
            wall[k].append((time.perf_counter() - t) * 1000)
    out = {}
    for k in contenders:
        out[f"{k}_ms"], out[f"{k}_min_ms"] = round(statistics.median(wall[k]), 3), round(min(wall[k]), 3)
        out[f"{k}_cpu_ms"] = round(statistics.median(cpu[k]), 3)
    return out


def recall(approx: torch.Tensor, exact: torch.Tensor) -> float:
    hits = sum(len(set(a) & set(e)) for a, e in zip(approx.tolist(), exact.tolist()))
    return round(hits / exact.numel(), 4)


def fill(n: int, data: Clusters, batch: int, ivf: IVFConfig, exact_limit: int) -> tuple[ReplayMemory, float]:
    mem = ReplayMemory(data.centres.shape[1], n, "reservoir", exact_limit=exact_limit, ivf=ivf)
    spent = 0.0
    for i in range(0, n, batch):
        x = data.draw(min(batch, n - i))
        texts, labels = [""] * len(x), [0] * len(x)
        t = time.perf_counter()
        mem.add(x, texts, labels, "synthetic")
        spent += time.perf_counter() - t
    return mem, spent


def steady_adds(mem: ReplayMemory, data: Clusters, batch: int, rounds: int) -> float:
    """Adds per second into a full memory (reservoir decisions, evictions, index upkeep)."""
    xs = [data.draw(batch) for _ in range(rounds)]
    t = time.perf_counter()
    for x in xs:
        mem.add(x, [""] * batch, [0] * batch, "synthetic")
    return round(batch * rounds / (time.perf_counter() - t), 1)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def exact_top(q: torch.Tensor, X: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([ids[torch.topk(c @ X.T, k, dim=1).indices] for c in q.split(64)])


def side_ivf(X: torch.Tensor, ids: torch.Tensor, storage: str) -> tuple[object, dict]:
    """An IVF index built and calibrated as the memory builds its own (default IVFConfig, ``storage``)."""
    cfg = IVFConfig(storage=storage)
    t = time.perf_counter()
    index = build_ivf(X, ids, cfg)
    built = time.perf_counter() - t
    nprobe, rec = calibrate(index, X, ids, cfg)
    return index, {"lists": index.nlist, "nprobe": nprobe, "calibration_recall": rec,
                   "build_s": round(built, 2), "calibrate_s": round(time.perf_counter() - t - built, 2)}


def searcher(index, q, k: int, **params):
    """A search of ``index`` with ``params`` (nprobe, efSearch) set for the call only."""
    def f():
        target = index.hnsw if "efSearch" in params else index
        old = {p: getattr(target, p) for p in params}
        for p, v in params.items():
            setattr(target, p, v)
        try:
            return index.search(q.numpy(), k)
        finally:
            for p, v in old.items():
                setattr(target, p, v)
    return f


def measure(n: int, a, data: Clusters) -> dict:
    import faiss

    row = {"items": n, "load_avg_start": load()}
    mem, spent = fill(n, data, a.batch, IVFConfig(), a.exact_limit)
    qr = data.draw(a.recall_queries)
    q = qr[: a.queries]
    X, ids = mem.index.embeddings, mem.index.ids
    truth = exact_top(qr, X, ids, a.k)
    row.update({"adds_per_s_fill": round(n / spent, 1), "fill_s": round(spent, 2),
                "memory_path": mem.stats()["search"], "memory_ivf": mem.stats()["ivf"]})
    contenders = {"torch_matmul_topk": lambda: torch.topk(q @ X.T, a.k, dim=1),
                  "memory_exact": lambda: mem.search(q, a.k, exact=True),
                  "memory_auto": lambda: mem.search(q, a.k)}
    recalls = {"memory_auto": lambda: mem.search(qr, a.k)[1]}
    index = mem.index.ivf
    if index is None:  # below the exact limit: what the IVF index would give at this size
        index, row["ivf_fp16_side"] = side_ivf(X, ids, "fp16")
    for p in sorted(set(a.nprobe) | {index.nprobe}):
        contenders[f"ivf_fp16_nprobe{p}"] = searcher(index, q, a.k, nprobe=p)
        recalls[f"ivf_fp16_nprobe{p}"] = searcher(index, qr, a.k, nprobe=p)
    flat, row["ivf_flat_cal"] = side_ivf(X, ids, "flat")
    contenders["ivf_flat_cal"] = searcher(flat, q, a.k, nprobe=flat.nprobe)
    recalls["ivf_flat_cal"] = searcher(flat, qr, a.k, nprobe=flat.nprobe)
    if n <= a.max_hnsw:
        hnsw = faiss.IndexHNSWFlat(X.shape[1], a.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        t = time.perf_counter()
        hnsw.add(X.numpy())
        row["hnsw"] = {"M": a.hnsw_m, "build_s": round(time.perf_counter() - t, 2)}
        for e in a.hnsw_ef:
            contenders[f"hnsw_ef{e}"] = searcher(hnsw, q, a.k, efSearch=e)
            recalls[f"hnsw_ef{e}"] = searcher(hnsw, qr, a.k, efSearch=e)
    if n <= a.max_flat:
        fl = faiss.IndexFlatIP(X.shape[1])
        fl.add(X.numpy())
        contenders["faiss_flat"] = lambda: fl.search(q.numpy(), a.k)
    for name, f in recalls.items():
        got = f()
        got = got if isinstance(got, torch.Tensor) else torch.from_numpy(got[1])
        if name.startswith("hnsw"):  # HNSW holds row numbers
            got = torch.where(got >= 0, ids[got.clamp(min=0)], -1)
        row[f"recall_{name}"] = recall(got, truth)
    assert torch.equal(mem.search(qr, a.k, exact=True)[1], truth)  # the exact path is exact
    row.update(timed(contenders, a.repeats, a.warmup, a.flush_mib))
    if n <= a.max_steady:
        row["adds_per_s_full"] = steady_adds(mem, data, a.batch, rounds=5)
    row["load_avg_end"] = load()
    return row


def real_embeddings(per_task: int) -> torch.Tensor:
    """MiniLM keys (``embed_texts``, max 64 tokens) of the first ``per_task`` training texts of every built-in
    task, cached under mtpeft's cache directory (embedding 10,800 texts takes minutes on a shared CPU)."""
    from mtpeft.io import cache_dir, read_tensors, write_tensors

    path = cache_dir() / f"bench_memory_real_{per_task}.safetensors"
    if path.is_file():
        return read_tensors(path)["embeddings"]
    from mtpeft.backbone import load_backbone
    from mtpeft.bank import ModuleBank
    from mtpeft.memory import embed_texts
    from mtpeft.suite import builtin_names, load_builtin

    texts = []
    for name in builtin_names():
        texts += list(load_builtin(name, max_examples=per_task).splits["train"]["text"])[:per_task]
    x = embed_texts(ModuleBank(load_backbone("minilm")), texts, batch_size=64, max_length=64)
    write_tensors(path, {"embeddings": x})
    return x


def measure_real(a) -> dict:
    """Recall@k of the calibrated IVF index (as the memory builds it) on real sentence embeddings, against
    exact search, for ``--recall-queries`` held-out keys as queries."""
    x = real_embeddings(a.real_per_task)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    q, base = x[perm[: a.recall_queries]], x[perm[a.recall_queries:]]
    ids = torch.arange(len(base))
    exact = torch.topk(q @ base.T, a.k, dim=1)
    out = {"items": len(base), "queries": len(q), "top1_cosine": round(exact.values[:, 0].mean().item(), 3),
           f"top{a.k}_cosine": round(exact.values[:, -1].mean().item(), 3)}
    for storage in ("fp16", "flat"):
        index, out[f"ivf_{storage}"] = side_ivf(base, ids, storage)
        out[f"ivf_{storage}"]["recall_heldout"] = recall(torch.from_numpy(index.search(q.numpy(), a.k)[1]),
                                                         exact.indices)
    for p in a.nprobe:
        index.nprobe = p
        out[f"recall_flat_nprobe{p}"] = recall(torch.from_numpy(index.search(q.numpy(), a.k)[1]), exact.indices)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(p, repeats=11, warmup=2)
    p.set_defaults(threads=1)
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--queries", type=int, default=32, help="queries per timed search")
    p.add_argument("--recall-queries", type=int, default=512, help="fresh queries recall is measured on")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--spread", type=float, default=1.0)
    p.add_argument("--real-per-task", type=int, default=1200,
                   help="also measure IVF recall on MiniLM embeddings of this many texts per built-in task (0: no)")
    p.add_argument("--batch", type=int, default=1000, help="examples per add call")
    p.add_argument("--nprobe", type=int, nargs="+", default=[2, 4, 8, 16])
    p.add_argument("--flush-mib", type=int, default=64, help="MiB read before each timed call (cold caches)")
    p.add_argument("--hnsw-m", type=int, default=16)
    p.add_argument("--hnsw-ef", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--exact-limit", type=int, default=DEFAULT_EXACT_LIMIT)
    p.add_argument("--max-flat", type=int, default=100_000, help="largest size FAISS's flat index is timed at")
    p.add_argument("--max-hnsw", type=int, default=100_000, help="largest size FAISS's HNSW index is timed at")
    p.add_argument("--max-steady", type=int, default=100_000, help="largest size adds into a full memory are timed")
    a = p.parse_args(argv)
    if a.quick:
        a.repeats, a.warmup, a.sizes, a.real_per_task = 3, 1, [s for s in a.sizes if s <= 100_000], 0
    import faiss

    torch.set_num_threads(a.threads)
    faiss.omp_set_num_threads(a.threads)
    start, t0 = load(), time.perf_counter()
    data = Clusters(a.d, a.clusters, a.spread)
    rows = []
    for n in a.sizes:
        rows.append(measure(n, a, data))
        print_table(rows[-1:], [c for c in rows[-1] if c.endswith("_ms") and "_min_" not in c and "_cpu_" not in c
                                or c == "items"])
        print_table(rows[-1:], [c for c in rows[-1] if "_cpu_" in c or c.startswith("recall")])
    real = measure_real(a) if a.real_per_task else None
    if real:
        print("real MiniLM embeddings:", real)
    end = load()
    busy = max(start[0], end[0]) > (os.cpu_count() or 1)
    save("memory", {"config": vars(a), "load_avg_start": start, "load_avg_end": end,
                    "run_s": round(time.perf_counter() - t0, 1), "rows": rows, "real_embeddings": real,
                    "note": f"{a.threads} thread(s), contenders interleaved in one process (their ratios hold); "
                            f"1-minute load average {start[0]} at the start and {end[0]} at the end on "
                            f"{os.cpu_count()} cores shared with other users: "
                            + ("LOADED, wall times (_ms, _min_ms) include waits for a core; _cpu_ms (this "
                               "process's CPU time) is the closer estimate of an idle core's cost"
                               if busy else "not saturated, wall times are close to the CPU times")},
         quiet=True)


if __name__ == "__main__":
    main()
