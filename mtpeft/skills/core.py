"""Skills shared across tasks: build and train a Poly/MHR skill inventory, keep its routing with the bank,
adapt to a new task (MHR-z: a new routing row; MHR-mu: the average of the skills as one plain module).

A skill inventory named ``NAME`` is ``S`` modules ``NAME-0 .. NAME-{S-1}`` of one type and config (one group
of the bank, so their weights are stacked) plus a ``PolyRouter`` holding the routing logits. The bank saves
the skills like any module; ``save_skills`` writes the router beside them, in ``BANK/routers/NAME/``
(``router.json`` + ``router.safetensors``), and a heatmap of the task-skill weights, ``BANK/NAME-routing.png``.
"""
from __future__ import annotations

import io
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from ..io import MtpeftError
from ..routers.poly import PolyRouter

ROUTERS_DIR = "routers"
ROUTER_KINDS = ("poly", "mhr")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")


def skill_names(name: str, n_skills: int) -> list[str]:
    return [f"{name}-{i}" for i in range(n_skills)]


def check_kind(kind: str, n_splits: int | None) -> int:
    """The number of splits for router ``kind`` ('poly': 1; 'mhr': > 1, default 4)."""
    if kind not in ROUTER_KINDS:
        raise MtpeftError(f"skills router must be one of {ROUTER_KINDS}, got {kind!r}")
    if kind == "poly":
        if n_splits not in (None, 1):
            raise MtpeftError("Poly routes each layer as a whole (1 split); for several splits use --router mhr")
        return 1
    n = 4 if n_splits is None else n_splits
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise MtpeftError(f"MHR needs --splits of at least 2 (1 split is Poly), got {n_splits!r}")
    return n


