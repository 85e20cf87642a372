"""`mtpeft distil` and `mtpeft adapt` on two processes (Lightning DDP, gloo on CPU) end as on one: every fit on
the same global batches, every test split scored in shares, rank zero alone writing. These tests start real
processes (`python -m mtpeft distil|adapt --devices 2`)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from ddp_util import run_mtpeft, task_file, weights

from mtpeft.adapt.fisher import ARTIFACT

pytestmark = pytest.mark.processes


def _close(w1: dict, w2: dict) -> None:
    assert sorted(w1) == sorted(w2) and w1
    for k, v in w1.items():
        torch.testing.assert_close(w2[k], v, rtol=1e-4, atol=1e-5, msg=k)


def _distil(tmp, out, *flags, env=None):
    specs = [f"{n}={task_file(tmp / f'{n}.csv', i)}" for i, n in enumerate(("s1", "s2", "t1"))]
    conf = {"backbone": "tiny-bert", "sources": specs[:2], "targets": specs[2:], "n_tokens": 4, "rank": 1,
            "teacher": {"max_steps": 6, "batch_size": 8, "lr": 0.05}, "student": {"max_steps": 6, "batch_size": 8},
            "target": {"max_steps": 4, "batch_size": 8, "init": "similar"}, "loss": {"mse": 0.5}}
    (tmp / "c.yaml").write_text(yaml.safe_dump(conf))
    return run_mtpeft(["distil", "--config", tmp / "c.yaml", "--out", out, "--accelerator", "cpu", "--json", *flags],
                      tmp, env)


def test_distil_on_two_processes_as_on_one(tmp_path):
    """Teachers, the distilled student (KL and hidden-state MSE to the teachers), the baselines and the target
    stage on 2 ranks = one process: the same report and the same prompts, P* and factors; one report written."""
    one = _distil(tmp_path, tmp_path / "one")
    two = _distil(tmp_path, tmp_path / "two", "--devices", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one report: only rank zero prints
    assert r1["sources"] == r2["sources"] and r1["targets"] == r2["targets"]
    assert [r["teacher_steps"] for r in r1["sources"]] == [6, 6] and r1["student"]["steps"] == 6
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert {k.split("/")[0] for k in w1} == {"s1-teacher", "s2-teacher", "s1-mpt", "s2-mpt", "s1-pt", "s2-pt",
                                              "t1-mpt", "t1-pt"}
    _close(w1, w2)
    from mtpeft.api import open_bank
    from mtpeft.modules.mpt import shared_prompt

    (b1, _), (b2, _) = open_bank(tmp_path / "one"), open_bank(tmp_path / "two")
    torch.testing.assert_close(shared_prompt(b2, "s1-mpt"), shared_prompt(b1, "s1-mpt"), rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "distil-report.json").read_text())["sources"] == r2["sources"]
    # rank 1 did train: made to fail at its 3rd step, it stops the run naming itself and how to go on
    bad = _distil(tmp_path, tmp_path / "bad", "--devices", "2", env={"MTPEFT_FAIL_RANK": "1:3"})
    assert bad.returncode != 0 and "rank 1 of 2 stopped: InjectedFault" in bad.stderr, bad.stderr[-3000:]
    assert "the same `mtpeft distil` command finishes the run" in bad.stderr


def test_distil_checks_the_batches_against_the_ranks(tmp_path):
    p = _distil(tmp_path, tmp_path / "b", "--devices", "3")
    assert p.returncode == 2 and "teacher.batch_size 8 is the global batch" in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "b").exists()


def test_adapt_on_two_processes_as_on_one(tmp_path):
    """Few-shot transfer from two experts on 2 ranks = one process: scratch, LoraHub (its search run whole on
    every rank, the same seeded search) and pi-Tuning (Fisher embeddings, the probe, the interpolation and the
    fine-tune) keep the same modules and report the same accuracies; rank zero alone writes report and bank."""
    base = tmp_path / "base"
    files = {n: task_file(tmp_path / f"{n}.csv", i) for i, n in enumerate(("toy", "toy2", "new"))}
    trained = run_mtpeft(["train", "--backbone", "tiny-bert", "--task-file", f"toy={files['toy']}", "--task-file",
                          f"toy2={files['toy2']}", "--out", base, "--batch-size", "8", "--max-steps", "6",
                          "--option", "r=4", "--accelerator", "cpu", "--json"], tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    for d in ("one", "two", "bad"):
        shutil.copytree(base, tmp_path / d)

    def adapt(d, *flags, env=None):
        return run_mtpeft(["adapt", "--bank", tmp_path / d, "--task-file", f"new={files['new']}", "--shots", "8",
                           "--methods", "scratch,lorahub,pi-tuning", "--seeds", "0", "--steps", "4", "--batch-size",
                           "8", "--lorahub-evals", "6", "--top-k", "2", "--interp-steps", "2", "--probe-steps", "2",
                           "--fisher-batches", "2", "--source-file", f"toy={files['toy']}", "--source-file",
                           f"toy2={files['toy2']}", "--keep", "--out", tmp_path / f"{d}-report", "--accelerator",
                           "cpu", "--json", *flags], tmp_path, env)

    one, two = adapt("one"), adapt("two", "--devices", "2")
    assert one.returncode == 0, one.stderr[-3000:]
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)
    key = lambda r: [(x["method"], x["shots"], x["accuracy"], x["trainable"], x["module"]) for x in r["runs"]]
    assert key(r1) == key(r2) and len(r1["runs"]) == 3
    assert r1["baselines"] == r2["baselines"] and r1["similarity"] == r2["similarity"]
    lh1, lh2 = (next(x["info"] for x in r["runs"] if x["method"] == "lorahub") for r in (r1, r2))
    assert lh1["weights"] == lh2["weights"]
    w1, w2 = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert {k.split("/")[0] for k in w1} == {"toy-lora", "toy2-lora", *(x["module"] for x in r1["runs"])}
    _close(w1, w2)
    from mtpeft.api import open_bank

    (b1, _), (b2, _) = open_bank(tmp_path / "one"), open_bank(tmp_path / "two")
    for e in ("toy-lora", "toy2-lora"):  # the Fisher embeddings computed here were saved, once, by rank zero
        torch.testing.assert_close(b2.artifacts(e)[ARTIFACT], b1.artifacts(e)[ARTIFACT], rtol=1e-4, atol=1e-6)
    assert json.loads((tmp_path / "two-report" / "adapt-report.json").read_text())["runs"] == r2["runs"]
    bad = adapt("bad", "--devices", "2", env={"MTPEFT_FAIL_RANK": "1:2"})
    assert bad.returncode != 0 and "rank 1 of 2 stopped: InjectedFault" in bad.stderr, bad.stderr[-3000:]
    assert "resumes after them" in bad.stderr
