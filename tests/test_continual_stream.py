"""Streams and scenarios: label spaces per step, domain-IL checks, config checks, the replay batches and the
O-LoRA penalty (no training here: see test_continual_runner.py for whole runs)."""
import itertools

import pytest
import torch
from continual_util import task_specs, tiny_config

from mtpeft.errors import MtpeftError


def _stream(tmp_path, scenario, domains=False):
    from mtpeft.continual.stream import load_stream

    return load_stream(None, task_specs(tmp_path, domains), scenario)


def test_class_il_space_grows_and_keeps_ids(tmp_path):
    s = _stream(tmp_path, "class-il")
    spaces = [s.train_space(i) for i in range(3)]
    assert [len(sp) for sp in spaces] == [2, 4, 6]
    for a, b in itertools.pairwise(spaces):  # old labels keep their ids as the space grows
        assert b.texts[: len(a)] == a.texts
    # a task not learnt yet is scored over the labels seen so far plus its own
    assert len(s.eval_space(0, s.tasks[2])) == 4 and len(s.eval_space(-1, s.tasks[1])) == 2
    assert s.eval_space(1, s.tasks[0]) == spaces[1]


def test_task_il_and_domain_il_spaces(tmp_path):
    t = _stream(tmp_path / "t", "task-il")
    assert t.train_space(1) is None and t.eval_space(2, t.tasks[0]) is None and t.task_id_at_test
    d = _stream(tmp_path / "d", "domain-il", domains=True)
    assert len(d.train_space(0)) == 2 and d.eval_space(-1, d.tasks[2]) == d.train_space(2)
    assert not d.task_id_at_test


def test_domain_il_refuses_tasks_with_other_labels(tmp_path):
    with pytest.raises(MtpeftError, match="domain-IL stream shares one label space"):
        _stream(tmp_path, "domain-il", domains=False)


def test_builtin_streams_and_bad_streams():
    from mtpeft.continual.stream import STREAMS, Stream, load_stream, stream_tasks

    assert stream_tasks("tweets")[0] == "domain-il" and len(STREAMS["mixed"][1]) == 5
    with pytest.raises(MtpeftError, match="unknown stream"):
        load_stream("nope")
    with pytest.raises(MtpeftError, match="runs as task-il, class-il"):
        load_stream("mixed", scenario="domain-il")
    with pytest.raises(MtpeftError, match="needs its scenario"):
        load_stream(None, ["bbc_topic"])
    with pytest.raises(MtpeftError, match="unknown scenario"):
        Stream("x", [object()], "online")


def test_config_checks(tmp_path):
    from mtpeft.continual.config import check_config

    conf = tiny_config(tmp_path)
    assert conf["memory"]["policy"] == "task-balanced" and conf["seeds"] == [0]
    for bad, match in (({"seeds": [0, 0]}, "seeds"), ({"lr": float("nan")}, "lr"), ({"max_steps": 0}, "max_steps"),
                       ({"memory": {"capacity": 0}}, "memory"), ({"colour": 1}, "unknown key"),
                       ({"strategies": {"replay": {"ratio": float("inf")}}}, "not a finite number")):
        with pytest.raises(MtpeftError, match=match):
            check_config(bad)


def test_strategy_options_are_checked(tmp_path):
    from mtpeft.continual.strategies import STRATEGIES, Context

    ctx = Context(None, None, None, "prompt", {}, None, 0)
    with pytest.raises(MtpeftError, match="unknown option"):
        STRATEGIES.get("seqft")(ctx, ratio=1)
    with pytest.raises(MtpeftError, match="works with module type"):
        STRATEGIES.get("olora")(ctx)
    with pytest.raises(MtpeftError, match="ratio"):
        STRATEGIES.get("replay")(ctx, ratio=0)
    with pytest.raises(MtpeftError, match="router must be one of"):
        STRATEGIES.get("expert-router")(ctx, router="oracle")
    with pytest.raises(MtpeftError, match="unknown strategy"):
        STRATEGIES.get("ewc")


def test_replay_batches_join_old_examples_at_the_ratio():
    from mtpeft.continual.replay_data import ReplayBatches

    picked = []

    def pick(new, g):
        picked.append(len(new))
        return torch.randperm(10, generator=g)[:4]

    batches = list(ReplayBatches(20, 8, pick, seed=0))
    assert len(batches) == 3 and [len(b) for b in batches] == [12, 12, 8]
    new = sorted(i for b in batches for i in b if i < 20)
    assert new == list(range(20))  # every new example once per epoch
    assert all(20 <= i < 30 for b in batches for i in b[-4:])  # then the memory's rows
    again = list(ReplayBatches(20, 8, pick, seed=0))
    assert again == batches  # seeded


