"""ReplayMemory: add / search / evict / remove / save / load, the policies' balance, stable ids, and
corrupted or hostile memory files refused with MtpeftError."""
import json
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mtpeft.errors import MtpeftError
from mtpeft.memory import IVFConfig, ReplayMemory, StoragePolicy
from mtpeft.memory.persist import MANIFEST, _ivf_contents


def unit(n, d=16, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def clustered(n, d=32, clusters=20, seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, d, generator=g)
    x = centres[torch.randint(clusters, (n,), generator=g)] + spread * torch.randn(n, d, generator=g)
    return F.normalize(x, dim=-1)


def fill(mem, x, task="t", start=0, labels=None):
    n = len(x)
    labels = [i % 3 for i in range(n)] if labels is None else labels
    return mem.add(x, [f"{task}-{start + i}" for i in range(n)], labels, task)


def brute(mem, q, k):
    """Exact top-k by an independent computation: every stored embedding, fetched by id."""
    ids = mem.ids
    s = q @ mem.embeddings(ids).T
    top = torch.topk(s, min(k, len(ids)), dim=1)
    return top.values, ids[top.indices]


# ---- add, search, ids ----------------------------------------------------------------------------------
def test_exact_search_equals_brute_force_after_evictions():
    mem = ReplayMemory(16, 50, seed=3)
    for t in range(4):
        fill(mem, unit(40, seed=t), task=f"task{t}")
    assert len(mem) == 50 and not mem.index.approximate()
    q = unit(7, seed=99)
    scores, ids = mem.search(q, 10)
    ref_s, ref_ids = brute(mem, q, 10)
    assert torch.equal(ids, ref_ids)
    assert torch.allclose(scores, ref_s)


def test_search_pads_past_what_exists():
    mem = ReplayMemory(16, 50)
    fill(mem, unit(3))
    scores, ids = mem.search(unit(2, seed=1), 5)
    assert ids.shape == (2, 5) and (ids[:, 3:] == -1).all() and torch.isinf(scores[:, 3:]).all()
    assert (ids[:, :3] >= 0).all()
    empty = ReplayMemory(16, 5)
    assert (empty.search(unit(1), 2)[1] == -1).all()


def test_ids_are_stable_across_eviction_and_never_reused():
    mem = ReplayMemory(16, 30, seed=1)
    given_ids, text_of, emb_of = [], {}, {}
    for t in range(6):
        x = unit(25, seed=t)
        ids = fill(mem, x, task=f"t{t}")
        for i, id_ in enumerate(ids.tolist()):
            if id_ >= 0:
                given_ids.append(id_)
                text_of[id_], emb_of[id_] = f"t{t}-{i}", x[i]
    assert len(set(given_ids)) == len(given_ids)  # never reused
    for id_ in mem.ids.tolist():  # every survivor keeps its text and key
        assert mem.get([id_])[0].text == text_of[id_]
        assert torch.equal(mem.embeddings([id_])[0], emb_of[id_])
    evicted = sorted(set(given_ids) - set(mem.ids.tolist()))
    assert evicted
    with pytest.raises(MtpeftError, match="not in the memory"):
        mem.get([evicted[0]])


def test_one_call_or_one_at_a_time_keeps_the_same_examples():
    x = unit(120)
    a, b = ReplayMemory(16, 40, "class-balanced", seed=5), ReplayMemory(16, 40, "class-balanced", seed=5)
    labels = [i % 4 if i % 3 else 0 for i in range(120)]
    ids_a = fill(a, x, labels=labels)
    ids_b = torch.cat([b.add(x[i:i + 1], [f"t-{i}"], [labels[i]], "t") for i in range(120)])
    assert sorted(a.ids.tolist()) == sorted(b.ids.tolist())
    kept = ids_a >= 0
    assert torch.equal(ids_a[kept], ids_b[kept])
    # one call reports -1 for an example a later one of the same call evicted; one at a time, that example
    # got an id at its own call, which is gone by the end
    late = ids_b[~kept & (ids_b >= 0)]
    assert len(late) and not set(late.tolist()) & set(b.ids.tolist())
    q = unit(5, seed=7)
    assert torch.equal(a.search(q, 8)[1], b.search(q, 8)[1])


def test_remove_keeps_the_others_and_their_ids():
    mem = ReplayMemory(16, 100, "task-balanced")
    x = unit(60)
    ids = fill(mem, x)
    mem.remove(ids[:10])
    assert len(mem) == 50 and set(mem.ids.tolist()) == set(ids[10:].tolist())
    assert torch.equal(mem.embeddings(ids[10:]), x[10:])
    q = unit(3, seed=2)
    assert torch.equal(mem.search(q, 5)[1], brute(mem, q, 5)[1])
    fill(mem, unit(80, seed=4), task="u")  # the balance bookkeeping was rebuilt
    assert abs(mem.counts()["t"] - mem.counts()["u"]) <= 1


def test_nearest_to_batch_is_the_top_by_best_score():
    mem = ReplayMemory(16, 200)
    fill(mem, unit(200))
    q = unit(4, seed=8)
    got = mem.nearest_to_batch(q, 12)
    best = (q @ mem.embeddings(mem.ids).T).max(0).values
    want = mem.ids[torch.topk(best, 12).indices]
    assert got.tolist() == want.tolist()
    assert len(set(got.tolist())) == 12


def test_sample_is_seeded_distinct_and_bounded():
    a, b = ReplayMemory(16, 100, seed=2), ReplayMemory(16, 100, seed=2)
    fill(a, unit(50)), fill(b, unit(50))
    s = a.sample(20)
    assert torch.equal(s, b.sample(20)) and len(set(s.tolist())) == 20 and set(s.tolist()) <= set(a.ids.tolist())
    assert not torch.equal(a.sample(20), s)  # the draw advances
    assert len(a.sample(500)) == 50


@pytest.mark.parametrize("call, match", [
    (lambda m: m.add(torch.randn(2, 8), ["a", "b"], [0, 1], "t"), "8 dimensions"),
    (lambda m: m.add(torch.full((1, 16), float("nan")), ["a"], [0], "t"), "NaN"),
    (lambda m: m.add(torch.randn(1, 16), ["a"], [0, 1], "t"), "1 texts, 2 labels"),
    (lambda m: m.add(torch.randn(2, 16), ["a", "b"], [0, 1], ["t"]), "1 tasks"),
    (lambda m: m.add(torch.randn(1, 16), ["a"], [-1], "t"), ">= 0"),
    (lambda m: m.add(torch.randn(3), ["a"], [0], "t"), "float tensor"),
    (lambda m: m.search(torch.randn(1, 16), 0), "k must be"),
    (lambda m: m.search(torch.randn(1, 16), 2, exact=False), "no IVF index"),
    (lambda m: m.get([12345]), "not in the memory"),
    (lambda m: m.counts("x"), "use 'task' or 'class'"),
])
def test_bad_calls_are_refused(call, match):
    mem = ReplayMemory(16, 10)
    with pytest.raises(MtpeftError, match=match):
        call(mem)


def test_bad_settings_are_refused():
    with pytest.raises(MtpeftError, match="unknown memory policy"):
        ReplayMemory(16, 10, "fifo")
    with pytest.raises(MtpeftError, match="capacity must be"):
        ReplayMemory(16, 0)
    with pytest.raises(MtpeftError, match="seed must be"):
        ReplayMemory(16, 4, seed=-1)
    with pytest.raises(MtpeftError, match="nprobe must be"):
        IVFConfig(nprobe=0)
    with pytest.raises(MtpeftError, match="nlist must be"):
        IVFConfig(nlist=0)
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(MtpeftError, match="target_recall must be"):
            IVFConfig(target_recall=bad)
    with pytest.raises(MtpeftError, match="storage must be one of"):
        IVFConfig(storage="pq")
    with pytest.raises(MtpeftError, match="calib_k must be"):
        IVFConfig(calib_k=0)


def test_a_policy_that_misplaces_is_refused():
    class Bad(StoragePolicy):
        name = "bad"

        def place(self, view, ex, rng):
            return view.size + 3

    with pytest.raises(MtpeftError, match="placed an example at row"):
        fill(ReplayMemory(16, 10, Bad()), unit(1))


# ---- policies --------------------------------------------------------------------------------------
def test_task_balanced_stays_balanced_within_one():
    mem = ReplayMemory(8, 100, "task-balanced", seed=0)
    for t in range(7):
        fill(mem, unit(150, d=8, seed=t), task=f"task{t}")
        counts = mem.counts()
        assert len(counts) == t + 1 and sum(counts.values()) == 100
        assert max(counts.values()) - min(counts.values()) <= 1, counts


def test_class_balanced_stays_balanced_within_one_on_a_skewed_stream():
    cap = 60
    mem = ReplayMemory(8, cap, "class-balanced", seed=1)
    rng = random.Random(0)
    offered: dict = {}
    for step in range(10):  # class 0 is 10x as frequent as class 3; class 4 arrives at step 4
        labels = [rng.choice([0] * 10 + [1] * 4 + [2] * 2 + [3] + ([4] if step > 3 else [])) for _ in range(200)]
        fill(mem, unit(200, d=8, seed=step), labels=labels)
        for y in labels:
            offered[("t", y)] = offered.get(("t", y), 0) + 1
        counts = mem.counts("class")
        share = -(-cap // len(offered))
        rare = {k for k, n in offered.items() if n < share}
        for k in rare:  # a class that offered less than its share keeps everything it offered
            assert counts[k] == offered[k], (counts, offered)
        rest = [n for k, n in counts.items() if k not in rare]
        assert max(rest) - min(rest) <= 1, counts
        assert sum(counts.values()) == cap
    assert not rare and len(counts) == 5  # by the end every class offered its share: all balanced


def test_class_balance_counts_classes_per_label_space():
    mem = ReplayMemory(8, 40, "class-balanced")
    x = unit(200, d=8)
    mem.add(x[:100], ["a"] * 100, [0] * 100, "t1", "space1")
    mem.add(x[100:], ["b"] * 100, [0] * 100, "t2", "space2")  # label 0 of another space: another class
    assert mem.counts("class") == {("space1", 0): 20, ("space2", 0): 20}


def test_reservoir_keeps_each_offer_with_probability_capacity_over_seen():
    capacity, stream, runs = 20, 100, 300
    hits = torch.zeros(stream)
    x = unit(stream, d=4)
    for seed in range(runs):
        mem = ReplayMemory(4, capacity, "reservoir", seed=seed)
        ids = fill(mem, x)
        hits += (ids >= 0).float()
    freq = hits / runs
    p = capacity / stream
    # each block of 20 positions: 6000 Bernoulli(0.2) draws, std 0.0052; a bias towards early or late
    # examples (keeping the first ones, or always replacing) moves a block by far more than 0.03
    for block in freq.view(5, 20).mean(1):
        assert abs(block.item() - p) < 0.03, freq.view(5, 20).mean(1)


# ---- approximate path ---------------------------------------------------------------------------------
def recall_of(approx, exact):
    return (approx[:, :, None] == exact[:, None, :]).any(-1).float().mean().item()


def loo_recall(mem, nprobe, k=32, queries=256, seed=1234 + 1):
    """Recall@k of the IVF index at ``nprobe`` on the calibration's queries (the same seeded rows), each
    query's own id left out, computed here from scratch against brute force."""
    x, ids = mem.embeddings(mem.ids), mem.ids
    rows = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))[:queries]
    q, own = x[rows], ids[rows]
    exact = ids[torch.topk(q @ x.T, k + 1, dim=1).indices]
    mem.index.ivf.nprobe, before = nprobe, mem.index.ivf.nprobe
    got = torch.from_numpy(mem.index.ivf.search(q.numpy(), k + 1)[1])
    mem.index.ivf.nprobe = before
    hits = [len((set(g) - {o}) & (set(e) - {o})) for g, e, o in zip(got.tolist(), exact.tolist(), own.tolist())]
    return sum(hits) / (len(rows) * k)


