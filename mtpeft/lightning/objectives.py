"""What a phase minimises: objectives, registered by name (``OBJECTIVES``), one class each.

An objective is called once per step as ``objective(module, batch, logits) -> (loss, extra_logs)``:

- ``module``: the ``PhaseModule`` (its ``bank``, ``router``, ``scorer``, ``tasks``, ``labels``);
- ``batch``: the data module's batch (``text``, ``label``, ``task``) plus ``target``, each example's
  class as a column of ``logits`` (the task-local label, or its global id when the phase scores over a
  ``LabelSpace``);
- ``logits``: ``[B, L]`` from the scorer, ``-inf`` in the columns an example cannot take.

``extra_logs`` (name -> scalar) are logged as ``<stage>/<name>`` beside the loss.

An objective that needs more of the student's forward than its logits (hidden states, say) opens
``capture(module, batch)``: the phase runs the forward inside it, so the objective can hook what it needs
there (e.g. a forward hook on ``module.bank``, whose calls return a ``BankOutput`` with the hidden
states; label embeddings run bare, with ``module.bank.state.bare`` set) and remove the hook on exit. A
distillation objective would capture the student's hidden states this way, and get the teacher's label
distribution and hidden states either from the batch (precomputed) or in ``__call__`` under
``torch.no_grad()`` with ``module.bank.route(teacher, ctx)``; PhaseModule needs no change for it.
"""
from __future__ import annotations

import contextlib
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..io import MtpeftError
from ..registry import Registry

OBJECTIVES: Registry[type[Objective]] = Registry("objective")


def register_objective(name: str):
    """Class decorator: ``@register_objective("cross_entropy")`` on an Objective subclass."""

    return OBJECTIVES.register_class(name)


class Objective:
    name: ClassVar[str] = ""

    def capture(self, module, batch: dict) -> contextlib.AbstractContextManager:
        """A scope around the step's forward, for objectives that need more than the logits (default: none)."""
        return contextlib.nullcontext()

    def __call__(self, module, batch: dict, logits: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def get_config(self) -> dict[str, Any]:
        """JSON-safe keyword arguments that rebuild this objective (logged with the phase's hyperparameters)."""
        return {}


@register_objective("cross_entropy")
class CrossEntropy(Objective):
    """Cross-entropy against ``batch["target"]``. ``label_smoothing`` spreads its mass over the labels each
    example can take (its finite logits), not over the padded ``-inf`` slots, which would make it infinite."""

    def __init__(self, label_smoothing: float = 0.0):
        if not 0.0 <= label_smoothing < 1.0:
            raise MtpeftError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)

    def __call__(self, module, batch, logits):
        target = batch["target"].to(logits.device)
        if not self.label_smoothing:
            return F.cross_entropy(logits, target), {}
        valid = torch.isfinite(logits)
        logp = logits.float().log_softmax(-1)
        nll = -logp.gather(1, target[:, None])[:, 0]
        smooth = -logp.masked_fill(~valid, 0.0).sum(-1) / valid.sum(-1).clamp_min(1)
        eps = self.label_smoothing
        return ((1 - eps) * nll + eps * smooth).mean(), {"nll": nll.mean().detach()}

    def get_config(self):
        return {"label_smoothing": self.label_smoothing}


@register_objective("regularised")
class Regularised(CrossEntropy):
    """Cross-entropy plus ``weight`` times the router's ``regulariser()`` (AdapterFusion's ``||V - I||^2``, weight
    0.01 as adapter-hub/adapters); the regulariser is logged as ``reg``."""

    def __init__(self, weight: float = 0.01, label_smoothing: float = 0.0):
        super().__init__(label_smoothing)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
            raise MtpeftError(f"the regulariser's weight must be a number >= 0, got {weight!r}")
        self.weight = float(weight)

    def __call__(self, module, batch, logits):
        reg = getattr(module.router, "regulariser", None)
        if reg is None:
            raise MtpeftError(f"the 'regularised' objective needs a router with a regulariser() (e.g. AdapterFusion's); "
                              f"router {type(module.router).__name__} has none: use the default objective")
        loss, extra = super().__call__(module, batch, logits)
        r = reg()
        return loss + self.weight * r.to(loss.dtype), {**extra, "reg": r.detach()}

    def get_config(self):
        return {**super().get_config(), "weight": self.weight}


def make_objective(spec=None) -> Objective:
    """An objective from None (cross-entropy), a registered name, an ``Objective``, or any callable with the
    objective signature ``(module, batch, logits) -> (loss, extra_logs)``."""
    if spec is None:
        return CrossEntropy()
    if isinstance(spec, str):
        return OBJECTIVES.get(spec)()
    if isinstance(spec, Objective):
        return spec
    if callable(spec):
        return _Function(spec)
    raise MtpeftError(f"an objective is a registered name ({', '.join(OBJECTIVES.names())}), an Objective or a "
                      f"callable (module, batch, logits) -> (loss, logs); got {type(spec).__name__}")


class _Function(Objective):
    """A plain function used as an objective."""

    def __init__(self, fn):
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, module, batch, logits):
        out = self.fn(module, batch, logits)
        return out if isinstance(out, tuple) else (out, {})
