"""Routers: one file per router, registered by name (``ROUTERS``). See ``base.Router`` for the interface."""
from .arrow import ArrowRouter
from .average import AverageRouter
from .base import ROUTERS, Router, register_router
from .fixed import FixedRouter
from .fusion import FusionRouter
from .interpolate import InterpolationRouter
from .phatgoose import PhatgooseGates, PhatgooseRouter
from .poly import PolyRouter
from .retrieval import RetrievalRouter
from .task_id import TaskIdRouter

__all__ = ["ROUTERS", "ArrowRouter", "AverageRouter", "FixedRouter", "FusionRouter", "InterpolationRouter", "PhatgooseGates",
           "PhatgooseRouter", "PolyRouter", "RetrievalRouter", "Router", "TaskIdRouter", "register_router"]