def test_calibrated_nprobe_is_the_smallest_reaching_the_target_recall():
    x = clustered(6000, spread=0.8)
    mem = ReplayMemory(32, 5000, seed=0, exact_limit=1000)  # nprobe calibrated, target 0.95, fp16 lists
    fill(mem, x[:5000])
    st = mem.stats()["ivf"]
    assert mem.stats()["search"] == "ivf" and st["storage"] == "fp16" and st["target_recall"] == 0.95
    assert 1 < st["nprobe"] < st["nlist"]  # neither trivial nor exhaustive on this data
    assert st["recall"] >= 0.95 and abs(st["recall"] - loo_recall(mem, st["nprobe"])) < 1e-3
    assert loo_recall(mem, st["nprobe"] - 1) < 0.95  # the smallest such nprobe
    q = x[5000:]  # 1000 held-out queries from the same clusters: the recall holds beyond the sample
    assert recall_of(mem.search(q, 32)[1], mem.search(q, 32, exact=True)[1]) >= 0.93
    strict = ReplayMemory(32, 5000, seed=0, exact_limit=1000, ivf=IVFConfig(target_recall=0.99))
    fill(strict, x[:5000])
    assert strict.stats()["ivf"]["nprobe"] > st["nprobe"] and strict.stats()["ivf"]["recall"] >= 0.99


