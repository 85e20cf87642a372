"""One cell of the accuracy matrix: a task's test accuracy under a strategy's routing, scored over the label
space the scenario gives it, batched, without task ids unless the strategy is an oracle."""
from __future__ import annotations

import torch

from ..routing import RouteContext


@torch.no_grad()
def task_counts(bank, scorer, task, router, space=None, *, task_id: bool = False, batch_size: int = 64,
                split: str = "test", pooled: dict | None = None, shard: tuple[int, int] | None = None
                ) -> tuple[int, int]:
    """``(correct, scored)`` of ``task`` on ``split`` (see ``task_accuracy``) on this process alone: with
    ``shard=(rank, world)`` only the examples rank, rank + world, ... (its share of a sharded evaluation)."""
    ds = task.splits[split]
    texts = list(ds["text"])
    labels = torch.as_tensor(ds["label"], dtype=torch.long)
    if shard is not None:
        texts, labels = texts[shard[0]::shard[1]], labels[shard[0]::shard[1]]
    if not texts:
        return 0, 0
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
            key = (task.name, split, shard, s, len(chunk))
            known = None if pooled is None else pooled.get(key)
            ctx = RouteContext.for_tasks([task.name] * len(chunk), texts=chunk, _pooled=known) if task_id \
                else RouteContext(texts=chunk, _pooled=known)
            logits = scorer.logits(bank, chunk, task, router, ctx=ctx, **kw)
            if pooled is not None and known is None and ctx._pooled is not None:
                pooled[key] = ctx._pooled
        correct += int((logits.argmax(-1).cpu() == target[s: s + len(chunk)]).sum())
    return correct, len(texts)


def task_accuracy(bank, scorer, task, router, space=None, *, task_id: bool = False, batch_size: int = 64,
                  split: str = "test", pooled: dict | None = None, shard: tuple[int, int] | None = None) -> float:
    """Accuracy of ``task`` on ``split``. ``router`` None: the bare backbone. ``space`` None: the task's own
    labels; else the examples are scored over ``space`` (its global ids). ``task_id``: the router's context
    holds the task id (oracles); without it the router sees only the inputs. ``pooled``: a cache of the frozen
    backbone's pooled embedding of each batch (what ``ctx.pooled()`` gives a router), kept across calls, so a
    router that reads it (retrieval) costs no extra backbone pass when the task is evaluated again. A ``router``
    with ``predict_logits(bank, scorer, texts, task, space)`` gives the logits itself (over ``space``).
    ``shard=(rank, world)``: a collective: each rank scores its share and the counts are summed over the
    process group, so every rank returns the whole split's accuracy."""
    correct, n = task_counts(bank, scorer, task, router, space, task_id=task_id, batch_size=batch_size,
                             split=split, pooled=pooled, shard=shard)
    if shard is not None:
        from ..distributed import all_sum

        correct, n = all_sum([correct, n])
    return correct / n if n else float("nan")


def row(bank, scorer, stream, step: int, router_of, *, task_id: bool = False, batch_size: int = 64,
        key_of=None, cache: dict | None = None, pooled: dict | None = None, shard: tuple[int, int] | None = None,
        scored: dict | None = None) -> list[float]:
    """The accuracies of every task of ``stream`` after step ``step`` (-1: untrained); ``router_of(task)``
    gives each task's router. With ``cache``, a cell whose ``key_of(task)`` (what it is evaluated with: the
    same modules, frozen) and label space were evaluated before is not evaluated again; the bare backbone's
    cells (router None) are keyed by the task and its label space alone. ``shard=(rank, world)``: a
    collective (every rank calls it with the same cache): each rank scores its share of every cell left to
    evaluate, and one sum over the process group gives every rank the whole row. ``scored["examples"]`` is
    increased by the examples this process scored."""
    out: list[float | None] = []
    todo: list[tuple[int, tuple | None]] = []  # (position, cache key) of the cells to evaluate
    counts: list[int] = []
    for t in stream.tasks:
        router, space = router_of(t), stream.eval_space(step, t)
        key = None
        if cache is not None:
            k = ("bare",) if router is None else (None if key_of is None else key_of(t))
            key = None if k is None else (k, t.name, None if space is None else space.key)
        if key is not None and key in cache:
            out.append(cache[key])
            continue
        counts += task_counts(bank, scorer, t, router, space, task_id=task_id, batch_size=batch_size,
                              pooled=pooled, shard=shard)
        if scored is not None:
            scored["examples"] = scored.get("examples", 0) + counts[-1]
        todo.append((len(out), key))
        out.append(None)
    if shard is not None and todo:
        from ..distributed import all_sum

        counts = all_sum(counts)
    for i, (pos, key) in enumerate(todo):
        correct, n = counts[2 * i], counts[2 * i + 1]
        out[pos] = correct / n if n else float("nan")
        if key is not None:
            cache[key] = out[pos]
    return out
