"""MPT's two stages on a bank: teachers and the distilled student (source stage), a new task's factors
initialised from the sources and fine-tuned (target stage).

Names in the bank: ``<task>-teacher`` (a single-task ``prompt`` module), ``<task>-mpt`` (the task's factors in
the MPT group of ``shared``), ``<task>-pt`` (single-task prompt tuning at the student's or target's budget,
the baseline). A teacher already in the bank for a task (a ``prompt`` module whose task is that task) is
used as it is; a student already there is kept (``distil`` trains only what is missing).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MtpeftError
from ..modules.mpt import mpt_stack, ones_factors, shared_prompt
from .config import DistilConfig, TargetSettings

SIMILARITY_EXAMPLES = 64  # training texts per task whose mean embedding stands for the task ("similar" init)


def student_name(task: str) -> str:
    return f"{task}-mpt"


def teacher_of(bank, task: str) -> str | None:
    """The bank's teacher for ``task``: ``<task>-teacher``, else the last ``prompt`` module trained on it."""
    if f"{task}-teacher" in bank.names:
        return f"{task}-teacher"
    for r in reversed(bank.records):
        if r.type == "prompt" and r.task == task:
            return r.name
    return None


def recipe(tc) -> dict:
    """A prompt fit's recipe: its step budget, learning rate, batch, epochs and patience."""
    return {"max_steps": tc.max_steps, "lr": float(tc.lr), "batch_size": tc.batch_size, "max_epochs": tc.max_epochs,
            "patience": tc.patience}


def train_teachers(bank, scorer, tasks: Sequence, cfg: DistilConfig, max_steps: int | None = None,
                   progress: bool = True, on_trained=None) -> dict[str, dict]:
    """``{task: {"module", "trained", "steps"}}``: a teacher prompt for each task, trained where the bank has none.
    ``on_trained()`` is called after each teacher trained (``run_distil`` saves the bank there, so a stopped
    run keeps every finished teacher)."""
    from ..train import fit_expert

    out = {}
    for t in tasks:
        name = teacher_of(bank, t.name)
        if name is not None:
            out[t.name] = {"module": name, "trained": False, "steps": bank.record(name).metrics.get("steps")}
            continue
        name = f"{t.name}-teacher"
        tc = cfg.teacher.train_config(cfg.seed, progress, max_steps, cfg.parallel())
        m = fit_expert(bank, scorer, t, name, "prompt", {"n_tokens": cfg.n_tokens}, tc)
        bank.record(name).metadata["recipe"] = recipe(tc)  # what it was trained with (steps taken are metrics)
        out[t.name] = {"module": name, "trained": True, "steps": m["steps"]}
        if on_trained is not None:
            on_trained()
    return out


def _init_shared(bank, students: list[str], teachers: list[str], how: str) -> None:
    """``P*`` from the mean of the teachers' prompts (where they have its shape), or left random."""
    P = shared_prompt(bank, students[0])
    if how != "teachers":
        return
    prompts = [bank.module_parameters(t)["<input>.prompt"] for t in teachers]
    if any(tuple(p.shape) != tuple(P.shape) for p in prompts):
        return  # teachers of another length (brought by the user): P* stays random
    with torch.no_grad():
        P.copy_(torch.stack([p.detach() for p in prompts]).mean(0).to(P.device))
    mpt_stack(bank, students[0]).invalidate()


def student_steps(cfg: DistilConfig, max_steps: int | None, n_sources: int) -> int | None:
    """The student's step cap under a per-fit cap ``max_steps`` (None: the config's budget). The student trains
    all ``n_sources`` tasks in one fit, so the cap it gets is ``max_steps`` per source (each task then sees about
    as many batches as its capped teacher), never above the config's own ``student.max_steps``."""
    if max_steps is None:
        return None
    steps = max_steps * max(1, n_sources)
    return steps if cfg.student.max_steps == -1 else min(steps, cfg.student.max_steps)


def distil(bank, scorer, tasks: Sequence, teachers: dict[str, str], cfg: DistilConfig, max_steps: int | None = None,
           progress: bool = True) -> dict:
    """Train ``P*`` and every source task's factors on the mixture of ``tasks``, by distillation from
    ``teachers`` (task -> module); everything else frozen. Returns the fit's metrics and the modules."""
    from ..lightning.distil import Distillation
    from ..routers import TaskIdRouter
    from ..train import fit_phase

    names = [student_name(t.name) for t in tasks]
    clash = [n for n in names if n in bank.names]
    if clash:
        raise MtpeftError(f"the bank already has student module(s) {clash}; remove them (`mtpeft bank rm`) or "
                          "distil into another bank")
    bank.freeze()
    for t, n in zip(tasks, names):
        bank.add(n, "mpt", cfg.module_config(), task=t.name, seed=cfg.seed,
                 metadata={"stage": "source", "teacher": teachers[t.name], "sources": [x.name for x in tasks]})
    P = shared_prompt(bank, names[0])
    try:
        _init_shared(bank, names, [teachers[t.name] for t in tasks], cfg.shared_init)
        for n in names:
            bank.unfreeze(n)
        P.requires_grad_(True)
        loss = cfg.loss
        objective = Distillation({t.name: teachers[t.name] for t in tasks}, task=loss.task, kl=loss.kl,
                                 mse=loss.mse, temperature=loss.temperature, hidden=loss.hidden)
        metrics = fit_phase(bank, scorer, tasks, TaskIdRouter(dict(zip((t.name for t in tasks), names))),
                            cfg.student.train_config(cfg.seed, progress, student_steps(cfg, max_steps, len(tasks)),
                                                     cfg.parallel()),
                            objective=objective,
                            name="mpt-student", sampling=cfg.sampling)
    except BaseException:
        for n in names:
            bank.remove(n)
        raise
    finally:
        P.requires_grad_(False)
        bank.freeze()
    for n in names:
        bank.record(n).metrics.update(metrics)
    return {"modules": names, **metrics}