def test_a_fixed_nprobe_is_kept_and_its_recall_measured():
    mem = ReplayMemory(32, 3000, seed=0, exact_limit=1000, ivf=IVFConfig(nprobe=2, storage="flat"))
    fill(mem, clustered(3000, spread=0.8))
    st = mem.stats()["ivf"]
    assert st["nprobe"] == 2 and st["storage"] == "flat" and abs(st["recall"] - loo_recall(mem, 2)) < 1e-3
    assert type(mem.index.ivf).__name__ == "IndexIVFFlat"
    wide = ReplayMemory(32, 3000, seed=0, exact_limit=1000, ivf=IVFConfig(nprobe=500))  # more than the lists
    fill(wide, clustered(3000, spread=0.8))
    st = wide.stats()["ivf"]
    assert st["nprobe"] == st["nlist"] < 500 and st["recall"] == pytest.approx(loo_recall(wide, st["nlist"]), abs=1e-3)


def test_ivf_path_recall_and_consistency_after_evictions():
    mem = ReplayMemory(32, 2500, seed=0, exact_limit=1000)
    x = clustered(3300)
    fill(mem, x[:3000])  # 500 evictions on the IVF path
    mem.remove(mem.ids[:100])
    assert mem.index.ivf is not None and mem.index.approximate()
    assert mem.index.ivf.ntotal == len(mem) == 2400
    assert sorted(_ivf_contents(mem.index.ivf)[0].tolist()) == sorted(mem.ids.tolist())  # the evicted are gone
    q = x[3000:]
    _, approx = mem.search(q, 10)
    _, exact = mem.search(q, 10, exact=True)
    assert torch.equal(exact, brute(mem, q, 10)[1])
    assert recall_of(approx, exact) >= 0.9
    assert set(approx[approx >= 0].tolist()) <= set(mem.ids.tolist())  # no evicted id comes back


