"""Few-shot transfer methods, one file each, registered by name in ``ADAPT_METHODS``.

A new method is one file here with a class decorated by ``@register_method("name")``: ``method_names`` and
``get_method`` import every module of this package on first use, so nothing central changes.
"""
from __future__ import annotations

import importlib
import pkgutil

from .base import ADAPT_METHODS, AdaptContext, AdaptMethod, AdaptResult, Budget, SkillsMethod, register_method

_loaded = False


def _load() -> None:
    global _loaded
    if not _loaded:
        for m in pkgutil.iter_modules(__path__):
            if m.name != "base":
                importlib.import_module(f"{__name__}.{m.name}")
        _loaded = True


def method_names() -> list[str]:
    _load()
    return ADAPT_METHODS.names()


def get_method(name: str) -> AdaptMethod:
    _load()
    return ADAPT_METHODS.get(name)()


__all__ = ["ADAPT_METHODS", "AdaptContext", "AdaptMethod", "AdaptResult", "Budget", "SkillsMethod", "get_method",
           "method_names", "register_method"]
