"""Zero-shot routing across a library of experts: evaluate tasks no expert was trained on, without their labels.

``route_eval(bank, scorer, tasks, routers=...)`` scores every held-out task with the bare backbone, each
zero-shot router (built with ``Router.from_bank``, see mtpeft/routers/), merges of the experts built in memory
(``mtpeft.merge.merge_modules``, removed again after), the bank's multitask module where it holds one, and
every single expert. The labels only score the predictions: the oracle (the best single expert per task) is
the one entry that reads them to choose, and it is marked so. Routers get a ``RouteContext`` with the texts
only, never the task. While a router routes, a ``RecordingRouter`` around it sums its weights per (task,
module) at each site over the real tokens, for the heatmaps (``mtpeft.route_report``).
"""
from __future__ import annotations

import re
import time
from collections.abc import Sequence

import torch
from torch import Tensor

from .errors import MtpeftError
from .routers.base import ROUTERS, Router
from .routing import RouteContext, Routing

MERGES = {"merge-uniform": "uniform", "merge-ties": "ties"}
DEFAULT_ROUTERS = ("phatgoose", "arrow", "retrieval", "average", "merge-uniform", "merge-ties")
EXAMPLE_SITE = "(per example)"  # the one pseudo-site of a router that routes per example


class RecordingRouter(Router):
    """A thin wrapper that delegates to ``inner`` and accumulates, per site, the sum of the routing weights per
    (task of the example, module of the bank) over real tokens (per example for per-example routers).

    Only the first call at each site per ``RouteContext`` is recorded: that is the forward over the inputs
    (a causal scorer's later forwards over label tokens, under the same context, are routed but not recorded).
    Set ``task`` to the index of the task the next batches belong to (or give ``ctx.task_ids``)."""

    def __init__(self, inner: Router, num_tasks: int):
        super().__init__(None)
        self.inner = inner
        self.per_site = inner.per_site  # the bank asks the instance
        self.num_tasks = num_tasks
        self.task = 0
        self.mass: dict[str, Tensor] = {}  # site -> [num_tasks, E] summed weights
        self.count: dict[str, Tensor] = {}  # site -> [num_tasks] tokens (or examples) recorded
        self._ctx: RouteContext | None = None
        self._seen: set[str] = set()
        self._num_modules = 0

    def check_bank(self, bank) -> None:
        self.inner.check_bank(bank)
        self._num_modules = len(bank)

    def route(self, bank, ctx: RouteContext) -> Routing | None:
        r = self.inner.route(bank, ctx)
        self._record(EXAMPLE_SITE, r, None, ctx)
        return r

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        r = self.inner.at_site(site, x, ctx)
        self._record(site, r, x, ctx)
        return r

    @torch.no_grad()
    def _record(self, site: str, r: Routing | None, x: Tensor | None, ctx: RouteContext | None) -> None:
        if ctx is not None and ctx.continuation:  # the label tokens after the prompts: the batch was recorded
            return
        if ctx is not self._ctx:  # a new batch
            self._ctx, self._seen = ctx, set()
        if r is None or site in self._seen or not isinstance(r, Routing):
            return
        self._seen.add(site)
        r = r.per_example()  # factored (per-task, per-split) routing: one row per example
        w = r.weights.detach().float()
        B, E = w.shape[0], self._num_modules
        if r.per_token:
            m = ctx.token_mask(x) if ctx is not None and x is not None else None
            m = torch.ones(w.shape[:2], device=w.device) if m is None else m.to(w.device, torch.float32)
            w = w * m[..., None]
            n = m.sum(1)  # [B] real tokens
        else:
            n = torch.ones(B, device=w.device)
        if r.indices is None:  # dense over the bank
            per_ex = w.reshape(B, -1, E).sum(1)
        else:
            per_ex = torch.zeros(B, E, device=w.device).scatter_add_(1, r.indices.reshape(B, -1).long(),
                                                                      w.reshape(B, -1))
        tasks = ctx.task_ids if ctx is not None and ctx.task_ids is not None else torch.full((B,), self.task)
        tasks = tasks.to(w.device)
        if site not in self.mass:
            self.mass[site] = torch.zeros(self.num_tasks, E)
            self.count[site] = torch.zeros(self.num_tasks)
        self.mass[site].index_add_(0, tasks.cpu(), per_ex.cpu())
        self.count[site].index_add_(0, tasks.cpu(), n.cpu())

    def summary(self, module_ids: Sequence[int]) -> dict:
        """Mean weight per (task, module of ``module_ids``) at each site and summed per layer and overall:
        JSON-safe lists ``[num_tasks][len(module_ids)]``."""
        ids = torch.as_tensor(list(module_ids), dtype=torch.long)
        sites = list(self.mass)
        mean = lambda m, c: (m[:, ids] / c.clamp_min(1e-12)[:, None]).tolist()
        layers: dict[str, list[str]] = {}
        for s in sites:
            layers.setdefault(layer_of(s), []).append(s)
        per_layer = {k: mean(sum(self.mass[s] for s in v), sum(self.count[s] for s in v)) for k, v in layers.items()}
        overall = mean(sum(self.mass.values()), sum(self.count.values())) if sites else []
        return {"granularity": "token" if self.per_site else "example", "sites": sites,
                "per_site": {s: mean(self.mass[s], self.count[s]) for s in sites},
                "per_layer": per_layer, "overall": overall,
                "recorded": {s: self.count[s].tolist() for s in sites}}