def test_recall_is_measured_again_once_the_contents_turned_over():
    old, new = clustered(2000, seed=0), clustered(5000, seed=1, spread=0.6)  # other clusters arrive
    mem = ReplayMemory(32, 2000, seed=0, exact_limit=1000)
    fill(mem, old)
    first = mem.stats()["ivf"]
    assert first["calibrated_at"] == 2000 and first["writes"] == 0
    written = 0
    for i in range(0, 5000, 250):  # reservoir replacements, until as many writes as the index held
        written += int((fill(mem, new[i:i + 250], task="u", start=i) >= 0).sum())
        if written >= 2000:
            break
        assert mem.stats()["ivf"]["writes"] == written and mem.stats()["ivf"]["recall"] == first["recall"]
    assert written >= 2000
    st = mem.stats()["ivf"]
    assert st["calibrated_at"] == 2000 and st["writes"] == 0 and st["built_at"] == first["built_at"]
    assert st["recall"] >= 0.95 and abs(st["recall"] - loo_recall(mem, st["nprobe"])) < 1e-3


def test_ivf_is_rebuilt_with_more_lists_as_the_memory_grows():
    mem = ReplayMemory(32, 5000, seed=0, exact_limit=200, ivf=IVFConfig(regrow=4))
    x = clustered(1000)
    for i in range(0, 1000, 100):
        fill(mem, x[i:i + 100], start=i)
        if i == 100:
            assert mem.index.built_at == 200 and mem.index.ivf.nlist == 200 // 32
    assert mem.index.built_at == 800 and mem.index.ivf.nlist == 800 // 32  # rebuilt at 4 x 200
    assert mem.index.ivf.ntotal == 1000
    q = clustered(8, seed=3)
    _, ids = mem.search(q, 5)
    assert set(ids.flatten().tolist()) <= set(mem.ids.tolist())


