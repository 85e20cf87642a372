"""Training on several processes (Lightning DDP, gloo on CPU): the same bank as one process, only rank zero
writes, a failing rank stops the run and leaves the finished modules for --resume.

These tests start real processes: `python -m mtpeft train --devices 2` and Lightning's launcher starts
the second rank by running the same command again."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from ddp_util import run_mtpeft
from ddp_util import task_file as _task_file
from ddp_util import weights as _weights

pytestmark = pytest.mark.processes


def _train(tmp: Path, out: Path, *flags: str, env: dict | None = None, torchrun: bool = False
           ) -> subprocess.CompletedProcess:
    files = [f"toy={_task_file(tmp / 'toy.csv', 0)}", f"toy2={_task_file(tmp / 'toy2.csv', 1)}"]
    tasks = [a for f in files[: 2 if "--two" in flags else 1] for a in ("--task-file", f)]
    flags = tuple(f for f in flags if f != "--two")
    return run_mtpeft(["train", "--backbone", "tiny-bert", *tasks, "--out", out, "--batch-size", "8",
                       "--max-epochs", "2", "--lr", "5e-3", "--option", "r=4", "--option", "dropout=0",
                       "--accelerator", "cpu", "--json", *flags], tmp, env, torchrun)


@pytest.mark.parametrize(("kind", "launcher"), [("expert", "lightning"), ("multitask", "lightning"),
                                                ("expert", "torchrun")])
def test_two_processes_train_the_same_bank_as_one(tmp_path, kind, launcher):
    """2 ranks x 4 examples per step = one process x 8: the same steps, the same kept epoch, the same weights
    (up to float summation order), and the same report (each rank validated and tested half the examples).
    multitask: one module on a two-task mixture (weighted sampling with replacement, the same draws).
    lightning: Lightning's launcher starts rank 1; torchrun: torchrun starts both ranks at once."""
    flags = ("--two", "--multitask") if kind == "multitask" else ()
    one = _train(tmp_path, tmp_path / "one", *flags)
    two = _train(tmp_path, tmp_path / "two", *flags, "--devices", "2", "--strategy", "ddp",
                 torchrun=launcher == "torchrun")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one report: only rank zero prints
    assert len(r1["results"]) == (2 if kind == "multitask" else 1)
    for a, b in zip(r1["results"], r2["results"], strict=True):
        assert a["steps"] == b["steps"] == (28 if kind == "multitask" else 14)
        assert a["accuracy"] == b["accuracy"] and a["n"] == b["n"] == 16
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert sorted(w1) == sorted(w2) and w1
    moved = max(float(w1[k].abs().max()) for k in w1 if k.endswith("lora_B"))
    assert moved > 1e-3  # it trained (LoRA's B starts at zero): equal banks are not two untouched inits
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    # only rank zero wrote: one run state, finished
    states = list((tmp_path / "two" / "runs").glob("*.json"))
    assert len(states) == 1 and json.loads(states[0].read_text())["status"] == "finished"


def test_skills_train_on_two_processes_as_on_one(tmp_path):
    """Poly skills (2 skills, 2 tasks) and their routing logits on 2 ranks = one process: the Gumbel-sigmoid
    noise is drawn for every task row from the router's own stream, so the cut of a batch over ranks does not
    change it; the skills, the logits and the report agree, and only rank zero wrote the router."""
    from safetensors.torch import load_file

    flags = ("--two", "--multitask", "--router", "poly", "--skills", "2", "--router-lr", "0.1")
    one = _train(tmp_path, tmp_path / "one", *flags)
    two = _train(tmp_path, tmp_path / "two", *flags, "--devices", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
    assert [(r["task"], r["accuracy"], r["n"], r["steps"]) for r in r1] == \
        [(r["task"], r["accuracy"], r["n"], r["steps"]) for r in r2]
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert sorted(w1) == sorted(w2) and len(w1) >= 4
    assert max(float(w1[k].abs().max()) for k in w1 if k.endswith("lora_B")) > 1e-3  # the skills trained
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)
    (f1,), (f2,) = ([*(tmp_path / d / "routers" / "skills").glob("*.safetensors")] for d in ("one", "two"))
    l1, l2 = load_file(f1), load_file(f2)
    assert sorted(l1) == sorted(l2)
    for k in l1:
        init_gap = float(l1[k].abs().max())
        assert init_gap > 2e-3, k  # the logits moved from their U(-1e-3, 1e-3) init
        torch.testing.assert_close(l2[k], l1[k], rtol=1e-4, atol=1e-5, msg=k)
    # a second rank did train the skills: made to fail at its 3rd step, it stops the run naming itself
    bad = _train(tmp_path, tmp_path / "bad", *flags, "--devices", "2", env={"MTPEFT_FAIL_RANK": "1:3"})
    assert bad.returncode != 0 and "rank 1 of 2 stopped: InjectedFault" in bad.stderr, bad.stderr[-3000:]