# ---- the target stage ------------------------------------------------------------------------------
def task_embedding(bank, scorer, task) -> torch.Tensor:
    """The frozen backbone's mean embedding ``[H]`` of up to ``SIMILARITY_EXAMPLES`` training texts of ``task``."""
    texts = list(task.splits["train"]["text"][:SIMILARITY_EXAMPLES])
    if not texts:
        raise MtpeftError(f"task {task.name!r} has no training examples to compare with the sources")
    enc = scorer.tokenizer(texts, padding=True, truncation=True, max_length=getattr(scorer, "max_length", 128),
                           return_tensors="pt")
    pooled = bank.pooled(enc["input_ids"].to(bank.device), enc["attention_mask"].to(bank.device))
    return torch.nn.functional.normalize(pooled.mean(0), dim=0)


def most_similar(bank, scorer, task, sources: Sequence) -> tuple[str, dict[str, float]]:
    """The source task whose mean embedding is closest (cosine) to ``task``'s, and every similarity."""
    e = task_embedding(bank, scorer, task)
    sims = {s.name: float(e @ task_embedding(bank, scorer, s)) for s in sources}
    return max(sims, key=sims.get), sims


def init_factors(bank, name: str, how: str, sources: list[str], similar: str | None = None,
                 seed: int = 0) -> None:
    """Set module ``name``'s factors: ``random``, the ``average`` of the sources', those of the ``similar``
    source, or ``shared`` (ones: the task starts from ``P*`` alone)."""
    stack = mpt_stack(bank, name)
    e = stack.experts[bank.group_of(name).members.index(name)]
    n, r = e.u.shape
    H = e.v.shape[1]
    src = mpt_stack(bank, sources[0]) if sources else None

    def factors(m):
        return src.experts[bank.group_of(m).members.index(m)]

    if how == "random":  # unit-variance entries of u v: P_k = P* times a random pattern of P*'s scale
        g = torch.Generator().manual_seed(seed)
        u, v = torch.randn(n, r, generator=g), torch.randn(r, H, generator=g) / r ** 0.5
    elif how == "shared":
        u, v = ones_factors(n, r, H)
    elif how == "average":
        u = torch.stack([factors(m).u.detach() for m in sources]).mean(0)
        v = torch.stack([factors(m).v.detach() for m in sources]).mean(0)
    elif how == "similar":
        if similar is None:
            raise MtpeftError("init 'similar' needs the most similar source task's module")
        u, v = factors(similar).u.detach(), factors(similar).v.detach()
    else:
        raise MtpeftError(f"unknown target init {how!r}; choose one of random, average, similar, shared")
    with torch.no_grad():
        e.u.copy_(u)
        e.v.copy_(v)
    stack.invalidate()


def adapt(bank, scorer, task, sources: Sequence, cfg: DistilConfig, max_steps: int | None = None,
          progress: bool = True) -> dict:
    """The target stage: add ``<task>-mpt``, initialise its factors from the source students (``cfg.target.init``)
    and fine-tune them (and, with ``tune_shared``, a copy of ``P*`` of its own, so the sources keep theirs)."""
    from ..routers import TaskIdRouter
    from ..train import fit_phase

    tc: TargetSettings = cfg.target
    src = [student_name(s.name) for s in sources]
    missing = [m for m in src if m not in bank.names]
    if missing:
        raise MtpeftError(f"the target stage starts from the distilled sources, and the bank lacks {missing}; run "
                          "`mtpeft distil` without --target first (or with the same --out)")
    name = student_name(task.name)
    if name in bank.names:
        raise MtpeftError(f"the bank already has a module {name!r}; remove it (`mtpeft bank rm`) to adapt again")
    similar, sims = (most_similar(bank, scorer, task, sources) if tc.init == "similar" else (None, None))
    config = cfg.module_config()
    if tc.tune_shared:
        config["shared"] = f"{cfg.shared}.{task.name}"[:64]
    bank.freeze()
    bank.add(name, "mpt", config, task=task.name, seed=cfg.seed,
             metadata={"stage": "target", "init": tc.init, "sources": [s.name for s in sources],
                       **({"similar": similar} if similar else {})})
    P = shared_prompt(bank, name)
    try:
        if tc.tune_shared:
            with torch.no_grad():
                P.copy_(shared_prompt(bank, src[0]))
        init_factors(bank, name, tc.init, src, similar and student_name(similar), cfg.seed)
        bank.unfreeze(name)
        P.requires_grad_(tc.tune_shared)
        metrics = fit_phase(bank, scorer, [task], TaskIdRouter({task.name: name}),
                            tc.train_config(cfg.seed, progress, max_steps, cfg.parallel()), name=name)
    except BaseException:
        bank.remove(name)
        raise
    finally:
        P.requires_grad_(False)
        bank.freeze()
    bank.record(name).metrics.update(metrics)
    out = {"module": name, "init": tc.init, **metrics}
    if similar:
        out.update(similar=similar, similarities={k: round(v, 4) for k, v in sims.items()})
    return out
