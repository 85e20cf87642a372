"""Skills shared across tasks (Poly, MHR) and what few-shot transfer builds on them (MHR-z, MHR-mu, LoraHub)."""
from .core import (
    ROUTER_KINDS,
    add_skills,
    add_task_row,
    average_skills,
    check_kind,
    compose_task,
    evaluate_skills,
    fit_skills,
    inventories,
    load_skills,
    plot_routing,
    router_dir,
    save_skills,
    saved_skills,
    skill_names,
    skills_for_task,
    task_router,
)
from .lorahub import compose, few_shot_loss, lorahub, optimise_weights

__all__ = ["ROUTER_KINDS", "add_skills", "add_task_row", "average_skills", "check_kind", "compose", "compose_task",
           "evaluate_skills", "few_shot_loss", "fit_skills", "inventories", "load_skills", "lorahub", "optimise_weights",
           "plot_routing", "router_dir", "save_skills", "saved_skills", "skill_names", "skills_for_task",
           "task_router"]
