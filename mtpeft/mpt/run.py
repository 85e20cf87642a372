"""``mtpeft distil`` as a function: both stages into one bank, evaluated, with the report.

The report (also written to ``BANK/distil-report.json``): per source task the teacher's, the distilled
student's and single-task prompt tuning's test accuracy at equal steps (``prompt_eq``: the task's share of
the student's steps, see ``equal_steps``), with the
trainable parameters per task (absolute and as a share of the backbone's); per target task the MPT target
stage against prompt tuning from scratch at the same budget; the summary (mean accuracies, the student's
share of the teachers' mean accuracy, its per-task parameters as a share of a teacher's).
"""
from __future__ import annotations

import contextlib
from pathlib import Path

from ..errors import MtpeftError
from .config import DistilConfig, config_dict
from .stages import adapt, distil, recipe, student_name, student_steps, train_teachers

REPORT = "distil-report.json"


def _acc(bank, scorer, task, module: str | None) -> float | None:
    """Test accuracy of ``module``; on several processes each rank scores its share (a collective)."""
    from ..distributed import eval_shard
    from ..train import evaluate

    return None if module is None else round(evaluate(bank, scorer, task, module, shard=eval_shard())["accuracy"], 4)


def _floor(bank, scorer, task) -> dict:
    """The baselines beside every row: the bare backbone (zero-shot) and the majority class, on the test split."""
    from ..distributed import eval_shard
    from ..train import evaluate

    r = evaluate(bank, scorer, task, None, shard=eval_shard())
    return {"zero_shot": round(r["accuracy"], 4), "majority": round(r["majority"], 4)}


def _baseline(bank, scorer, task, cfg: DistilConfig, budget, max_steps, progress) -> tuple[str | None, dict]:
    """``<task>-pt``: a single-task prompt trained at ``budget`` (kept when the bank has it)."""
    from ..train import fit_expert

    if not cfg.baseline:
        return None, {}
    name = f"{task.name}-pt"
    if name in bank.names:
        return name, dict(bank.record(name).metrics)
    m = fit_expert(bank, scorer, task, name, "prompt", {"n_tokens": cfg.n_tokens},
                   budget.train_config(cfg.seed, progress, max_steps, cfg.parallel()))
    return name, m


def parameters(bank, cfg: DistilConfig, n_sources: int) -> dict:
    """Trainable parameters per task: a teacher's prompt, the student's factors, ``P*`` (once for the group)."""
    H = bank.model.get_input_embeddings().weight.shape[1]
    backbone = sum(p.numel() for p in bank.model.parameters())
    teacher, factors, shared = cfg.n_tokens * H, cfg.rank * (cfg.n_tokens + H), cfg.n_tokens * H
    share = lambda k: round(k / backbone, 8)
    return {"backbone": backbone, "teacher_per_task": teacher, "teacher_share": share(teacher),
            "student_per_task": factors, "student_share": share(factors), "shared_prompt": shared,
            "student_per_task_with_shared": round(factors + shared / max(1, n_sources), 1),
            "student_over_teacher": round(factors / teacher, 6)}


def run_distil(cfg: DistilConfig, out: str | Path, *, targets: list[str] | None = None, max_steps: int | None = None,
               max_examples: int | None = None, progress: bool = True, bank_and_scorer=None,
               writer: bool = True) -> dict:
    """Teachers (where missing), the student (unless the bank has it), baselines, the target stage; saved to
    ``out`` after each stage. ``targets`` overrides ``cfg.targets``; ``max_steps`` and ``max_examples`` cap
    every fit and every split.

    On several processes (``cfg.devices`` ...) every rank runs this same function: the fits are DDP and the
    evaluations sharded (collectives), and only the ``writer`` (rank zero) holds the bank's lock and writes the
    bank and the report; the others follow from the bank as it was on disk when they started."""
    from ..api import check_bank_target, check_input_room, load_bank_or_new
    from ..bank import locked
    from ..io import write_json
    from ..modules.mpt import MPTConfig
    from ..suite import load_task

    out = Path(out)
    check_bank_target(out)
    cap = max_examples if max_examples is not None else cfg.max_examples
    targets = list(cfg.targets if targets is None else targets)
    clash = sorted(set(targets) & set(cfg.sources))
    if clash:
        raise MtpeftError(f"target task(s) {clash} are also sources; a target is a task held out from the sources")
    cfg.parallel()  # the settings and every budget's global batch checked before the backbone loads
    with locked(out) if writer else contextlib.nullcontext():
        bank, scorer = bank_and_scorer or load_bank_or_new(cfg.backbone, out)
        save = (lambda: bank.save(out)) if writer else (lambda: None)
        if cfg.max_length is not None:
            scorer.max_length = cfg.max_length
        check_input_room(bank, scorer, "mpt", MPTConfig(**cfg.module_config()))
        sources = [load_task(s, max_examples=cap, seed=cfg.seed) for s in cfg.sources]
        tasks_t = [load_task(s, max_examples=cap, seed=cfg.seed) for s in targets]
        teachers = train_teachers(bank, scorer, sources, cfg, max_steps, progress, on_trained=save)
        student = _student(bank, scorer, sources, teachers, cfg, max_steps, progress, out)
        save()
        rows, target_rows = [], []
        for t in sources:  # each baseline saved as soon as it is trained
            rows.append(_source_row(bank, scorer, t, teachers[t.name], cfg, max_steps, progress, len(sources)))
            save()
        for t in tasks_t:
            target_rows.append(_target_row(bank, scorer, t, sources, cfg, max_steps, progress))
            save()
        report = {"bank": str(out), "config": config_dict(cfg), "teachers": teachers, "student": student,
                  "sources": rows, "targets": target_rows, "parameters": parameters(bank, cfg, len(sources)),
                  "summary": summary(rows, target_rows), "peft_task_order": [student_name(t.name) for t in sources]}
        if writer:
            write_json(out / REPORT, report)
    return report


