"""Fisher task embeddings (pi-Tuning): the diagonal Fisher information of a probe module's parameters on a task.

``F = mean over batches of (d loss / d theta)^2`` (the empirical Fisher at batch level: one gradient per batch of
the task's cross-entropy, squared elementwise), flattened in ``bank.module_parameters(name)`` order.

A task's embedding (``probe_fisher``) is taken on a *probe*: a module of the experts' configuration that starts
from one fixed initialisation for every task (the name ``PROBE`` and seed ``PROBE_SEED``), trained a few steps on
the task, then its Fisher. The fixed start is what makes embeddings comparable, as Task2Vec's fixed probe network
is and as pi-Tuning's reference gets from training every expert with one seed: the bank draws each module's
initialisation from its own seed, and two LoRA modules with different random ``A`` have Fisher vectors whose
coordinates do not correspond (``B``'s gradient runs through ``A``), so comparing each expert's own Fisher with a
target's rates every pair about alike. An expert's embedding is its task's probe Fisher, stored as the module
artifact ``task-fisher`` (saved with the bank, removed with the module): at fit time when asked
(``mtpeft train --fisher``), or for existing modules by ``mtpeft embed``.

Two tasks are similar when their embeddings are, compared as pi-Tuning's reference does (Task2Vec's symmetric
normalisation): per parameter tensor, each task's part scaled to mean 1, then both divided elementwise by their sum
(``a / (a + b)``, ``b / (a + b)``) and the cosine taken; averaged over tensors. The elementwise normalisation makes
every parameter count alike: a plain cosine of Fisher vectors is ruled by the few parameters whose Fisher is large
for every task.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MtpeftError
from ..routing import Routing

ARTIFACT = "task-fisher"  # (an older mtpeft stored each expert's own Fisher as "fisher": not comparable)
PROBE = "fisher-probe"  # the probe's name and seed: its initialisation, the same for every task
PROBE_SEED = 0
PROBE_STEPS, PROBE_LR, FISHER_BATCHES = 20, 2e-3, 32  # the defaults (mtpeft.adapt.Budget's)


def fisher_sizes(bank, name: str) -> list[int]:
    """The size of each parameter tensor of module ``name``, in embedding order."""
    return [p.numel() for p in bank.module_parameters(name).values()]


def fisher_embedding(bank, scorer, task, name: str, *, batch_size: int = 16, max_batches: int | None = 32,
                     seed: int = 0, split: str = "train") -> Tensor:
    """The diagonal Fisher ``[P]`` (float32, >= 0) of module ``name``'s parameters on ``task``'s ``split``: up to
    ``max_batches`` batches (None: all) of a seeded shuffle. The module's trainability is restored after."""
    if batch_size < 1:
        raise MtpeftError(f"batch_size must be a positive integer, got {batch_size!r}")
    params = bank.module_parameters(name)
    if not params:
        raise MtpeftError(f"module {name!r} has no parameters to take a Fisher embedding of")
    ds = task.splits[split]
    n = len(ds)
    if n == 0:
        raise MtpeftError(f"task {task.name!r} has no {split} examples for the Fisher embedding of {name!r}")
    order = np.random.default_rng(seed).permutation(n)
    if max_batches is not None:
        order = order[: max_batches * batch_size]
    sel = ds.select(order)
    texts, labels = sel["text"], torch.tensor(sel["label"], dtype=torch.long)
    trainable = any(p.requires_grad for p in params.values())
    mid = bank.index(name)
    was_training = bank.training
    acc = [torch.zeros_like(p, dtype=torch.float32) for p in params.values()]
    batches = 0
    bank.set_trainable(name, True)
    bank.eval()  # no dropout: the embedding is a function of the weights and the data
    try:
        for s in range(0, len(texts), batch_size):  # batches, each one batched forward and backward
            chunk = texts[s: s + batch_size]
            routing = Routing.one_hot([mid] * len(chunk)).to(bank.device)
            logits = scorer.logits(bank, chunk, task, routing)
            loss = F.cross_entropy(logits, labels[s: s + batch_size].to(logits.device))
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for a, g in zip(acc, grads):
                if g is not None:
                    a.add_(g.detach().float() ** 2)
            batches += 1
    finally:
        bank.set_trainable(name, trainable)
        bank.train(was_training)
    return torch.cat([(a / batches).reshape(-1).cpu() for a in acc])


