"""Skills shared across tasks (Poly, MHR) and what few-shot transfer builds on them (MHR-z, MHR-mu, LoraHub)."""
from .core import (
    ROUTER_KINDS,
    add_skills,
    add_task_row,
    average_skills,
    check_kind,
    evaluate_skills,
    fit_skills,
    load_skills,
    plot_routing,
    router_dir,
    save_skills,
    skill_names,
    skills_for_task,
)
from .lorahub import compose, few_shot_loss, lorahub, optimise_weights

__all__ = ["ROUTER_KINDS", "add_skills", "add_task_row", "average_skills", "check_kind", "compose", "evaluate_skills",
           "few_shot_loss", "fit_skills", "load_skills", "lorahub", "optimise_weights", "plot_routing", "router_dir",
           "save_skills", "skill_names", "skills_for_task"]