def test_queries_of_any_float_layout_give_the_same_answer():
    mem = ReplayMemory(16, 3000, exact_limit=1000)
    fill(mem, unit(3000))
    q = unit(6, seed=4)
    want = mem.search(q, 5)
    for other in (q.double(), q.T.contiguous().T, q.clone().requires_grad_(), q.numpy()):
        got = mem.search(other, 5)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])
    with pytest.raises(MtpeftError, match="NaN"):
        mem.search(torch.full((1, 16), float("inf")), 5)


def test_fp16_lists_refuse_what_float16_cannot_hold():
    big = torch.full((1, 16), 1e5)
    mem = ReplayMemory(16, 10)
    with pytest.raises(MtpeftError, match="storage='flat'"):
        mem.add(big, ["a"], [0], "t")
    assert len(mem) == 0 and mem.next_id == 0  # nothing changed
    flat = ReplayMemory(16, 10, ivf=IVFConfig(storage="flat"))
    assert flat.add(big, ["a"], [0], "t").tolist() == [0]


# ---- save / load --------------------------------------------------------------------------------------
def make_saved(tmp, ivf=True, policy="task-balanced", cfg=None):
    mem = ReplayMemory(32, 300, policy, seed=4, exact_limit=200 if ivf else 10_000, ivf=cfg)
    for t in range(3):
        fill(mem, clustered(200, seed=t), task=f"task{t}")
    mem.save(tmp)
    return mem


@pytest.mark.parametrize("ivf, storage", [(True, "fp16"), (True, "flat"), (False, "fp16")])
def test_reload_is_identical_and_goes_on_identically(tmp_path, ivf, storage):
    mem = make_saved(tmp_path, ivf, cfg=IVFConfig(storage=storage))
    fill(mem, clustered(10, seed=30), task="task7")  # a new task: its examples evict, 10 writes
    mem.save(tmp_path)
    back = ReplayMemory.load(tmp_path)
    assert (back.index.ivf is not None) == ivf
    assert back.stats() == mem.stats() and back.index.cfg == mem.index.cfg
    if ivf:  # the calibration came back: nprobe, the recall measured, the writes counted towards the next
        assert mem.stats()["ivf"]["recall"] >= 0.95 and mem.stats()["ivf"]["writes"] > 0
        assert back.index.ivf.nprobe == mem.index.ivf.nprobe
    q = clustered(16, seed=9)
    for exact in (None, True):
        s1, i1 = mem.search(q, 12, exact=exact)
        s2, i2 = back.search(q, 12, exact=exact)
        assert torch.equal(i1, i2) and torch.equal(s1, s2)
    assert back.get(back.ids) == mem.get(mem.ids) and back.next_id == mem.next_id
    more = clustered(150, seed=11)  # the policy and rng states came back: the same future
    assert torch.equal(fill(mem, more, task="task3"), fill(back, more, task="task3"))
    assert torch.equal(mem.sample(10), back.sample(10))
    assert torch.equal(mem.search(q, 12)[1], back.search(q, 12)[1])
    assert back.stats() == mem.stats()


