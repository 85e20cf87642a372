"""`mtpeft route` and ``mtpeft.zeroshot.route_eval``: zero-shot routing of held-out tasks across a bank's experts,
the routing weights recorded per (task, expert) per site, report.json / report.md / heatmaps, and the errors.

Banks here are tiny (random backbones, LoRA experts moved off their init by noise): these tests check what is
evaluated, recorded and written, not how well the routers route (tests/test_routers_*.py do that).
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb, synthetic_task
from test_cli import error_of, run, run_json, write_csv

from mtpeft import Routing
from mtpeft.routers import Router, register_router

EXPERT_TASKS = ["ta", "tb", "tc"]


# ---- stand-in routers (so the recording and the report are tested apart from any one method) --------
@register_router("_test_token")
class TokenTopK(Router):
    """Per site and token: top-k of the first features of the site's input, over the experts."""

    per_site = True

    def __init__(self, module_names=None, top_k: int = 2):
        super().__init__(module_names)
        self.top_k = top_k

    @classmethod
    def from_bank(cls, bank, modules=None, top_k=None, **options):
        return cls(modules, top_k or 2)

    def at_site(self, site, x, ctx):
        assert ctx.task_ids is None  # zero-shot: the router is never told the task
        ids = self.module_ids(x.device)
        r = Routing.topk(x[..., : len(ids)].float(), self.top_k)
        return Routing(r.weights, ids[r.indices])


@register_router("_test_example")
class ExampleSoftmax(Router):
    """Per example: a softmax over the experts from the frozen backbone's pooled embedding."""

    def __init__(self, module_names=None):
        super().__init__(module_names)

    @classmethod
    def from_bank(cls, bank, modules=None, top_k=None, **options):
        return cls(modules)

    def route(self, bank, ctx):
        ids = self.module_ids(bank.device)
        p = ctx.pooled()[:, : len(ids)] * 10
        return Routing(p.softmax(-1), ids[None].expand(p.shape[0], -1))


def tiny_bank(backbone):
    from mtpeft import ModuleBank, make_scorer

    bank, scorer = ModuleBank(backbone), make_scorer(backbone)
    for i, t in enumerate(EXPERT_TASKS):
        bank.add(f"{t}-lora", "lora", {"r": 2}, task=t)
        perturb(bank, f"{t}-lora", std=0.5, seed=i)
    bank.add("multitask-lora", "lora", {"r": 2}, metadata={"tasks": EXPERT_TASKS})
    perturb(bank, "multitask-lora", std=0.5, seed=7)
    return bank, scorer


HELDOUT = [("h1", 1, ("red", "blue")), ("h2", 2, ("warm", "cold"))]


def heldout_tasks():
    return [synthetic_task(n, n=32, seed=s, labels=labels) for n, s, labels in HELDOUT]


# ---- the library function ------------------------------------------------------------------------
def test_route_eval_rows_oracle_and_routing_mass(tiny_backbone):
    """Both backbone families: one row per method, the oracle is the best single expert as evaluate() scores
    it, and the recorded routing mass per (task, expert) is a distribution over the experts at every site."""
    from mtpeft.train import evaluate
    from mtpeft.zeroshot import route_eval

    bank, scorer = tiny_bank(tiny_backbone)
    tasks = heldout_tasks()
    rep = route_eval(bank, scorer, tasks, ["_test_token", "_test_example", "arrow", "merge-uniform"], batch_size=8)
    assert [r["method"] for r in rep["rows"]] == ["zero-shot", "_test_token", "_test_example", "arrow",
                                                 "merge-uniform", "multitask", "oracle expert", "majority"]
    assert bank.names == [f"{t}-lora" for t in EXPERT_TASKS] + ["multitask-lora"]  # the merge was removed again
    assert rep["experts"] == [f"{t}-lora" for t in EXPERT_TASKS] and rep["multitask"] == "multitask-lora"
    json.dumps(rep)  # JSON-safe throughout
    rows = {r["method"]: r for r in rep["rows"]}
    for t in tasks:
        singles = {e: evaluate(bank, scorer, t, e)["accuracy"] for e in rep["experts"]}
        assert rows["oracle expert"]["accuracy"][t.name] == pytest.approx(max(singles.values()))
        assert singles[rows["oracle expert"]["modules"][t.name]] == max(singles.values())
        assert rows["zero-shot"]["accuracy"][t.name] == pytest.approx(evaluate(bank, scorer, t, None)["accuracy"])
        assert rows["multitask"]["accuracy"][t.name] == pytest.approx(
            evaluate(bank, scorer, t, "multitask-lora")["accuracy"])
    tok, ex = rep["routing"]["_test_token"], rep["routing"]["_test_example"]
    assert tok["granularity"] == "token" and ex["granularity"] == "example"
    assert set(tok["sites"]) == set(bank.module_sites("ta-lora"))
    assert len(tok["per_layer"]) == 2  # two layers, q and v pooled in each
    arrow = rep["routing"]["arrow"]
    for m in [*tok["per_site"].values(), *tok["per_layer"].values(), tok["overall"], ex["overall"],
              *arrow["per_site"].values()]:
        w = torch.tensor(m)
        assert w.shape == (2, 3)
        assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-5)
    # per example: each example counted once; per token: the real tokens only (padding excluded)
    assert ex["recorded"]["(per example)"] == [16.0, 16.0]  # the test splits
    real = [sum(len(scorer.tokenizer(t.format_input(s))["input_ids"]) for s in t.splits["test"]["text"])
            for t in tasks] if bank.family == "encoder" else None
    if real is not None:
        assert tok["recorded"][tok["sites"][0]] == [float(n) for n in real]