def add_skills(bank, name: str, n_skills: int, tasks: Sequence[str], module_type: str = "lora", config=None, *,
               n_splits: int = 1, shared_routing: bool = False, seed: int = 0) -> PolyRouter:
    """Add ``n_skills`` trainable skill modules to ``bank`` (every other module frozen) and return their router
    over ``tasks`` (logits per site, or one matrix for every site with ``shared_routing``)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise MtpeftError(f"skills name {name!r}: use letters, digits and _ . - (e.g. 'skills')")
    if isinstance(n_skills, bool) or not isinstance(n_skills, int) or n_skills < 1:
        raise MtpeftError(f"--skills must be a positive number of skill modules, got {n_skills!r}")
    names = skill_names(name, n_skills)
    taken = [n for n in names if n in bank]
    if taken:
        raise MtpeftError(f"the bank already holds {taken[:3]}; give the skills another name (--name)")
    bank.freeze()
    added = []
    try:
        for n in names:
            bank.add(n, module_type, config, task=None, seed=seed, metadata={"skill_of": name})
            added.append(n)
        sites = None if shared_routing else list(bank.group_of(names[0]).sites)
        router = PolyRouter(names, list(tasks), sites, n_splits=n_splits, seed=seed)
        router.check_bank(bank)  # the split and type checks, before any training
    except BaseException:
        for n in reversed(added):
            bank.remove(n)
        raise
    return router


def fit_skills(bank, scorer, tasks: Sequence, kind: str = "poly", n_skills: int = 8, n_splits: int | None = None,
               module_type: str = "lora", config=None, cfg=None, *, router_lr: float = 0.1,
               shared_routing: bool = False, name: str = "skills", sampling: str = "proportional") -> tuple[PolyRouter, dict]:
    """Train a skill inventory and its routing on a mixture of ``tasks`` (the skills at ``cfg.lr``, the
    routing logits at ``router_lr``). Returns the router (in eval mode) and the fit's metrics; the skills
    are frozen after. A failed fit leaves the bank as it was."""
    from ..train import TrainConfig, fit_phase

    cfg = cfg or TrainConfig()
    tasks = list(tasks)
    splits = check_kind(kind, n_splits)
    router = add_skills(bank, name, n_skills, [t.name for t in tasks], module_type, config, n_splits=splits,
                        shared_routing=shared_routing, seed=cfg.seed)
    try:
        metrics = fit_phase(bank, scorer, tasks, router, cfg, router_lr=router_lr, name=name, sampling=sampling)
    except BaseException:
        for n in reversed(router.module_names):
            bank.remove(n)
        raise
    router.logits.requires_grad_(False)
    router.eval()
    for n in router.module_names:
        bank.freeze(n)
        bank.record(n).metrics.update(metrics)
    return router, metrics


def router_dir(bank_path: str | Path, name: str) -> Path:
    return Path(bank_path) / ROUTERS_DIR / name


def save_skills(router: PolyRouter, bank_path: str | Path, name: str, heatmap: bool = True) -> list[Path]:
    """Write the router to ``BANK/routers/NAME/`` and (``heatmap``) ``BANK/NAME-routing.png``; save the bank
    itself first (``bank.save``). Returns the files written."""
    d = router_dir(bank_path, name)
    router.save(d)
    out = [d / "router.json"]
    if heatmap:
        out.append(plot_routing(router, Path(bank_path) / f"{name}-routing.png", title=f"{name}: task-skill weights"))
    return out


def load_skills(bank, bank_path: str | Path, name: str) -> PolyRouter:
    """The skills router ``name`` saved with the bank at ``bank_path``, bound to ``bank`` (eval mode)."""
    d = router_dir(bank_path, name)
    if not (d / "router.json").is_file():
        raise MtpeftError(f"bank {bank_path} has no skills router {name!r} ({d}); train one with "
                          "`mtpeft train --router poly|mhr ... --out BANK`")
    router = PolyRouter.load(d)
    if not isinstance(router, PolyRouter):
        raise MtpeftError(f"{d} holds a {router.name!r} router, not a skills (poly) router")
    router.check_bank(bank)
    return router.to(bank.device).eval()


def _saved_routers(bank_path: str | Path) -> list[tuple[str, dict]]:
    """``(name, config)`` of each skills (poly) router saved in ``BANK/routers/``, by name."""
    from ..io import read_json

    root = Path(bank_path) / ROUTERS_DIR
    if not root.is_dir():
        return []
    out = []
    for d in sorted(p for p in root.iterdir() if (p / "router.json").is_file()):
        meta = read_json(d / "router.json", what="router config")
        if isinstance(meta, dict) and meta.get("name") == "poly":
            out.append((d.name, meta.get("config") if isinstance(meta.get("config"), dict) else {}))
    return out


def saved_skills(bank_path: str | Path) -> list[str]:
    """The names of the skills routers saved with the bank (``BANK/routers/NAME/``), sorted."""
    return [name for name, _ in _saved_routers(bank_path)]


def skills_for_task(bank_path: str | Path, task: str) -> str | None:
    """The name of a skills router saved in the bank that routes ``task`` (the last by name), else None."""
    found = None
    for name, cfg in _saved_routers(bank_path):
        if task in (cfg.get("tasks") or []):
            found = name
    return found


def evaluate_skills(bank, scorer, task, router: PolyRouter, split: str = "test", batch_size: int = 64,
                    progress: bool = False, shard: tuple[int, int] | None = None) -> dict:
    """Accuracy on ``split`` with each example routed by its task through the skills' routing matrix.
    ``shard=(rank, world)``: a collective, each rank predicts its share and the counts are summed."""
    from ..train import split_accuracy

    router.eval()
    return split_accuracy(bank, scorer, task, lambda n: router, split, batch_size, progress, shard)


def plot_routing(router: PolyRouter, target: str | Path, title: str = "task-skill weights") -> Path:
    """A heatmap PNG of the tasks x skills evaluation weights (averaged over sites and splits)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import write_bytes

    m = router.task_skill_matrix().numpy()
    T, S = m.shape
    fig, ax = plt.subplots(figsize=(1.2 + 0.55 * S, 1.0 + 0.4 * T))
    im = ax.imshow(m, cmap="viridis", aspect="auto", vmin=0.0)
    ax.set_xticks(range(S), [str(i) for i in range(S)])
    ax.set_yticks(range(T), router.tasks)
    ax.set_xlabel("skill")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.05)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    target = Path(target)
    write_bytes(target, buf.getvalue())
    return target


# ---- few-shot transfer helpers (used by `mtpeft adapt`) ----------------------------------------------------

def add_task_row(bank, router: PolyRouter, task: str) -> int:
    """MHR-z: a new routing row for ``task``; only it trains (the skills and the other rows are frozen).
    Returns the row."""
    for n in router.module_names:
        bank.freeze(n)
    row = router.add_task(task, only_new_trains=True)
    router.logits.requires_grad_(True)
    return row


