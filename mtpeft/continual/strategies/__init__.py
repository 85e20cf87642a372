"""Continual strategies, one file each, registered by name in ``STRATEGIES``."""
from . import conpet_dynamic, conpet_static, expert_oracle, expert_router, joint, olora, replay, seqft  # noqa: F401  (registration)
from .base import STRATEGIES, Context, Strategy, register_strategy

__all__ = ["STRATEGIES", "Context", "Strategy", "register_strategy"]
