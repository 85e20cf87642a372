"""Skills shared across tasks (Poly, MHR) and what few-shot transfer builds on them (MHR-z, MHR-mu, LoraHub,
AdapterFusion)."""
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
from .fusion import add_fusion, evaluate_fusion, fit_fusion, load_fusion, save_fusion
from .lorahub import compose, few_shot_loss, lorahub, optimise_weights
from .saved import evaluate_router, load_router

__all__ = ["ROUTER_KINDS", "add_fusion", "add_skills", "add_task_row", "average_skills", "check_kind", "compose",
           "compose_task", "evaluate_fusion", "evaluate_router", "evaluate_skills", "few_shot_loss", "fit_fusion", "fit_skills",
           "inventories", "load_fusion", "load_router", "load_skills", "lorahub", "optimise_weights", "plot_routing", "router_dir",
           "save_fusion", "save_skills", "saved_skills", "skill_names", "skills_for_task", "task_router"]
