"""The one LightningModule of every phase that trains (PhaseModule), its objectives, KeepBest, checkpoints of the
trainable parameters only, per-fit seeds and the CSV logs of a run directory; on tiny-bert and synthetic tasks."""
from __future__ import annotations

import csv
import hashlib

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import perturb, synthetic_task
from torch import nn

from mtpeft.backbone import load_backbone
from mtpeft.bank import ModuleBank
from mtpeft.io import MtpeftError
from mtpeft.lightning import (
    OBJECTIVES,
    CrossEntropy,
    KeepBest,
    Objective,
    PhaseModule,
    TaskDataModule,
    make_objective,
)
from mtpeft.routers import Router, TaskIdRouter
from mtpeft.routing import Routing
from mtpeft.scorer import make_scorer
from mtpeft.train import TrainConfig, fit_expert, fit_phase, fit_seed


class SoftRouter(Router):
    """Learned weights over named modules, the same for every example: the softmax of its logits."""

    def __init__(self, names):
        super().__init__(names)
        self.logits = nn.Parameter(torch.zeros(len(names)))

    def route(self, bank, ctx):
        B = ctx.batch_size
        w = self.logits.softmax(-1)
        return Routing(w[None].expand(B, -1), self.module_ids(bank.device)[None].expand(B, -1))


def frozen_pair(seed=0):
    """tiny-bert with two perturbed, frozen LoRA modules a and b, and its scorer."""
    bb = load_backbone("tiny-bert", seed=0)
    bank = ModuleBank(bb)
    for i, name in enumerate("ab"):
        bank.add(name, "lora", {"r": 4}, seed=seed + i)
        perturb(bank, name, std=0.5, seed=seed + i)
    bank.freeze()
    return bank, make_scorer(bb)


def quick(**kw):
    return TrainConfig(**{"lr": 5e-2, "batch_size": 16, "max_epochs": 2, "patience": 5, "progress": False, **kw})


def trainer(**kw):
    return L.Trainer(**{"logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                        "enable_model_summary": False, "accelerator": "cpu", "devices": 1,
                        "num_sanity_val_steps": 0, **kw})


class OnBackward(L.Callback):
    """Records, after each backward, which parameters got a gradient."""

    def __init__(self):
        self.router_grads, self.bank_grads = [], []

    def on_after_backward(self, trainer, pl_module):
        self.router_grads.append(pl_module.router.logits.grad.detach().clone())
        self.bank_grads.append(any(p.grad is not None for p in pl_module.bank.parameters()))


# ---- what trains ---------------------------------------------------------------------------------

def test_router_parameters_train_with_the_bank_frozen():
    bank, scorer = frozen_pair()
    bank_before = {k: v.clone() for k, v in bank.state_dict().items()}
    router = SoftRouter(["a", "b"])
    rec = OnBackward()
    m = fit_phase(bank, scorer, [synthetic_task()], router, quick(), name="soft", callbacks=[rec])
    assert m["steps"] == 6 and len(rec.router_grads) == 6
    assert all(g.abs().sum() > 0 for g in rec.router_grads)  # the router's logits got gradients at every step
    assert not any(rec.bank_grads)  # and nothing in the bank did
    assert router.logits.abs().max() > 1e-3  # the router moved off its init...
    after = bank.state_dict()
    assert all(torch.equal(bank_before[k], after[k]) for k in bank_before)  # ...the bank did not