def probe_fisher(bank, scorer, task, like: str, *, steps: int = PROBE_STEPS, lr: float = PROBE_LR,
                 batch_size: int = 16, max_batches: int | None = FISHER_BATCHES, seed: int = 0,
                 parallel=None) -> Tensor:
    """``task``'s Fisher embedding: a probe module of module ``like``'s type and configuration, from the fixed
    initialisation, trained ``steps`` optimiser steps (``lr``, ``batch_size``, data order from ``seed``) on the
    task's train split, then its diagonal Fisher over up to ``max_batches`` batches; the probe is removed after.
    ``parallel`` (``mtpeft.distributed.Parallel``): the probe's fit on several processes (every rank calls this).
    Only the probe trains; the bank's trainability is as it was."""
    from ..routers import TaskIdRouter
    from ..train import TrainConfig, fit_phase

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise MtpeftError(f"the probe's steps must be a positive integer, got {steps!r}")
    if PROBE in bank:
        raise MtpeftError(f"the bank holds a module named {PROBE!r}, the name the Fisher probe takes; rename or "
                          "remove it (`mtpeft bank rm BANK fisher-probe`)")
    rec = bank.record(like)
    trainable = {n: any(p.requires_grad for p in bank.module_parameters(n).values()) for n in bank.names}
    bank.freeze()
    bank.add(PROBE, rec.type, dict(rec.config), task=task.name, seed=PROBE_SEED, metadata={"adapt": "probe"})
    try:
        cfg = TrainConfig(lr=lr, batch_size=batch_size, max_epochs=100_000, max_steps=steps, patience=1000,
                          seed=seed, progress=False, val_check_interval=steps,
                          **({} if parallel is None else parallel.fields()))
        fit_phase(bank, scorer, [task], TaskIdRouter({task.name: PROBE}), cfg, name=PROBE)
        return fisher_embedding(bank, scorer, task, PROBE, batch_size=batch_size, max_batches=max_batches, seed=seed)
    finally:
        bank.remove(PROBE)
        for n, t in trainable.items():
            bank.set_trainable(n, t)


def store_fisher(bank, scorer, task, name: str, **kw) -> Tensor:
    """Compute ``task``'s probe Fisher embedding (``probe_fisher``, probe shaped like module ``name``) and store it as
    module ``name``'s ``task-fisher`` artifact."""
    emb = probe_fisher(bank, scorer, task, name, **kw)
    bank.set_artifact(name, ARTIFACT, emb)
    return emb


def has_fisher(bank, name: str) -> bool:
    return ARTIFACT in bank.artifacts(name)


def stored_fisher(bank, name: str) -> Tensor:
    """Module ``name``'s stored Fisher embedding, checked against its parameters."""
    if not has_fisher(bank, name):
        raise MtpeftError(f"module {name!r} has no Fisher embedding; compute it with `mtpeft embed --bank BANK` "
                          f"(with --task-file {bank.record(name).task or 'NAME'}=PATH for a task that is not built in)")
    emb = bank.artifact(name, ARTIFACT)
    want = sum(fisher_sizes(bank, name))
    if emb.dim() != 1 or emb.numel() != want or not bool(torch.isfinite(emb).all()) or bool((emb < 0).any()):
        raise MtpeftError(f"the Fisher embedding of {name!r} is not a vector of {want} finite non-negative numbers "
                          f"(shape {tuple(emb.shape)}); recompute it with `mtpeft embed --bank BANK --again`")
    return emb.float()


def similarity_matrix(embeddings: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Task similarity ``[n, n]`` of Fisher embeddings ``[n, P]``: per parameter tensor (``sizes`` splits ``P``;
    None: one part) each task's part scaled to mean 1, then for each pair ``(a, b)`` the cosine of ``a / (a + b)``
    and ``b / (a + b)`` (elementwise; entries where both are zero count as zero), averaged over the parts. Symmetric,
    in [0, 1], ones on the diagonal (a task is its own best match, even with an all-zero embedding)."""
    if embeddings.dim() != 2:
        raise MtpeftError(f"embeddings must be [tasks, P], got shape {tuple(embeddings.shape)}")
    x = embeddings.double()
    if bool((x < 0).any()) or not bool(torch.isfinite(x).all()):
        raise MtpeftError("Fisher embeddings are finite and non-negative; recompute them with "
                          "`mtpeft embed --bank BANK --again`")
    sizes = list(sizes) if sizes else [x.shape[1]]
    if sum(sizes) != x.shape[1]:
        raise MtpeftError(f"the parameter sizes sum to {sum(sizes)}, the embeddings have {x.shape[1]} entries; "
                          "compare embeddings of modules of one configuration")
    n = x.shape[0]
    S = torch.zeros(n, n, dtype=torch.float64)
    for part in x.split(sizes, dim=1):  # a loop over parameter tensors and task pairs, not in a forward
        part = part / part.mean(1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        for i in range(n):
            a = part[i][None]  # [1, p] against every task j >= i at once
            den = a + part[i:]
            safe = den.clamp_min(torch.finfo(torch.float64).tiny)
            S[i, i:] += F.cosine_similarity(torch.where(den > 0, a / safe, 0.0),
                                            torch.where(den > 0, part[i:] / safe, 0.0), dim=1, eps=1e-300)
    S = S / len(sizes)
    S = torch.triu(S) + torch.triu(S, 1).T
    S.fill_diagonal_(1.0)
    return S.float()


def plot_similarity(names: Sequence[str], S: Tensor, path: str | Path, title: str = "") -> Path:
    """A heatmap PNG of the similarity matrix, cells annotated (matplotlib Agg; written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes

    n = len(names)
    fig, ax = plt.subplots(figsize=(0.7 * n + 3.0, 0.6 * n + 2.2), layout="constrained")
    im = ax.imshow(S.numpy(), vmin=0.0, vmax=1.0, cmap="viridis")  # similarities lie in [0, 1]
    ax.set_xticks(range(n), list(names), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), list(names), fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(S[i, j]):.2f}", ha="center", va="center", fontsize=6,
                    color="black" if float(S[i, j]) > 0.6 else "white")
    fig.colorbar(im, ax=ax, shrink=0.8, label="Fisher similarity (Task2Vec-normalised cosine)")
    if title:
        ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)
