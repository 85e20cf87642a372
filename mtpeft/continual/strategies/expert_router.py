"""``expert-router``: a new module per task (the same experts ``expert-oracle`` trains with the same seed),
and no task id at test: a router picks the expert(s) of each input among the experts learnt so far.

``router``: ``retrieval`` (default: the expert whose task centroid, the mean frozen-backbone embedding of a
sample of its training inputs, is nearest to the input), ``phatgoose`` (per-layer gates trained after each
expert, r-three/phatgoose's recipe) or ``arrow`` (per-layer prototypes from each LoRA's weights, no
training). ``top_k``: experts per input (per layer for phatgoose/arrow); default 1 for retrieval and 2 for
the per-layer routers, as in their papers.
"""
from __future__ import annotations

from typing import ClassVar

from ...errors import MtpeftError
from .base import register_strategy
from .expert_oracle import ExpertOracle

ROUTERS = ("retrieval", "phatgoose", "arrow")


@register_strategy("expert-router")
class ExpertRouter(ExpertOracle):
    uses_task_id = False
    defaults: ClassVar[dict] = {"router": "retrieval", "top_k": None, "gate_steps": 100}

    def check_options(self):
        o = self.options
        if o["router"] not in ROUTERS:
            raise MtpeftError(f"expert-router: router must be one of {', '.join(ROUTERS)}, got {o['router']!r}")
        if o["top_k"] is not None and (not isinstance(o["top_k"], int) or o["top_k"] < 1):
            raise MtpeftError(f"expert-router: top_k must be a positive integer, got {o['top_k']!r}")
        if not isinstance(o["gate_steps"], int) or o["gate_steps"] < 1:
            raise MtpeftError(f"expert-router: gate_steps must be a positive integer, got {o['gate_steps']!r}")
        self._router, self._router_step = None, None

    def after_task(self, step, task):
        super().after_task(step, task)
        import dataclasses

        from ...gates import fit_centroid, fit_gates

        ctx, name = self.ctx, self.module_name(task)
        if self.options["router"] == "retrieval":
            fit_centroid(ctx.bank, ctx.scorer, task, name, seed=ctx.seed)
        elif self.options["router"] == "phatgoose":
            cfg = dataclasses.replace(ctx.train, progress=ctx.progress)
            fit_gates(ctx.bank, ctx.scorer, task, name, cfg, steps=self.options["gate_steps"])

    def eval_key(self, step, task):
        return None  # the router's choices change as experts are added

    def eval_router(self, step, task):
        if self._router_step != step:
            from ...routers import ROUTERS as REGISTRY

            modules = [self.module_name(t) for t in self.learnt(step)]
            cls = REGISTRY.get(self.options["router"])
            top_k = self.options["top_k"] or (1 if self.options["router"] == "retrieval" else 2)
            self._router = cls.from_bank(self.ctx.bank, modules, top_k=min(top_k, len(modules)))
            self._router_step = step
        return self._router