def test_a_version_1_memory_still_loads(tmp_path):
    """Version 1 wrote float32 lists with a fixed nprobe and no calibration: it loads as it was, is saved as
    version 2, and its recall is measured at the next add."""
    mem = make_saved(tmp_path, cfg=IVFConfig(storage="flat", nprobe=3))
    m = json.loads((tmp_path / MANIFEST).read_text())
    v1 = {k: m["ivf"][k] for k in ("nlist", "nprobe", "train_per_list", "niter", "seed", "regrow", "max_nlist")}
    del m["ivf_state"]
    m.update(version=1, ivf=v1)
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    back = ReplayMemory.load(tmp_path)
    st = back.stats()["ivf"]
    assert st["nprobe"] == 3 and st["storage"] == "flat" and st["recall"] is None and back.index.cfg.nprobe == 3
    q = clustered(16, seed=9)
    assert torch.equal(back.search(q, 12)[1], mem.search(q, 12)[1])
    fill(back, clustered(20, seed=12), task="task5")
    assert back.stats()["ivf"]["recall"] is not None and back.stats()["ivf"]["calibrated_at"] == len(back)
    back.save(tmp_path)
    assert json.loads((tmp_path / MANIFEST).read_text())["version"] == 2
    assert ReplayMemory.load(tmp_path).stats() == back.stats()


def test_a_version_1_manifest_naming_an_fp16_index_is_refused(tmp_path):
    make_saved(tmp_path)  # fp16 lists, which version 1 never wrote
    m = json.loads((tmp_path / MANIFEST).read_text())
    m.update(version=1, ivf={k: m["ivf"][k] or 4 for k in ("nlist", "nprobe", "train_per_list", "niter", "seed",
                                                           "regrow", "max_nlist")})
    del m["ivf_state"]
    (tmp_path / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(MtpeftError, match="expected a trained inner-product IndexIVFFlat"):
        ReplayMemory.load(tmp_path)


def test_save_replaces_old_files_and_leaves_only_the_current_ones(tmp_path):
    mem = make_saved(tmp_path)
    fill(mem, clustered(50, seed=20), task="task9")
    mem.save(tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != ".mtpeft.lock")
    assert len(names) == 4 and MANIFEST in names
    assert ReplayMemory.load(tmp_path).counts() == mem.counts()


@pytest.fixture(scope="module")
def saved():
    d = Path(tempfile.mkdtemp())
    make_saved(d)
    yield d
    shutil.rmtree(d)


def copy_of(src) -> Path:
    dst = Path(tempfile.mkdtemp())
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def file_of(d: Path, kind: str) -> Path:
    if kind == "manifest":
        return d / MANIFEST
    return d / json.loads((d / MANIFEST).read_text())["files"][kind]["file"]


def reseal(d: Path, kind: str) -> None:
    """Fix the manifest's checksum after a change: what a hostile (not merely corrupted) file looks like."""
    import hashlib

    m = json.loads((d / MANIFEST).read_text())
    m["files"][kind]["sha256"] = hashlib.sha256(file_of(d, kind).read_bytes()).hexdigest()
    (d / MANIFEST).write_text(json.dumps(m))


KINDS = ["manifest", "vectors", "payloads", "index"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), frac=st.floats(0, 0.999), hostile=st.booleans())
def test_truncated_files_are_refused(saved, kind, frac, hostile):
    d = copy_of(saved)
    try:
        f = file_of(d, kind)
        data = f.read_bytes()
        f.write_bytes(data[: int(len(data) * frac)])
        if hostile and kind != "manifest":
            reseal(d, kind)
        with pytest.raises(MtpeftError):
            ReplayMemory.load(d)
    finally:
        shutil.rmtree(d)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), junk=st.binary(min_size=1, max_size=64), at=st.floats(0, 1),
       hostile=st.booleans())
def test_random_bytes_are_refused(saved, kind, junk, at, hostile):
    d = copy_of(saved)
    try:
        f = file_of(d, kind)
        data = bytearray(f.read_bytes())
        i = int((len(data) - 1) * at)
        new = bytes(data[:i]) + junk + bytes(data[i + len(junk):])
        if new == bytes(data):
            return
        f.write_bytes(new)
        if hostile and kind != "manifest":
            reseal(d, kind)
        try:
            ReplayMemory.load(d)
        except MtpeftError:
            return
        # a few bytes of a JSON string or of a float can change without breaking any rule: then the memory
        # loads, and what was loaded is exactly what the (resealed) files say
        assert hostile or kind == "manifest"
    finally:
        shutil.rmtree(d)