def test_gates_train_on_two_processes_as_on_one(tmp_path):
    """`mtpeft gate --devices 2` on an expert trained once: the same PHATGOOSE gate vectors and retrieval
    centroid as one process, and the same report."""
    import shutil

    from mtpeft.api import open_bank

    base = tmp_path / "base"
    trained = _train(tmp_path, base)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for d in ("one", "two"):
        shutil.copytree(base, tmp_path / d)

    def gate(bank, *flags, env=None):
        return run_mtpeft(["gate", "--bank", bank, "--task-file", f"toy={tmp_path / 'toy.csv'}", "--steps", "8",
                           "--batch-size", "8", "--lr", "5e-2", "--accelerator", "cpu", "--json", *flags],
                          tmp_path, env)

    one, two = gate(tmp_path / "one"), gate(tmp_path / "two", "--devices", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout)["results"], json.loads(two.stdout)["results"]
    assert [(r["module"], r["steps"], r["centroid_n"]) for r in r1] == [(r["module"], r["steps"], r["centroid_n"])
                                                                       for r in r2] == [("toy-lora", 8, 56)]
    (b1, _), (b2, _) = open_bank(tmp_path / "one"), open_bank(tmp_path / "two")
    a1, a2 = b1.artifacts("toy-lora"), b2.artifacts("toy-lora")
    gates = [k for k in a1 if "gate" in k]
    assert gates and sorted(a1) == sorted(a2)
    moved = max(float(a1[k].abs().max()) for k in gates)
    assert moved > 0  # gates start at zero (PHATGOOSE): equal untouched gates would prove nothing
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-5, msg=k)
    # a second rank did train the gates: made to fail at its 3rd step, it stops the run naming itself and
    # saying how to go on (gate has no --resume: the experts not gated yet are gated again)
    bad = gate(tmp_path / "one", "--devices", "2", env={"MTPEFT_FAIL_RANK": "1:3"})
    assert bad.returncode != 0 and "rank 1 of 2 stopped: InjectedFault" in bad.stderr, bad.stderr[-3000:]
    assert "`mtpeft gate` on the others" in bad.stderr


@pytest.mark.parametrize("failing", [1, 0])
def test_a_failing_rank_stops_the_run_and_resume_finishes_it(tmp_path, failing):
    """A rank fails in the second expert's training (step 16 of its process: the first expert took 14): the
    command fails, the failing rank naming its fault and the other saying a peer failed; the bank keeps
    the first expert as trained, the run state waits for --resume, and --resume (one process) finishes."""
    out = tmp_path / "bank"
    bad = _train(tmp_path, out, "--two", "--devices", "2", env={"MTPEFT_FAIL_RANK": f"{failing}:16"})
    assert bad.returncode != 0
    err = bad.stderr
    assert f"rank {failing} of 2 stopped: InjectedFault: injected fault" in err, err[-3000:]
    assert f"rank {1 - failing} of 2 stopped: another rank failed" in err, err[-3000:]
    w = _weights(out)
    assert {k.split("/")[0] for k in w} == {"toy-lora"}
    state = json.loads(next((out / "runs").glob("*.json")).read_text())
    assert state["status"] == "running" and [u["name"] for u in state["units"]] == ["toy-lora"]
    good = _train(tmp_path, out, "--two", "--resume")
    assert good.returncode == 0, good.stderr[-3000:]
    assert [r["module"] for r in json.loads(good.stdout)["results"]] == ["toy-lora", "toy2-lora"]
    after = _weights(out)
    assert {k.split("/")[0] for k in after} == {"toy-lora", "toy2-lora"}
    for k in w:  # the finished expert is untouched by the failure and the resume
        assert torch.equal(after[k], w[k]), k


def test_the_global_batch_must_split_evenly_over_the_ranks(tmp_path):
    p = _train(tmp_path, tmp_path / "b", "--devices", "3")
    assert p.returncode == 2
    assert "--batch-size 8 is the global batch" in p.stderr and "multiple of 3" in p.stderr, p.stderr
    assert not (tmp_path / "b").exists()


