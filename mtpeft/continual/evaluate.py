"""One cell of the accuracy matrix: a task's test accuracy under a strategy's routing, scored over the label
space the scenario gives it, batched, without task ids unless the strategy is an oracle."""
from __future__ import annotations

import torch

from ..routing import RouteContext


@torch.no_grad()
def task_accuracy(bank, scorer, task, router, space=None, *, task_id: bool = False, batch_size: int = 64,
                  split: str = "test", pooled: dict | None = None) -> float:
    """Accuracy of ``task`` on ``split``. ``router`` None: the bare backbone. ``space`` None: the task's own
    labels; else the examples are scored over ``space`` (its global ids). ``task_id``: the router's context
    holds the task id (oracles); without it the router sees only the inputs. ``pooled``: a cache of the frozen
    backbone's pooled embedding of each batch (what ``ctx.pooled()`` gives a router), kept across calls, so a
    router that reads it (retrieval) costs no extra backbone pass when the task is evaluated again. A ``router``
    with ``predict_logits(bank, scorer, texts, task, space)`` gives the logits itself (over ``space``)."""
    ds = task.splits[split]
    texts = list(ds["text"])
    if not texts:
        return float("nan")
    labels = torch.as_tensor(ds["label"], dtype=torch.long)
    target = labels if space is None else space.to_global(task, labels)
    kw = {} if space is None else {"labels": space}
    bank.eval()
    correct = 0
    for s in range(0, len(texts), batch_size):
        chunk = texts[s: s + batch_size]
        if hasattr(router, "predict_logits"):  # a strategy's own predictor (conpet-dynamic: selected experts)
            logits = router.predict_logits(bank, scorer, chunk, task, space)
        elif router is None:
            with bank.bare():
                logits = scorer.logits(bank, chunk, task, **kw)
        else:
            key = (task.name, split, s, len(chunk))
            known = None if pooled is None else pooled.get(key)
            ctx = RouteContext.for_tasks([task.name] * len(chunk), texts=chunk, _pooled=known) if task_id \
                else RouteContext(texts=chunk, _pooled=known)
            logits = scorer.logits(bank, chunk, task, router, ctx=ctx, **kw)
            if pooled is not None and known is None and ctx._pooled is not None:
                pooled[key] = ctx._pooled
        correct += int((logits.argmax(-1).cpu() == target[s: s + len(chunk)]).sum())
    return correct / len(texts)


def row(bank, scorer, stream, step: int, router_of, *, task_id: bool = False, batch_size: int = 64,
        key_of=None, cache: dict | None = None, pooled: dict | None = None) -> list[float]:
    """The accuracies of every task of ``stream`` after step ``step`` (-1: untrained); ``router_of(task)``
    gives each task's router. With ``cache``, a cell whose ``key_of(task)`` (what it is evaluated with: the
    same modules, frozen) and label space were evaluated before is not evaluated again; the bare backbone's
    cells (router None) are keyed by the task and its label space alone."""
    out = []
    for t in stream.tasks:
        router, space = router_of(t), stream.eval_space(step, t)
        key = None
        if cache is not None:
            k = ("bare",) if router is None else (None if key_of is None else key_of(t))
            key = None if k is None else (k, t.name, None if space is None else space.key)
        if key is not None and key in cache:
            out.append(cache[key])
            continue
        acc = task_accuracy(bank, scorer, t, router, space, task_id=task_id, batch_size=batch_size, pooled=pooled)
        if key is not None:
            cache[key] = acc
        out.append(acc)
    return out