def layer_of(site: str) -> str:
    """The layer a site belongs to: the first number in its name (``encoder.layer.3.attention...`` -> ``3``)."""
    m = re.search(r"\.(\d+)\.", f".{site}.")
    return m.group(1) if m else site


def expert_modules(bank) -> list[str]:
    """The bank's single-task experts: modules trained on one task, not merged into the weights."""
    return [r.name for r in bank.records if r.task and not r.merged]


def multitask_module(bank, experts: Sequence[str]) -> str | None:
    """The (last added) module trained on the union of the experts' tasks (metadata ``tasks``), if any."""
    want = {bank.record(n).task for n in experts}
    for r in reversed(bank.records):
        if want and set((r.metadata or {}).get("tasks") or []) >= want:
            return r.name
    return None


def check_routers(names: Sequence[str]) -> list[str]:
    names = [n.strip() for n in names if n.strip()]
    known = sorted(set(ROUTERS.names()) - {"task_id", "fixed"}) + sorted(MERGES)
    bad = [n for n in names if n not in MERGES and n not in ROUTERS.names()]
    if bad or any(n in ("task_id", "fixed") for n in names):
        raise MtpeftError(f"unknown zero-shot router(s) {bad or names}; choose among {', '.join(known)} "
                          "(comma-separated, e.g. --routers phatgoose,arrow)")
    if len(set(names)) != len(names):
        raise MtpeftError(f"a router is named twice in {names}; name each once")
    return names


def build_router(bank, name: str, experts: list[str], top_k: int | None) -> Router:
    cls = ROUTERS.get(name)
    if not hasattr(cls, "from_bank"):
        raise MtpeftError(f"router {name!r} cannot be built from a bank (it has no from_bank); choose a "
                          "zero-shot router")
    return cls.from_bank(bank, modules=experts, top_k=top_k)


@torch.no_grad()
def _predict(bank, scorer, task, how, split: str, batch_size: int, recorder: RecordingRouter | None = None) -> float:
    """Accuracy on ``split`` with ``how``: None (the bare backbone), a Routing maker ``n -> Routing`` or a router.
    A router sees a context with the texts only (no task)."""
    ds = task.splits[split]
    texts, labels = ds["text"], torch.tensor(ds["label"])
    if not len(texts):
        return 0.0
    bank.eval()
    preds = []
    for s in range(0, len(texts), batch_size):
        chunk = list(texts[s: s + batch_size])
        if how is None:
            with bank.bare():
                logits = scorer.logits(bank, chunk, task)
        elif isinstance(how, Router):
            logits = scorer.logits(bank, chunk, task, recorder or how, ctx=RouteContext(texts=chunk))
        else:
            logits = scorer.logits(bank, chunk, task, how(len(chunk)).to(bank.device))
        preds.append(logits.argmax(-1).cpu())
    return int((torch.cat(preds) == labels).sum()) / len(texts)  # from integer counts (no float32 noise)


def _one_hot(bank, name: str):
    mid = bank.index(name)
    return lambda n: Routing.one_hot([mid] * n)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Tensor):
        return obj.tolist() if obj.numel() <= 64 else f"tensor{tuple(obj.shape)}"
    if isinstance(obj, (float, int, str, bool)) or obj is None:
        return obj
    return str(obj)