def edit_manifest(d, fn):
    m = json.loads((d / MANIFEST).read_text())
    fn(m)
    (d / MANIFEST).write_text(json.dumps(m))


@pytest.mark.parametrize("fn, match", [
    (lambda m: m.update(format="x"), "not a replay memory manifest"),
    (lambda m: m.update(version=3), "format version 3"),
    (lambda m: m.update(dim=0), "'dim' must be an integer >= 1"),
    (lambda m: m.update(size=10_000), "exceeds the capacity"),
    (lambda m: m.update(size=m["size"] - 1), "expected int64"),
    (lambda m: m.update(dim=31), "expected float32"),
    (lambda m: m.update(next_id=5), "exceeds|ids must be distinct"),
    (lambda m: m["files"]["vectors"].update(file="../vectors.0123456789abcdef.safetensors"), "not a plain"),
    (lambda m: m["files"]["vectors"].update(file="/etc/passwd"), "not a plain"),
    (lambda m: m["files"].update(index=m["files"]["payloads"]), "not a plain"),
    (lambda m: m["files"].pop("payloads"), "must name 'vectors', 'payloads'"),
    (lambda m: m["policy"].update(name="fifo"), "unknown memory policy"),
    (lambda m: m["policy"].update(state={"seen": {"task0": -1}}), "integer >= 0"),
    (lambda m: m["policy"].update(state={"seen": 3}), "policy state must be"),
    (lambda m: m["rng"].update(policy=[3, [1, 2], None]), "random state is invalid"),
    (lambda m: m["ivf"].update(nprobe=0), "'ivf': IVFConfig: nprobe must be"),
    (lambda m: m["ivf"].update(storage="pq"), "storage must be one of"),
    (lambda m: m["ivf"].update(target_recall=1.5), "target_recall must be"),
    (lambda m: m["ivf"].pop("calib_k"), "'ivf' must hold"),
    (lambda m: m.update(ivf_built_at=0), "an index file is named"),
    (lambda m: m.update(ivf_state=None), "'ivf_state' is null but an index file is named"),
    (lambda m: m["ivf_state"].update(nprobe=0), "'ivf_state' must hold"),
    (lambda m: m["ivf_state"].update(recall=1.5), "'ivf_state' must hold"),
    (lambda m: m["ivf_state"].update(writes="3"), "'ivf_state' must hold"),
    (lambda m: m.update(version=1), r"\(version 1\) field 'ivf' must hold"),
])
def test_bad_manifests_are_refused(saved, fn, match):
    d = copy_of(saved)
    try:
        edit_manifest(d, fn)
        with pytest.raises(MtpeftError, match=match):
            ReplayMemory.load(d)
    finally:
        shutil.rmtree(d)


def _rewrite_vectors(d, fn):
    from safetensors.torch import load, save

    f = file_of(d, "vectors")
    t = load(f.read_bytes())
    fn(t)
    f.write_bytes(save(t))
    reseal(d, "vectors")


@pytest.mark.parametrize("fn, match", [
    (lambda t: t["embeddings"].__setitem__((0, 0), float("nan")), "NaN"),
    (lambda t: t["ids"].__setitem__(1, int(t["ids"][0])), "distinct"),
    (lambda t: t.update(ids=t["ids"].int()), "expected int64"),
    (lambda t: t.update(extra=torch.zeros(1)), "holds"),
    (lambda t: t["ids"].__setitem__(0, 10**9), "index holds other ids|distinct"),
])
def test_hostile_vectors_are_refused(saved, fn, match):
    d = copy_of(saved)
    try:
        _rewrite_vectors(d, fn)
        with pytest.raises(MtpeftError, match=match):
            ReplayMemory.load(d)
    finally:
        shutil.rmtree(d)