def test_optimizer_groups_have_their_own_learning_rates():
    bank, scorer = frozen_pair()
    bank.add("c", "lora", {"r": 2}, seed=5)  # trainable
    router = SoftRouter(["a", "b", "c"])
    task = synthetic_task()
    module = PhaseModule(bank, scorer, [task], router, lr=1e-3, router_lr=5e-2)
    (bank_g, router_g) = module.configure_optimizers().param_groups
    assert (bank_g["name"], bank_g["lr"], router_g["name"], router_g["lr"]) == ("bank", 1e-3, "router", 5e-2)
    assert {id(p) for p in bank_g["params"]} == {id(p) for p in bank.module_parameters("c").values()}
    assert [id(p) for p in router_g["params"]] == [id(router.logits)]
    # router_lr defaults to lr; warmup scales both groups
    opt = PhaseModule(bank, scorer, [task], router, lr=2e-3, warmup_steps=4).configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-3 / 4, 2e-3 / 4])
    # an empty group is dropped: task-id routing has no parameters
    (only,) = PhaseModule(bank, scorer, [task], TaskIdRouter({task.name: "c"})).configure_optimizers().param_groups
    assert only["name"] == "bank"
    bank.freeze()
    (only,) = PhaseModule(bank, scorer, [task], router).configure_optimizers().param_groups
    assert only["name"] == "router"
    router.logits.requires_grad_(False)
    with pytest.raises(MtpeftError, match="nothing to train"):
        fit_phase(bank, scorer, [task], router, quick(), name="nothing")
    with pytest.raises(MtpeftError, match="router"):
        PhaseModule(bank, scorer, [task], {"toy": "c"})


# ---- KeepBest ------------------------------------------------------------------------------------

SCORES = [0.2, 0.9, 0.5, 0.1]  # validation peaks after the second epoch


class Scripted(PhaseModule):
    """Validation reports SCORES[epoch], whatever the parameters: the best epoch is known in advance."""

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        self.log("val/acc", torch.tensor(SCORES[self.current_epoch]), batch_size=len(batch["text"]))


class Snapshots(L.Callback):
    def __init__(self):
        self.at = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.at.append(pl_module.snapshot())


def test_keep_best_restores_bank_and_router_at_the_best_validation():
    bank, scorer = frozen_pair()
    bank.add("c", "lora", {"r": 2}, seed=5)
    router = SoftRouter(["a", "b", "c"])
    task = synthetic_task()
    module = Scripted(bank, scorer, [task], router, lr=2e-2)
    keep, snaps = KeepBest(), Snapshots()
    trainer(max_epochs=len(SCORES), callbacks=[snaps, keep]).fit(module, datamodule=TaskDataModule([task]))
    assert keep.best == pytest.approx(0.9) and keep.best_epoch == 1 and len(snaps.at) == 4
    keys = set(module.trainable_parameters())
    assert "router.logits" in keys and any(k.startswith("bank.") for k in keys) and set(keep.state) == keys
    now = module.snapshot()
    for k in keys:
        assert torch.equal(now[k], snaps.at[1][k]), k  # the parameters as they were at the best validation...
        assert not torch.equal(now[k], snaps.at[3][k]), k  # ...not the last ones (which training moved)


# ---- checkpoints -----------------------------------------------------------------------------------

def test_checkpoint_holds_only_trainable_tensors_and_round_trips(tmp_path):
    bank, scorer = frozen_pair()
    bank.add("c", "lora", {"r": 2}, seed=5)
    router = SoftRouter(["a", "b", "c"])
    task = synthetic_task()
    module = PhaseModule(bank, scorer, [task], router, lr=2e-2)
    tr = trainer(max_steps=2, limit_val_batches=0)
    tr.fit(module, datamodule=TaskDataModule([task]))
    path = tmp_path / "phase.ckpt"
    tr.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=False)
    sd = ckpt["state_dict"]
    trainable = module.trainable_parameters()
    assert set(sd) == set(trainable) == {"router.logits"} | {f"bank.{n}" for n, p in bank.named_parameters()
                                                            if p.requires_grad}
    backbone = {f"bank.model.{n}" for n, _ in bank.model.named_parameters()} - set(trainable)
    assert backbone and not backbone & set(sd)  # no frozen backbone (or frozen module) tensor
    assert sum(v.numel() for v in sd.values()) == router.logits.numel() + sum(
        p.numel() for p in bank.module_parameters("c").values())
    assert set(module.state_dict()) == set(sd)

    saved = {k: v.clone() for k, v in sd.items()}
    with torch.no_grad():
        for p in trainable.values():
            p.add_(1.0)
    assert not torch.equal(router.logits, saved["router.logits"])
    tr.validate(module, datamodule=TaskDataModule([task]), ckpt_path=path, verbose=False)  # Lightning's own loading
    assert all(torch.equal(p, saved[k]) for k, p in module.trainable_parameters().items())

    with pytest.raises(MtpeftError, match=r"missing \['router.logits'\]"):
        module.load_state_dict({k: v for k, v in saved.items() if k != "router.logits"})
    with pytest.raises(MtpeftError, match=r"unexpected \['bank.model.embeddings"):
        module.load_state_dict({**saved, "bank.model.embeddings.word_embeddings.weight": torch.zeros(1)})
    with pytest.raises(MtpeftError, match="shape"):
        module.load_state_dict({**saved, "router.logits": torch.zeros(5)})
    assert torch.equal(router.logits, saved["router.logits"])  # a refused load changed nothing


