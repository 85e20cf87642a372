"""Fisher task embeddings (pi-Tuning): the diagonal Fisher information of a module's parameters on its task.

``F = mean over batches of (d loss / d theta)^2`` (the empirical Fisher at batch level: one gradient per batch of
the task's cross-entropy, squared elementwise), flattened in ``bank.module_parameters(name)`` order. Stored as the
module artifact ``fisher`` (saved with the bank, removed with the module): at fit time when asked, or for existing
modules by ``mtpeft embed``. Two tasks are similar when their Fisher embeddings are: the cosine of each parameter
tensor's part (each part normalised on its own, so large tensors do not drown small ones), averaged over tensors.
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

ARTIFACT = "fisher"


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


def store_fisher(bank, scorer, task, name: str, **kw) -> Tensor:
    """Compute module ``name``'s Fisher embedding on ``task`` and store it as its ``fisher`` artifact."""
    emb = fisher_embedding(bank, scorer, task, name, **kw)
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
    None: one part) the cosine of the L2-normalised parts, averaged over the parts. Symmetric, ones on the diagonal
    (a task is its own best match, even with an all-zero embedding)."""
    if embeddings.dim() != 2:
        raise MtpeftError(f"embeddings must be [tasks, P], got shape {tuple(embeddings.shape)}")
    x = embeddings.double()
    sizes = list(sizes) if sizes else [x.shape[1]]
    if sum(sizes) != x.shape[1]:
        raise MtpeftError(f"the parameter sizes sum to {sum(sizes)}, the embeddings have {x.shape[1]} entries; "
                          "compare embeddings of modules of one configuration")
    parts = [F.normalize(c, dim=1) for c in x.split(sizes, dim=1)]
    S = sum(p @ p.T for p in parts) / len(parts)
    S = (S + S.T) / 2
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
    im = ax.imshow(S.numpy(), vmin=-1.0, vmax=1.0, cmap="RdBu_r")
    ax.set_xticks(range(n), list(names), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(n), list(names), fontsize=7)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{float(S[i, j]):.2f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, shrink=0.8, label="Fisher cosine similarity")
    if title:
        ax.set_title(title, fontsize=9)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())
    return Path(path)
