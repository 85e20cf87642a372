"""Skills shared across tasks (Poly, MHR) and what few-shot transfer builds on them (MHR-z, MHR-mu)."""
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

__all__ = ["ROUTER_KINDS", "add_skills", "add_task_row", "average_skills", "check_kind", "evaluate_skills",
           "fit_skills", "load_skills", "plot_routing", "router_dir", "save_skills", "skill_names",
           "skills_for_task"]