def test_hostile_payloads_and_symlinks_are_refused(saved, tmp_path):
    d = copy_of(saved)
    try:
        f = file_of(d, "payloads")
        rows = json.loads(f.read_text())
        rows[0] = ["text", "not a label", "task0", "task0"]
        f.write_text(json.dumps(rows))
        reseal(d, "payloads")
        with pytest.raises(MtpeftError, match="an example must be"):
            ReplayMemory.load(d)
        outside = tmp_path / "elsewhere.json"
        outside.write_text(json.dumps(rows[:1]))
        f.unlink()
        f.symlink_to(outside)
        with pytest.raises(MtpeftError, match="symlink"):
            ReplayMemory.load(d)
    finally:
        shutil.rmtree(d)


def test_loading_what_is_not_a_memory_is_refused(tmp_path):
    with pytest.raises(MtpeftError, match="not a saved replay memory"):
        ReplayMemory.load(tmp_path)
    (tmp_path / MANIFEST).write_text("[1, 2")
    with pytest.raises(MtpeftError, match="not valid JSON"):
        ReplayMemory.load(tmp_path)


# ---- keys from a bank ---------------------------------------------------------------------------------
def test_embed_texts_is_the_banks_pooled_embedding():
    from mtpeft.backbone import load_backbone
    from mtpeft.bank import ModuleBank
    from mtpeft.memory import embed_texts

    bank = ModuleBank(load_backbone("tiny-bert", seed=0))
    texts = ["the red apple", "a blue sky over the ocean", "one"]
    emb = embed_texts(bank, texts, batch_size=2)
    assert emb.shape == (3, bank.backbone.hidden_size) and emb.dtype == torch.float32
    enc = bank.backbone.tokenizer(texts[:2], padding=True, return_tensors="pt")
    assert torch.allclose(emb[:2], bank.pooled(enc["input_ids"], enc["attention_mask"]), atol=1e-6)
    mem = ReplayMemory(emb.shape[1], 10)
    ids = mem.add(emb, texts, [0, 1, 0], "toy")
    assert mem.search(emb[1:2], 1)[1].item() == ids[1].item()


@pytest.mark.parametrize("change, match", [
    ("vector", "other vectors"),
    ("id", "other ids"),
    ("drop", "expected a trained inner-product IndexIVFScalarQuantizer"),
    ("flat", "expected a trained inner-product IndexIVFScalarQuantizer"),
    ("sq8", "expected a trained inner-product IndexIVFScalarQuantizer \\(fp16"),
])
def test_an_index_that_disagrees_with_the_vectors_is_refused(saved, change, match):
    import faiss
    import numpy as np

    d = copy_of(saved)
    try:
        f = file_of(d, "index")
        ivf = faiss.deserialize_index(np.frombuffer(f.read_bytes(), dtype=np.uint8).copy())
        victim = np.asarray([json.loads((d / MANIFEST).read_text())["next_id"] - 1], dtype=np.int64)
        assert ivf.remove_ids(victim) == 1
        vec = np.ones((1, ivf.d), dtype=np.float32) / np.sqrt(ivf.d)
        if change == "vector":
            ivf.add_with_ids(vec, victim)
        elif change == "id":
            ivf.add_with_ids(vec, victim + 10**6)
        elif change == "flat":
            ivf = faiss.IndexFlatIP(ivf.d)
        elif change == "sq8":  # the same lists, 8-bit codes: not what storage="fp16" built
            sq8 = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(ivf.d), ivf.d, ivf.nlist,
                                                faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT, False)
            sq8.train(np.random.default_rng(0).standard_normal((500, ivf.d)).astype(np.float32))
            ivf = sq8
        f.write_bytes(faiss.serialize_index(ivf).tobytes())
        reseal(d, "index")
        with pytest.raises(MtpeftError, match=match):
            ReplayMemory.load(d)
    finally:
        shutil.rmtree(d)


def test_nearest_to_batch_of_identical_queries_still_gives_n_ids():
    mem = ReplayMemory(16, 100)
    fill(mem, unit(100))
    got = mem.nearest_to_batch(unit(1, seed=3).repeat(32, 1), 40)
    assert len(set(got.tolist())) == 40


def test_public_name():
    import mtpeft
    from mtpeft.memory.core import ReplayMemory as Direct

    assert mtpeft.ReplayMemory is Direct and "ReplayMemory" in mtpeft.__all__
