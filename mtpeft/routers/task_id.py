"""Task-id routing (the oracle): each example goes wholly to the module of its task."""
from __future__ import annotations

from collections.abc import Mapping

import torch

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router


@register_router("task_id")
class TaskIdRouter(Router):
    """``tasks``: task name -> module name. Without it, a task goes to the bank's (last added) module trained on
    it (``bank.task_index``). Needs ``ctx.task_ids``."""

    def __init__(self, tasks: Mapping[str, str] | None = None):
        tasks = dict(tasks) if tasks is not None else None
        super().__init__(list(dict.fromkeys(tasks.values())) if tasks else None)
        self.tasks = tasks
        self._table: dict[tuple, torch.Tensor] = {}

    def bind(self, bank) -> None:
        super().bind(bank)
        self._table = {}
        self._bank_tasks = {r.task: i for i, r in enumerate(bank.records) if r.task}  # the last one per task wins

    def _module_of(self, task: str) -> int:
        if self.tasks is not None:
            if task not in self.tasks:
                raise MtpeftError(f"task-id router: no module for task {task!r}; it knows {sorted(self.tasks)}")
            return int(self.module_ids()[self.module_names.index(self.tasks[task])])
        if task not in self._bank_tasks:
            raise MtpeftError(f"no module in the bank was trained on task {task!r}; tasks in the bank: "
                              f"{sorted(self._bank_tasks)}")
        return self._bank_tasks[task]

    def route(self, bank, ctx: RouteContext) -> Routing:
        if ctx is None or ctx.task_ids is None:
            raise MtpeftError("task-id routing needs the task of each example: pass a RouteContext with task_ids "
                              "(RouteContext.for_tasks(names)); without task ids use a zero-shot router")
        key = tuple(ctx.task_names)
        table = self._table.get(key)
        if table is None:  # one lookup per distinct task, not per example
            table = self._table[key] = torch.tensor([self._module_of(t) for t in ctx.task_names], dtype=torch.long)
        ids = table[ctx.task_ids.cpu()]
        return Routing.one_hot(ids).to(bank.device)

    def get_config(self) -> dict:
        return {"tasks": self.tasks}