def route_eval(bank, scorer, tasks: Sequence, routers: Sequence[str] = DEFAULT_ROUTERS, *, top_k: int | None = None,
               experts: Sequence[str] | None = None, seed: int = 0, split: str = "test", batch_size: int = 64,
               record: bool = True, log=None) -> dict:
    """Accuracy of every way to answer ``tasks`` from the bank's experts, without the tasks' labels.

    Rows (``kind``): ``zero-shot`` (the bare backbone), one per router (``router``: a registered zero-shot
    router; ``merge``: ``merge-uniform`` / ``merge-ties``, the experts' ``Delta W`` merged into one module built
    in memory and removed again), ``multitask`` (the bank's module trained on the union of the experts' tasks,
    when it holds one), ``oracle`` (the best single expert per task, chosen WITH the labels) and ``majority``.
    ``routing``: per router, the mean routing weight per (task, expert) per site, per layer and overall.
    Everything in the returned dict is JSON-safe."""
    t0 = time.perf_counter()
    say = log or (lambda msg: None)
    routers = check_routers(routers)
    tasks = list(tasks)
    if not tasks:
        raise MtpeftError("name at least one task to evaluate (--task NAME or --task-file NAME=PATH)")
    experts = list(experts) if experts is not None else expert_modules(bank)
    if not experts:
        raise MtpeftError(f"the bank holds no experts to route over (modules: {', '.join(bank.names) or 'none'}); "
                          "train some first: `mtpeft train --module lora --task T --out BANK`")
    built = {n: build_router(bank, n, experts, top_k) for n in routers if n not in MERGES}  # fail before any work
    merge_modules = _merge_fn() if any(n in MERGES for n in routers) else None  # fail early, too
    seen = {bank.record(n).task for n in experts}
    multitask = multitask_module(bank, experts)
    names = [t.name for t in tasks]
    rows, routing, merges = [], {}, {}

    def row(method, kind, accs, **extra):
        rows.append({"method": method, "kind": kind, "accuracy": dict(zip(names, accs)),
                     "mean": sum(accs) / len(accs), **extra})
        say(f"{method}: " + ", ".join(f"{n} {a:.3f}" for n, a in zip(names, accs)))

    row("zero-shot", "baseline", [_predict(bank, scorer, t, None, split, batch_size) for t in tasks])
    for name in routers:
        if name in MERGES:
            tmp = _fresh_name(bank, f"_route_{name}")
            merges[name] = _jsonable(merge_modules(bank, experts, tmp, method=MERGES[name], seed=seed))
            try:
                row(name, "merge", [_predict(bank, scorer, t, _one_hot(bank, tmp), split, batch_size) for t in tasks])
            finally:
                bank.remove(tmp)
            continue
        router = built[name]
        rec = RecordingRouter(router, len(tasks)) if record else None
        accs = []
        for i, t in enumerate(tasks):
            if rec is not None:
                rec.task = i
            accs.append(_predict(bank, scorer, t, router, split, batch_size, rec))
        if rec is not None:
            routing[name] = rec.summary(bank.ids(experts).tolist())
        row(name, "router", accs, top_k=getattr(router, "top_k", None))
    single = {e: [_predict(bank, scorer, t, _one_hot(bank, e), split, batch_size) for t in tasks] for e in experts}
    if multitask is not None:
        row("multitask", "multitask", [_predict(bank, scorer, t, _one_hot(bank, multitask), split, batch_size)
                                       for t in tasks], module=multitask)
    best = {n: max(experts, key=lambda e, i=i: single[e][i]) for i, n in enumerate(names)}
    row("oracle expert", "oracle", [single[best[n]][i] for i, n in enumerate(names)], modules=best)
    row("majority", "baseline", [t.majority_baseline(split) for t in tasks])
    return {"backbone": getattr(bank.backbone, "name", None), "split": split, "seed": seed, "top_k": top_k,
            "experts": experts, "expert_tasks": [bank.record(e).task for e in experts], "multitask": multitask,
            "tasks": [{"task": t.name, "n": len(t.splits[split]), "labels": t.num_labels,
                       "seen_by_an_expert": t.name in seen} for t in tasks],
            "rows": rows, "single_experts": {e: dict(zip(names, a)) for e, a in single.items()},
            "routing": routing, "merges": merges, "seconds": round(time.perf_counter() - t0, 1)}


def _fresh_name(bank, base: str) -> str:
    name, i = base, 0
    while name in bank.names:
        i += 1
        name = f"{base}{i}"
    return name


def _merge_fn():
    try:
        from .merge import merge_modules
    except ImportError as e:
        raise MtpeftError(f"merging is not available in this install ({e}); drop merge-uniform and merge-ties "
                          "from --routers") from e
    return merge_modules