def test_parallel_settings_are_checked_before_anything_runs(tmp_path, capsys):
    from mtpeft.cli import main

    data = str(_task_file(tmp_path / "toy.csv", 0))
    base = ["train", "--backbone", "tiny-bert", "--task-file", f"toy={data}", "--out", str(tmp_path / "b")]
    assert main([*base, "--strategy", "fsdp", "--devices", "2"]) == 2
    assert "--strategy fsdp is not supported yet" in capsys.readouterr().err
    conf = tmp_path / "run.yaml"
    conf.write_text("devices: 0\n")
    assert main([*base, "--config", str(conf)]) == 2
    assert "'devices' = 0 is out of range" in capsys.readouterr().err
    conf.write_text("devices: 2\nnum_nodes: 2\nbatch_size: 6\n")
    assert main([*base, "--config", str(conf)]) == 2
    err = capsys.readouterr().err
    assert "--batch-size 6 is the global batch" in err and "4 processes (2 per node x 2 nodes)" in err
    assert not (tmp_path / "b").exists()


def test_rank_batches_split_each_global_batch_as_one_process_sees_it():
    from torch.utils.data import RandomSampler

    from mtpeft.lightning.data import RankBatches

    data = list(range(22))  # 2 full global batches of 8, then 6 (padded to 8 on 4 ranks, not on 2)
    one = list(RankBatches(RandomSampler(data, generator=torch.Generator().manual_seed(3)), 8, 0, 1))
    for world in (2, 4):
        shares = [list(RankBatches(RandomSampler(data, generator=torch.Generator().manual_seed(3)), 8, r, world))
                  for r in range(world)]
        assert {len(s) for s in shares} == {len(one)} == {3}  # every rank takes as many steps
        for b, whole in enumerate(one):
            got = [i for s in shares for i in s[b]]
            if len(whole) % world == 0:
                assert got == whole
            else:  # the short last batch, padded with its own first examples
                assert got[: len(whole)] == whole and got[len(whole):] == whole[: len(got) - len(whole)]


def test_one_process_keeps_the_data_order_it_always_had():
    """The rank-aware loader changes nothing on one process: the order of DataLoader(shuffle=True,
    generator=g), epoch after epoch (its iterator draws a base seed from g before the permutation)."""
    from conftest import synthetic_task
    from torch.utils.data import DataLoader

    from mtpeft.lightning.data import TaskDataModule, _Examples, collate

    task = synthetic_task(n=40)
    new = TaskDataModule([task], batch_size=8, seed=5).train_dataloader()
    old = DataLoader(_Examples([task], "train"), batch_size=8, shuffle=True,
                     generator=torch.Generator().manual_seed(5), collate_fn=collate)
    for _ in range(3):
        assert [b["text"] for b in new] == [b["text"] for b in old]


@pytest.mark.parametrize(("env", "rank"), [
    ({}, 0),
    ({"RANK": "5", "LOCAL_RANK": "1"}, 5),  # torchrun
    ({"LOCAL_RANK": "1"}, 1),  # Lightning's launcher, one node
    ({"NODE_RANK": "1"}, 4),  # node 1's first process (4 devices a node), started by the user
    ({"NODE_RANK": "1", "LOCAL_RANK": "3"}, 7),
    ({"SLURM_PROCID": "6", "SLURM_NTASKS": "8"}, 6),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, 0),
])
def test_the_rank_is_read_from_the_launcher_before_any_process_group(monkeypatch, env, rank):
    from mtpeft.distributed import global_rank

    for k in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert global_rank(4) == rank


@pytest.mark.parametrize("n_tasks", [1, 2])
def test_the_ranks_loaders_together_give_the_one_process_batches(n_tasks):
    """Through TaskDataModule: rank 0's then rank 1's slice of each batch are the one-process batch, epoch
    after epoch (one task: a seeded shuffle; two: seeded weighted draws with replacement)."""
    import types

    from conftest import synthetic_task

    from mtpeft.lightning.data import TaskDataModule

    tasks = [synthetic_task(f"t{i}", n=48, seed=i) for i in range(n_tasks)]
    one = TaskDataModule(tasks, batch_size=8, seed=5).train_dataloader()
    ranks = []
    for r in range(2):
        dm = TaskDataModule(tasks, batch_size=8, seed=5)
        dm.trainer = types.SimpleNamespace(global_rank=r, world_size=2)
        ranks.append(dm.train_dataloader())
    for _ in range(3):
        whole = [(b["text"], b["task"].tolist()) for b in one]
        halves = [[(b["text"], b["task"].tolist()) for b in dl] for dl in ranks]
        assert whole == [(a[0] + b[0], a[1] + b[1]) for a, b in zip(*halves, strict=True)]
