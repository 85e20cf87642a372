"""Poly (Polytropon) and MHR (multi-head routing): tasks route over a shared inventory of skills.

The skills are ``S`` low-rank modules of the bank (LoRA by default), all in one group. The router holds the
task-skill routing logits ``Z``: ``[L, n_tasks, n_splits, S]``, one matrix per site of the skills
(``L`` sites) or one shared by every site (``L = 1``), initialised U(-1e-3, 1e-3). For a task ``t``:
training draws ``w = RelaxedBernoulli(T=1, logits=Z[t]).rsample()`` (Gumbel-sigmoid), evaluation takes
``w = sigmoid(Z[t])``; then ``w <- w / (sum(w) + 1e-12)``. The task's module is the weighted sum of the
skills' parameters (``A_t = sum_s w_s A_s``, ``B_t = sum_s w_s B_s``), built once per distinct task of the
batch (a factored ``Routing`` with ``rows``, ``mix='params'``) and applied per example by a gather.

MHR is Poly with ``n_splits > 1``: the layer's input (and output) width is cut into ``n_splits`` blocks, each
with its own mixture of the skills' blocks. The router's state (``Z`` and its task names) is saved with
``router.save(dir)``; ``mtpeft.skills`` keeps it in the bank's directory (``routers/<name>/``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..io import MtpeftError
from ..routing import RouteContext, Routing
from .base import Router, register_router

INIT = 1e-3  # U(-INIT, INIT), as the reference implementations
EPS = 1e-12


@register_router("poly")
class PolyRouter(Router):
    """``skills``: the skill modules' names (one group); ``tasks``: the task names, one row of logits each;
    ``sites``: the skills' sites, one logit matrix each (None: one matrix shared by every site);
    ``n_splits``: 1 for Poly, > 1 for MHR."""

    per_site = True

    def __init__(self, skills: Sequence[str], tasks: Sequence[str], sites: Sequence[str] | None = None,
                 n_splits: int = 1, seed: int = 0):
        if not skills:
            raise MtpeftError("Poly/MHR routing needs at least one skill module")
        tasks = list(tasks)
        if not tasks or len(set(tasks)) != len(tasks) or not all(isinstance(t, str) for t in tasks):
            raise MtpeftError(f"Poly/MHR routing needs distinct task names, got {tasks!r}")
        if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
            raise MtpeftError(f"n_splits must be a positive integer (1: Poly, > 1: MHR), got {n_splits!r}")
        super().__init__(list(skills))
        self.tasks = tasks
        self.sites = list(sites) if sites is not None else None
        self.n_splits = n_splits
        self.seed = int(seed)
        L = len(self.sites) if self.sites is not None else 1
        gen = torch.Generator().manual_seed(self.seed)
        z = (torch.rand(L, len(tasks), n_splits, len(self.module_names), generator=gen) * 2 - 1) * INIT
        self.logits = nn.Parameter(z)
        self._site_pos = {s: i for i, s in enumerate(self.sites or [])}
        self._rows: dict[tuple, Tensor] = {}
        self._skill_sites: set[str] = set()
        self._frozen_rows_hook = None
        # the training noise has its own stream, drawn for every task row at each call and then indexed: a
        # task's sample at a step does not depend on which other tasks share the batch, nor on how the batch
        # is cut over ranks, so several DDP processes draw what one process draws (and dropout elsewhere does
        # not shift it)
        self._noise = torch.Generator().manual_seed(self.seed + 1)

    @property
    def shared(self) -> bool:
        return self.sites is None

    @property
    def n_skills(self) -> int:
        return len(self.module_names)

    # ---- binding to the bank -----------------------------------------------------------------
    def bind(self, bank) -> None:
        super().bind(bank)
        group = bank.common_group(self.module_names, "the skills")
        sites = list(group.sites)
        if self.sites is not None and sorted(self.sites) != sorted(sites):
            raise MtpeftError(f"the routing logits were made for sites {self.sites[:3]}..., the skills act on "
                              f"{sites[:3]}...; build the router over these skills again")
        for site, stack in bank.stacks_of(group):
            if not hasattr(stack, "per_task"):
                raise MtpeftError(f"skills of type {group.mtype.name!r} cannot mix their parameters; use a "
                                  "low-rank type (lora, or a bottleneck adapter)")
            if stack.d_in % self.n_splits or stack.d_out % self.n_splits:
                raise MtpeftError(f"{self.n_splits} splits do not divide the widths of {site} ({stack.d_in} in, "
                                  f"{stack.d_out} out); give --splits that divides both (e.g. 2 or 4)")
        self._skill_sites = set(sites)
        self._rows = {}

    # ---- routing -----------------------------------------------------------------------------
    def task_rows(self, names: Sequence[str]) -> Tensor:
        """Row of the logits of each task name (one lookup per distinct set of names)."""
        key = tuple(names)
        rows = self._rows.get(key)
        if rows is None:
            pos = {t: i for i, t in enumerate(self.tasks)}
            unknown = [t for t in names if t not in pos]
            if unknown:
                raise MtpeftError(f"the skills router has no routing for task(s) {unknown}; it knows {self.tasks}. "
                                  "Add a row for a new task (mtpeft.skills.add_task_row) and train it")
            rows = self._rows[key] = torch.tensor([pos[t] for t in names], dtype=torch.long)
        return rows

    def weights(self, rows: Tensor, site: str | None = None) -> Tensor:
        """``[len(rows), n_splits, S]``: the normalised skill weights of these task rows at ``site`` (a Gumbel-
        sigmoid sample in training mode, the sigmoid in eval mode)."""
        layer = 0 if self.shared or site is None else self._site_pos[site]
        z = self.logits[layer].index_select(0, rows.to(self.logits.device))
        if self.training:
            every = torch.rand(self.logits.shape[1:], generator=self._noise, dtype=self.logits.dtype)
            u = every.index_select(0, rows.cpu()).to(z.device).clamp(1e-6, 1 - 1e-6)
            w = torch.sigmoid(z + torch.log(u) - torch.log1p(-u))  # RelaxedBernoulli(T=1).rsample()
        else:
            w = torch.sigmoid(z)
        return w / (w.sum(-1, keepdim=True) + EPS)

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        if site not in self._skill_sites:
            return None
        if ctx is None or ctx.task_ids is None:
            raise MtpeftError("Poly/MHR routing needs the task of each example: pass a RouteContext with task_ids "
                              "(RouteContext.for_tasks(names))")
        w = self.weights(self.task_rows(ctx.task_names), site).to(x.device)  # [G, n, S]
        if self.n_splits == 1:
            w = w[:, 0]
        idx = self.module_ids(x.device).expand(*w.shape)
        return Routing(w, idx, "params", ctx.task_ids.to(x.device))

    @torch.no_grad()
    def task_skill_matrix(self) -> Tensor:
        """``[n_tasks, S]``: evaluation weights averaged over sites and splits (for the heatmap)."""
        rows = torch.arange(len(self.tasks))
        w = torch.sigmoid(self.logits.detach().float()).index_select(1, rows.to(self.logits.device))
        w = w / (w.sum(-1, keepdim=True) + EPS)  # [L, T, n, S]
        return w.mean(dim=(0, 2)).cpu()

    # ---- new tasks (MHR-z) ---------------------------------------------------------------------
    def add_task(self, task: str, only_new_trains: bool = True) -> int:
        """Append a row of logits for ``task`` (U(-1e-3, 1e-3)); ``only_new_trains``: gradients reach that
        row only (the other tasks' rows stay as they are). Returns the row. Optimisers built before hold the
        old parameter: build them after."""
        if task in self.tasks:
            raise MtpeftError(f"the skills router already routes task {task!r}")
        gen = torch.Generator().manual_seed(self.seed + len(self.tasks))
        L, _, n, S = self.logits.shape
        new = ((torch.rand(L, 1, n, S, generator=gen) * 2 - 1) * INIT).to(self.logits.device, self.logits.dtype)
        self.logits = nn.Parameter(torch.cat([self.logits.detach(), new], dim=1))
        self.tasks.append(task)
        self._rows = {}
        if self._frozen_rows_hook is not None:
            self._frozen_rows_hook.remove()
            self._frozen_rows_hook = None
        if only_new_trains:
            keep = torch.zeros(1, len(self.tasks), 1, 1, dtype=self.logits.dtype, device=self.logits.device)
            keep[:, -1] = 1
            self._frozen_rows_hook = self.logits.register_hook(lambda g: g * keep.to(g.device))
        return len(self.tasks) - 1

    def get_config(self) -> dict:
        return {"skills": self.module_names, "tasks": self.tasks, "sites": self.sites, "n_splits": self.n_splits,
                "seed": self.seed}