@torch.no_grad()
def average_skills(bank, router_or_skills, name: str, task: str | None = None, trainable: bool = True,
                   metadata: dict | None = None) -> int:
    """MHR-mu: a new plain module ``name`` of the skills' type and config whose parameters are the mean of the
    skills' (``A_mu = mean_s A_s``, ``B_mu = mean_s B_s``), ready to fine-tune. ``metadata`` is added to the
    module's (which names the skills averaged). Returns its id."""
    skills = list(router_or_skills.module_names if isinstance(router_or_skills, PolyRouter) else router_or_skills)
    if not skills:
        raise MtpeftError("average_skills needs at least one skill module")
    rec = bank.record(skills[0])
    params = [bank.module_parameters(s) for s in skills]
    keys = set(params[0])
    if any(set(p) != keys for p in params):
        raise MtpeftError(f"the skills {skills} do not share one config; average modules of one group")
    mean = {k: torch.stack([p[k].detach() for p in params]).mean(0) for k in keys}
    return bank.add_from(name, rec.type, dict(rec.config), mean, task=task, trainable=trainable,
                         metadata={"average_of": skills, **(metadata or {})})


def task_router(router: PolyRouter, task: str, skills: Sequence[str] | None = None, seed: int = 0) -> PolyRouter:
    """A router with ONE fresh routing row, for ``task`` (U(-1e-3, 1e-3), ``seed``), over ``skills`` (default the
    router's; e.g. copies of them) at the router's sites and splits: what the reference does to fine-tune on a new
    task (mttl's ``resize_module_logits(1)``). ``router`` itself is left as it was (unlike ``add_task_row``), so
    the other tasks keep their routing and several adaptations never collide."""
    skills = list(router.module_names if skills is None else skills)
    if len(skills) != router.n_skills:
        raise MtpeftError(f"a routing row over {router.n_skills} skills cannot route {len(skills)} modules; give "
                          f"one module per skill of {router.module_names}")
    return PolyRouter(skills, [task], router.sites, n_splits=router.n_splits, seed=seed)


@torch.no_grad()
def compose_task(bank, router: PolyRouter, task: str, name: str, *, for_task: str | None = None,
                 metadata: dict | None = None, trainable: bool = False) -> int:
    """The module ``task`` gets from the skills at evaluation, added as ONE plain module ``name`` of the skills'
    type and config: at each site ``A_t = sum_s w_s A_s`` and ``B_t = sum_s w_s B_s`` with ``w`` the router's
    evaluation weights for ``task`` at that site (for MHR, split ``j``'s weights mix column block ``j`` of ``A``
    and row block ``j`` of ``B``), exactly what ``LowRankStack.per_task`` mixes. Running ``name`` alone equals
    routing ``task`` through ``router`` (tested). ``for_task``: the module's task (default ``task``)."""
    skills = router.module_names
    rows = router.task_rows([task])
    params = [bank.module_parameters(s) for s in skills]
    was = router.training
    router.eval()
    try:
        tensors = {}
        for site, stack in bank.stacks_of(skills[0]):
            w = router.weights(rows, site)[0].float()  # [n, S]: the normalised sigmoid of the task's logits
            n = w.shape[0]
            kd, ku = f"{site}.{stack.down_name}", f"{site}.{stack.up_name}"
            down = torch.stack([p[kd].detach().float() for p in params])  # [S, r, d_in]
            up = torch.stack([p[ku].detach().float() for p in params])  # [S, d_out, r]
            S, r, d_in = down.shape
            d_out = up.shape[1]
            w = w.to(down.device)
            mixed_down = torch.einsum("ns,srnd->rnd", w, down.view(S, r, n, d_in // n)).reshape(r, d_in)
            mixed_up = torch.einsum("ns,snor->nor", w, up.view(S, n, d_out // n, r)).reshape(d_out, r)
            tensors[kd], tensors[ku] = mixed_down.to(params[0][kd].dtype), mixed_up.to(params[0][ku].dtype)
    finally:
        router.train(was)
    other = set(params[0]) - set(tensors)
    if other:
        raise MtpeftError(f"the skills have parameters {sorted(other)[:3]} that a routing cannot mix; skills of a "
                          "low-rank type (lora, a bottleneck adapter) compose")
    rec = bank.record(skills[0])
    return bank.add_from(name, rec.type, dict(rec.config), tensors, task=for_task or task, trainable=trainable,
                         metadata={"composed_from": list(skills), **(metadata or {})})


def inventories(bank) -> dict[str, list[str]]:
    """The bank's skill inventories: ``{name: [skill modules]}`` (modules added by ``add_skills``)."""
    out: dict[str, list[str]] = {}
    for r in bank.records:
        inv = r.metadata.get("skill_of") if isinstance(r.metadata, dict) else None
        if isinstance(inv, str):
            out.setdefault(inv, []).append(r.name)
    return out