def test_recording_matches_a_hand_count():
    """The recorder's per-(task, module) sums equal a loop over tokens, padding left out, on a dense routing."""
    from mtpeft.routing import RouteContext
    from mtpeft.zeroshot import RecordingRouter

    class Fixed(Router):
        per_site = True

        def __init__(self, w, idx):
            super().__init__(None)
            self.w, self.idx = w, idx

        def check_bank(self, bank):
            pass

        def at_site(self, site, x, ctx):
            return Routing(self.w, self.idx)

    g = torch.Generator().manual_seed(0)
    w = torch.rand(3, 5, 2, generator=g)
    idx = torch.randint(0, 4, (3, 5, 2), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    rec = RecordingRouter(Fixed(w, idx), num_tasks=2)
    rec._num_modules = 4
    ctx = RouteContext(attention_mask=mask, task_ids=torch.tensor([1, 0, 1]), task_names=["a", "b"])
    x = torch.zeros(3, 5, 8)
    rec.at_site("s", x, ctx)
    rec.at_site("s", x, ctx)  # the same batch again (e.g. a causal scorer's label pass): not counted twice
    want = torch.zeros(2, 4)
    for b in range(3):
        for t in range(5):
            if mask[b, t]:
                for k in range(2):
                    want[ctx.task_ids[b], idx[b, t, k]] += w[b, t, k]
    assert torch.allclose(rec.mass["s"], want)
    assert rec.count["s"].tolist() == [3.0, 6.0]


# ---- the command ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bank_dir(tmp_path_factory):
    from mtpeft.backbone import load_backbone

    bank, _ = tiny_bank(load_backbone("tiny-bert", seed=0))
    path = tmp_path_factory.mktemp("route") / "bank"
    bank.save(path)
    return path


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("heldout")
    return [f"{n}={write_csv(d / f'{n}.csv', n, seed=s)}" for n, s, _ in HELDOUT]


def test_cli_route_json_and_out(capsys, bank_dir, task_files, tmp_path):
    out = tmp_path / "report"
    got = run_json(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--task-file", task_files[1],
                   "--routers", "_test_token,_test_example", "--top-k", "1", "--out", out)
    assert {"rows", "routing", "experts", "tasks", "multitask", "single_experts", "files"} <= set(got)
    assert [t["task"] for t in got["tasks"]] == ["h1", "h2"]
    oracle = next(r for r in got["rows"] if r["kind"] == "oracle")
    for t in ["h1", "h2"]:
        assert oracle["accuracy"][t] == max(a[t] for a in got["single_experts"].values())
        assert got["single_experts"][oracle["modules"][t]][t] == oracle["accuracy"][t]
    report = json.loads((out / "report.json").read_text())
    assert report["rows"] == got["rows"]
    for name in ("heatmap.png", "heatmap-_test_token.png", "heatmap-_test_example.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "oracle" in md and "`h1`" in md and "_test_token" in md
    for layer in report["routing"]["_test_token"]["per_layer"].values():
        assert torch.allclose(torch.tensor(layer).sum(1), torch.ones(2), atol=1e-5)
    # top-1: every recorded token went wholly to one expert, so the mass per site is a count
    for site, m in report["routing"]["_test_token"]["per_site"].items():
        n = torch.tensor(report["routing"]["_test_token"]["recorded"][site])
        counts = torch.tensor(m) * n[:, None]
        assert torch.allclose(counts, counts.round(), atol=1e-3)


def test_render_redraws_from_report_json_alone(capsys, bank_dir, task_files, tmp_path):
    from mtpeft.route_report import render

    out = tmp_path / "r"
    run_json(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--routers", "_test_token",
             "--out", out)
    moved = tmp_path / "elsewhere"
    moved.mkdir()
    (moved / "report.json").write_bytes((out / "report.json").read_bytes())
    paths = render(moved / "report.json")
    assert sorted(p.name for p in paths) == ["heatmap-_test_token.png", "heatmap.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in paths)


def test_cli_route_table(capsys, bank_dir, task_files):
    rc, out, _ = run(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--routers", "_test_example")
    assert rc == 0
    assert "oracle expert (oracle)" in out and "zero-shot" in out and "multitask" in out and "h1" in out


def test_cli_route_errors(capsys, bank_dir, task_files, tmp_path):
    msg = error_of(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--routers", "nope")
    assert "nope" in msg and "_test_token" in msg and "merge-ties" in msg
    msg = error_of(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--routers", "task_id")
    assert "task_id" in msg and "choose among" in msg
    msg = error_of(capsys, "route", "--bank", tmp_path / "nobank", "--task-file", task_files[0], "--routers", "_test_token")
    assert "not a bank" in msg and "mtpeft train" in msg
    msg = error_of(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--top-k", "0",
                   "--routers", "_test_token")
    assert "--top-k" in msg
    msg = error_of(capsys, "route", "--bank", bank_dir, "--routers", "_test_token")
    assert "--task" in msg


def test_cli_route_empty_bank(capsys, task_files, tmp_path):
    from mtpeft.backbone import load_backbone
    from mtpeft.bank import ModuleBank

    ModuleBank(load_backbone("tiny-bert", seed=0)).save(tmp_path / "empty")
    msg = error_of(capsys, "route", "--bank", tmp_path / "empty", "--task-file", task_files[0],
                   "--routers", "_test_token")
    assert "no experts" in msg and "mtpeft train" in msg


# ---- with the real routers -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gated_dir(tmp_path_factory, bank_dir):
    """The tiny bank with every expert gated (a few PHATGOOSE steps) and its retrieval centroid, by `mtpeft gate`."""
    import shutil

    from test_cli import run_quiet

    d = tmp_path_factory.mktemp("gated")
    path = shutil.copytree(bank_dir, d / "bank")
    for i, t in enumerate(EXPERT_TASKS):
        run_quiet("gate", "--bank", path, "--module", f"{t}-lora", "--task-file",
                  f"{t}={write_csv(d / f'{t}.csv', t, seed=10 + i)}", "--steps", 3)
    return path


def test_cli_route_every_default_router(capsys, gated_dir, task_files, tmp_path):
    """The default --routers on a gated bank: every router, both merges (built in memory, gone after), the
    multitask module, the oracle; routing recorded for the four routers, with their own sparsity."""
    got = run_json(capsys, "route", "--bank", gated_dir, "--task-file", task_files[0], "--task-file", task_files[1],
                   "--out", tmp_path / "r")
    assert [r["method"] for r in got["rows"]] == ["zero-shot", "phatgoose", "arrow", "retrieval", "average",
                                                 "merge-uniform", "merge-ties", "multitask", "oracle expert",
                                                 "majority"]
    assert set(got["routing"]) == {"phatgoose", "arrow", "retrieval", "average"}
    assert got["merges"]["merge-uniform"]["exact"] and got["merges"]["merge-ties"]["method"] == "ties"
    assert json.loads((gated_dir / "manifest.json").read_text())["modules"].__len__() == 4  # nothing saved
    pg, rt = got["routing"]["phatgoose"], got["routing"]["retrieval"]
    assert pg["granularity"] == "token" and rt["granularity"] == "example"
    for layer in pg["per_layer"].values():
        w = torch.tensor(layer)
        assert torch.allclose(w.sum(1), torch.ones(2), atol=1e-5)
        assert (w > 0).sum(1).max() <= 3
    r1 = torch.tensor(rt["overall"])  # top-1 per example: shares of the examples
    assert torch.allclose(r1.sum(1), torch.ones(2), atol=1e-5)
    assert torch.allclose(r1 * 16, (r1 * 16).round(), atol=1e-4)
    avg = torch.tensor(got["routing"]["average"]["overall"])
    assert torch.allclose(avg, torch.full((2, 3), 1 / 3), atol=1e-5)
    for name in ("heatmap.png", "heatmap-phatgoose.png", "heatmap-arrow.png", "heatmap-retrieval.png"):
        assert (tmp_path / "r" / name).read_bytes()[:4] == b"\x89PNG"


def test_cli_route_without_gates_names_mtpeft_gate(capsys, bank_dir, task_files):
    msg = error_of(capsys, "route", "--bank", bank_dir, "--task-file", task_files[0], "--routers", "phatgoose")
    assert "mtpeft gate" in msg and "ta-lora" in msg