def test_nearest_retrieval_picks_the_examples_nearest_the_batch():
    from mtpeft.continual.replay_data import ReplayDataModule
    from mtpeft.memory import ReplayMemory

    mem = ReplayMemory(4, 10)
    keys = torch.eye(4)
    ids = mem.add(keys, ["a", "b", "c", "d"], [0, 0, 1, 1], "old", "old")
    new_emb = torch.tensor([[0.0, 0.0, 1.0, 0.1], [0.0, 0.0, 0.9, 0.0]])
    dm = ReplayDataModule([None], (["a", "b", "c", "d"], [0, 0, 1, 1], [1, 1, 1, 1]), ids, memory=mem, n_old=1,
                          retrieval="nearest", new_embeddings=new_emb)
    pos = dm._pick(torch.tensor([0, 1]), torch.Generator())
    assert pos.tolist() == [2]  # "c": the stored key nearest to both new examples


def test_olora_penalty_is_the_l1_of_a_new_times_a_old():
    from conftest import bank_with

    from mtpeft.continual.strategies.olora import OrthogonalLoRA

    bank = bank_with("encoder", "lora", {"r": 2}, n=2)
    obj = OrthogonalLoRA(bank, "m1", ["m0"], lambda_orth=0.5, lambda_l2=0.0)
    logits = torch.tensor([[2.0, 0.0]])
    batch = {"target": torch.tensor([0])}
    loss, extra = obj(None, batch, logits)
    want = sum((bank.module_parameters("m1")[k] @ bank.module_parameters("m0")[k].t()).abs().sum()
               for k in bank.module_parameters("m1") if k.endswith(".lora_A"))
    ce = torch.nn.functional.cross_entropy(logits, torch.tensor([0]))
    assert torch.allclose(extra["orth"], want) and torch.allclose(loss, ce + 0.5 * want)
    # the penalty's gradient reaches only the new module's A
    loss.backward()
    assert all(p.grad is not None for k, p in bank.module_parameters("m1").items() if k.endswith(".lora_A"))
    assert all(p.grad is None for p in bank.module_parameters("m0").values())


def test_olora_orthogonal_init_starts_the_penalty_near_zero():
    from conftest import bank_with

    from mtpeft.continual.strategies.olora import OrthogonalLoRA, orthogonal_init

    bank = bank_with("encoder", "lora", {"r": 2}, n=3)
    penalty = OrthogonalLoRA(bank, "m2", ["m0", "m1"], 0.5, 0.0)  # reads the live parameters
    batch, logits = {"target": torch.tensor([0])}, torch.tensor([[1.0, 0.0]])
    orth0 = penalty(None, batch, logits)[1]["orth"]
    A0 = {k: p.detach().clone() for k, p in bank.module_parameters("m2").items()}
    orthogonal_init(bank, "m2", ["m0", "m1"])
    orth1 = penalty(None, batch, logits)[1]["orth"]
    assert orth0 > 0.1 and orth1 < 1e-4 * orth0
    for k, p in bank.module_parameters("m2").items():
        if k.endswith(".lora_A"):  # the rows keep their norms
            assert torch.allclose(p.norm(dim=1), A0[k].norm(dim=1), rtol=1e-4)


def test_evaluation_reuses_the_routers_pooled_embeddings():
    """A retrieval router reads the frozen backbone's pooled embedding of each batch: cached across evaluations
    of the same task, the second evaluation makes no extra backbone pass and gives the same accuracy."""
    from conftest import synthetic_task

    from mtpeft.api import new_bank
    from mtpeft.continual.evaluate import task_accuracy
    from mtpeft.gates import fit_centroid
    from mtpeft.routers import RetrievalRouter

    bank, scorer = new_bank("tiny-bert")
    task = synthetic_task("toy", n=24)
    for name in ("a", "b"):
        bank.add(name, "lora", {"r": 2}, task="toy", seed=len(name))
        fit_centroid(bank, scorer, task, name)
    router = RetrievalRouter.from_bank(bank, ["a", "b"], top_k=1)
    cache = {}
    first = task_accuracy(bank, scorer, task, router, batch_size=5, pooled=cache)
    assert len(cache) == 4  # 16 test examples in batches of 5
    calls = []
    real = bank.pooled
    bank.pooled = lambda *a: calls.append(1) or real(*a)
    second = task_accuracy(bank, scorer, task, router, batch_size=5, pooled=cache)
    assert second == first and not calls
    assert task_accuracy(bank, scorer, task, router, batch_size=5) == first and calls  # uncached: computed again