# ---- seeds ---------------------------------------------------------------------------------------

def test_fit_seed_is_a_stable_hash_of_the_run_seed_and_the_fit_name():
    assert fit_seed(0, "a") == fit_seed(0, "a") != fit_seed(0, "b")
    assert fit_seed(0, "a") != fit_seed(1, "a")
    # not Python's hash() (salted per process): the same number in every run
    assert fit_seed(0, "toy-lora") == int.from_bytes(hashlib.sha256(b"0\0toy-lora").digest()[:4], "little") & 0x7FFFFFFF
    assert fit_seed(0, "toy-lora") == 1363137397


class FirstBatch(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0 and trainer.current_epoch == 0:
            self.texts, self.dm_seed = list(batch["text"]), trainer.datamodule.seed
            self.torch_seed = torch.initial_seed()


def test_each_fit_gets_its_own_seed_for_the_data_order_and_the_rng():
    task = synthetic_task()
    seen = {}
    for name in ("one", "two", "one"):
        bank, scorer = frozen_pair()
        cb = FirstBatch()
        m = fit_phase(bank, scorer, [task], SoftRouter(["a", "b"]), quick(seed=3), name=name, callbacks=[cb])
        assert m["seed"] == cb.dm_seed == cb.torch_seed == fit_seed(3, name)
        seen.setdefault(name, []).append(cb.texts)
    assert seen["one"][0] == seen["one"][1]  # the same fit name: the same data order
    assert seen["one"][0] != seen["two"][0]  # another name: another order


def test_the_same_fit_twice_reproduces_the_same_weights():
    task = synthetic_task()
    runs = []
    for _ in range(2):
        bb = load_backbone("tiny-bert", seed=0)
        bank = ModuleBank(bb)
        m = fit_expert(bank, make_scorer(bb), task, "toy-lora", "lora", {"r": 4}, quick(seed=1))
        runs.append((m, {k: v.clone() for k, v in bank.module_parameters("toy-lora").items()}))
    (m1, w1), (m2, w2) = runs
    assert m1["seed"] == m2["seed"] == fit_seed(1, "toy-lora") and m1["steps"] == m2["steps"] == 6
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert any(v.abs().sum() > 0 for k, v in w1.items() if k.endswith("B"))  # trained: B moved off zero


# ---- run directory -------------------------------------------------------------------------------

def test_run_dir_writes_the_curves_of_each_fit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bb = load_backbone("tiny-bert", seed=0)
    bank, scorer = ModuleBank(bb), make_scorer(bb)
    run = tmp_path / "run"
    m = fit_expert(bank, scorer, synthetic_task(), "toy-lora", "lora", {"r": 4}, quick(max_epochs=3, run_dir=str(run)))
    with open(run / "toy-lora" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {"epoch", "step", "train/loss", "train/acc", "val/acc", "val/loss"} <= set(rows[0])
    train = [r for r in rows if r["train/loss"]]
    val = [r for r in rows if r["val/acc"]]
    assert len(train) == m["steps"] == 9  # one row a step
    assert [int(r["epoch"]) for r in val] == [0, 1, 2]  # one row per validation
    assert max(float(r["val/acc"]) for r in val) == pytest.approx(m["best_val_acc"])
    assert "lr: 0.05" in (run / "toy-lora" / "hparams.yaml").read_text()
    # without run_dir nothing is written anywhere
    fit_expert(bank, scorer, synthetic_task("other"), "other-lora", "lora", {"r": 4}, quick(max_epochs=1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert sorted(p.name for p in run.iterdir()) == ["toy-lora"]


# ---- objectives ----------------------------------------------------------------------------------

class AlwaysFirst(Objective):
    """Cross-entropy toward label 0 whatever the true label: a loss nothing else would optimise."""

    name = "always_first"

    def __call__(self, module, batch, logits):
        margin = (logits[:, 0] - logits[:, 1]).mean().detach()
        return F.cross_entropy(logits, torch.zeros_like(batch["target"])), {"margin": margin}


def _margins(bank, scorer, task, router):
    """Mean logit of label 0 over label 1 on the training texts, and the share predicted 0."""
    texts = list(task.splits["train"]["text"])
    with torch.no_grad():
        logits = PhaseModule(bank, scorer, [task], router)(texts, torch.zeros(len(texts), dtype=torch.long))
    return (logits[:, 0] - logits[:, 1]).mean().item(), (logits.argmax(-1) == 0).float().mean().item()


def test_a_custom_objective_is_the_loss_that_is_optimised(tmp_path):
    task = synthetic_task()  # balanced labels: cross-entropy has no reason to favour label 0
    got = {}
    for name, objective in (("ce", None), ("first", AlwaysFirst())):
        bb = load_backbone("tiny-bert", seed=0)
        bank, scorer = ModuleBank(bb), make_scorer(bb)
        bank.add("m", "lora", {"r": 4}, task=task.name)
        router = TaskIdRouter({task.name: "m"})
        before = _margins(bank, scorer, task, router)
        fit_phase(bank, scorer, [task], router, quick(max_epochs=3, run_dir=str(tmp_path)), objective=objective,
                  name=name)
        got[name] = (before, _margins(bank, scorer, task, router))
    (start, _), (ce, _) = got["ce"]
    (start2, _), (first, share) = got["first"]
    assert start == pytest.approx(start2) and abs(start) < 1  # the same start, no preference yet
    assert share == 1.0 and first > start + 2  # the custom objective made label 0 win everywhere...
    assert first > ce + 2  # ...which cross-entropy on balanced labels does not do
    with open(tmp_path / "first" / "metrics.csv", newline="") as f:
        logged = [float(r["train/margin"]) for r in csv.DictReader(f) if r.get("train/margin")]
    assert len(logged) == 9 and logged[-1] > logged[0]  # its extra logs land beside the loss


class HiddenNorm(Objective):
    """Cross-entropy plus the squared norm of the student's hidden states, captured around the forward."""

    name = "hidden_norm"

    def __init__(self):
        self.seen = []

    def capture(self, module, batch):
        import contextlib

        @contextlib.contextmanager
        def scope():
            def hook(bank, args, out):
                if not bank.state.bare:  # the label embeddings run bare: not the student's forward
                    self._hidden = out.output
            handle = module.bank.register_forward_hook(hook)
            try:
                yield
            finally:
                handle.remove()

        return scope()

    def __call__(self, module, batch, logits):
        h = self._hidden
        self.seen.append((tuple(h.shape), h.requires_grad, module.training))
        ce, _ = CrossEntropy()(module, batch, logits)
        return ce + h.pow(2).mean(), {"hidden": h.pow(2).mean().detach()}


def test_an_objective_can_capture_the_students_hidden_states():
    bank, scorer = frozen_pair()
    task = synthetic_task()
    obj = HiddenNorm()
    fit_phase(bank, scorer, [task], SoftRouter(["a", "b"]), quick(max_epochs=1), objective=obj, name="hidden")
    train = [s for s in obj.seen if s[2]]
    assert len(train) == 3 and all(s[1] for s in train)  # three steps, each with a differentiable capture
    assert {s[0][0] for s in obj.seen} == {16} and {s[0][2] for s in obj.seen} == {32}  # [B, T, H] of the batch
    assert len(bank._forward_hooks) == 0  # the hook is gone after each step


def test_cross_entropy_label_smoothing_ignores_the_padded_slots():
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, generator=g), torch.tensor([0, 2, 1, 1])
    ce = CrossEntropy(label_smoothing=0.1)
    got, _ = ce(None, {"target": target}, logits)
    torch.testing.assert_close(got, F.cross_entropy(logits, target, label_smoothing=0.1))
    padded = logits.clone()
    padded[:2, 2] = float("-inf")  # two examples of a two-label task
    target = torch.tensor([0, 1, 1, 1])
    got, _ = ce(None, {"target": target}, padded)
    assert torch.isfinite(got) and not torch.isfinite(F.cross_entropy(padded, target, label_smoothing=0.1))
    want = torch.stack([F.cross_entropy(padded[i:i + 1, :2] if i < 2 else padded[i:i + 1], target[i:i + 1],
                                        label_smoothing=0.1) for i in range(4)]).mean()
    torch.testing.assert_close(got, want)
    with pytest.raises(MtpeftError, match="label_smoothing"):
        CrossEntropy(label_smoothing=1.0)


def test_objectives_by_name_instance_or_function():
    assert OBJECTIVES.get("cross_entropy") is CrossEntropy and "cross_entropy" in OBJECTIVES.names()
    assert isinstance(make_objective(None), CrossEntropy) and isinstance(make_objective("cross_entropy"), CrossEntropy)
    obj = AlwaysFirst()
    assert make_objective(obj) is obj
    fn = make_objective(lambda module, batch, logits: logits.sum())
    loss, logs = fn(None, {}, torch.ones(2, 2))
    assert loss.item() == 4.0 and logs == {}
    with pytest.raises(MtpeftError, match="unknown objective 'nope'.*cross_entropy"):
        make_objective("nope")
    with pytest.raises(MtpeftError, match="an objective is"):
        make_objective(3)


# ---- failures, label spaces ----------------------------------------------------------------------

class FailAt(Objective):
    def __init__(self, step):
        self.step, self.calls = step, 0

    def __call__(self, module, batch, logits):
        self.calls += 1
        if self.calls == self.step:
            raise RuntimeError("boom")
        return CrossEntropy()(module, batch, logits)


def test_a_failed_fit_puts_back_what_trains():
    bank, scorer = frozen_pair()
    router = SoftRouter(["a", "b"])
    with torch.no_grad():
        router.logits.copy_(torch.tensor([0.3, -0.2]))
    with pytest.raises(RuntimeError, match="boom"):
        fit_phase(bank, scorer, [synthetic_task()], router, quick(), objective=FailAt(3), name="fails")
    assert torch.equal(router.logits.detach(), torch.tensor([0.3, -0.2]))  # two steps had moved them


def test_a_failed_expert_fit_leaves_the_bank_as_it_was(monkeypatch):
    from mtpeft import train

    bank, scorer = frozen_pair()
    monkeypatch.setattr(train, "fit_phase", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        fit_expert(bank, scorer, synthetic_task(), "new", "lora", {"r": 4}, quick())
    assert bank.names == ["a", "b"]


def test_a_phase_over_a_label_space_scores_and_targets_global_ids():
    from mtpeft.scoring import LabelSpace

    bank, scorer = frozen_pair()
    t1 = synthetic_task("one", labels=("red", "blue"))
    t2 = synthetic_task("two", labels=("blue", "green"))
    space = LabelSpace.union([t1, t2])
    module = PhaseModule(bank, scorer, [t1, t2], SoftRouter(["a", "b"]), labels=space)
    batch = {"text": ["a sky", "ruby", "the ocean"], "label": torch.tensor([1, 0, 1]), "task": torch.tensor([0, 1, 1])}
    assert module.targets(batch).tolist() == [space.id_of("blue"), space.id_of("blue"), space.id_of("green")]
    with torch.no_grad():
        logits = module(batch["text"], batch["task"])
    assert logits.shape == (3, len(space)) == (3, 3)
    loss, _ = module.objective(module, {**batch, "target": module.targets(batch)}, logits)
    assert torch.isfinite(loss)