def _student(bank, scorer, sources, teachers, cfg, max_steps, progress, out) -> dict:
    """The distilled student: kept when the bank has it for every source, else trained."""
    students = [student_name(t.name) for t in sources]
    have = [s in bank.names for s in students]
    if all(have):
        return {"trained": False}
    if any(have):
        raise MtpeftError(f"bank {out} holds students of some sources only ({[s for s, h in zip(students, have) if h]});"
                          " the sources are distilled together: remove them or use the same sources")
    fit = distil(bank, scorer, sources, {k: v["module"] for k, v in teachers.items()}, cfg, max_steps, progress)
    return {**{k: v for k, v in fit.items() if k != "modules"}, "trained": True}


def equal_steps(cfg: DistilConfig, max_steps: int | None, n_sources: int) -> int:
    """Single-task prompt tuning "at equal steps" to the student: its share of the student's steps, which the
    student spends on the mixture of ``n_sources`` tasks (the same total compute, about the same examples of
    the task seen). The teacher is prompt tuning at its own budget."""
    capped = student_steps(cfg, max_steps, n_sources)
    steps = cfg.student.max_steps if capped is None else capped
    return max(1, -(-steps // max(1, n_sources)))


def _same_recipe(bank, task: str, cfg: DistilConfig, steps: int, teacher: dict) -> bool:
    """Whether prompt tuning at a budget of ``steps`` is the teacher's own recipe: a teacher ``distil`` trained
    (its name, the config's prompt length) with that step budget and the student's learning rate, batch,
    epochs and patience (its recorded ``recipe``; a teacher without one must have taken exactly ``steps``).
    Then the teacher *is* the equal-steps baseline; a second copy would only redraw its initialisation."""
    rec = bank.record(teacher["module"])
    if teacher["module"] != f"{task}-teacher" or rec.type != "prompt" or rec.config.get("n_tokens") != cfg.n_tokens:
        return False
    want = recipe(cfg.student.train_config(cfg.seed, False, steps))
    if "recipe" in rec.metadata:
        return rec.metadata["recipe"] == want
    return teacher.get("steps") == steps and recipe(cfg.teacher.train_config(cfg.seed, False, steps)) == want


def _source_row(bank, scorer, t, teacher: dict, cfg, max_steps, progress, n_sources: int) -> dict:
    steps = equal_steps(cfg, max_steps, n_sources)
    is_teacher = (cfg.baseline and f"{t.name}-pt" not in bank.names
                  and _same_recipe(bank, t.name, cfg, steps, teacher))
    pt, pm = ((teacher["module"], {"steps": teacher["steps"]}) if is_teacher
              else _baseline(bank, scorer, t, cfg, cfg.student, steps, progress))
    teacher_acc = _acc(bank, scorer, t, teacher["module"])
    return {"task": t.name, "teacher": teacher_acc, "student": _acc(bank, scorer, t, student_name(t.name)),
            "prompt_eq": teacher_acc if is_teacher else _acc(bank, scorer, t, pt), "prompt_eq_is_teacher": is_teacher,
            "teacher_steps": teacher["steps"], "prompt_eq_steps": pm.get("steps"), **_floor(bank, scorer, t)}


def _target_row(bank, scorer, t, sources, cfg, max_steps, progress) -> dict:
    """The target stage on ``t`` (kept when the bank has ``<t>-mpt``) and prompt tuning from scratch beside it."""
    name = student_name(t.name)
    if name in bank.names:
        rec = bank.record(name)
        a = {"module": name, "steps": rec.metrics.get("steps"), "init": rec.metadata.get("init"),
             **({"similar": rec.metadata["similar"]} if "similar" in rec.metadata else {})}
    else:
        a = adapt(bank, scorer, t, sources, cfg, max_steps, progress)
    pt, pm = _baseline(bank, scorer, t, cfg, cfg.target, max_steps, progress)
    return {"task": t.name, "init": a.get("init"), "mpt": _acc(bank, scorer, t, name),
            "prompt_scratch": _acc(bank, scorer, t, pt), "steps": a.get("steps"), "prompt_steps": pm.get("steps"),
            **_floor(bank, scorer, t),
            **({"similar": a["similar"]} if "similar" in a else {})}


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(sum(xs) / len(xs), 4) if xs else None


def summary(rows: list[dict], target_rows: list[dict]) -> dict:
    teacher, student = _mean(r["teacher"] for r in rows), _mean(r["student"] for r in rows)
    out = {"teacher_mean": teacher, "student_mean": student, "prompt_eq_mean": _mean(r["prompt_eq"] for r in rows),
           "student_over_teacher": round(student / teacher, 4) if teacher else None,
           "zero_shot_mean": _mean(r.get("zero_shot") for r in rows), "majority_mean": _mean(r.get("majority") for r in rows)}
    if target_rows:
        out.update(target_mpt_mean=_mean(r["mpt"] for r in target_rows),
                   target_prompt_mean=_mean(r["prompt_scratch"] for r in target_rows),
                   target_zero_shot_mean=_mean(r.get("zero_shot") for r in target_rows),
                   target_majority_mean=_mean(r.get("majority") for r in target_rows))
    return out
