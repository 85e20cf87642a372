"""Names a package loads on first use (PEP 562): one implementation for ``mtpeft`` and ``mtpeft.bank``."""
from __future__ import annotations

import importlib


def lazy_names(package: str, names: dict[str, str], namespace: dict):
    """``(__getattr__, __dir__)`` for a package whose ``names`` map a public name to the relative submodule
    that defines it; a loaded name is cached in the package's ``namespace``."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
