"""The bank of task modules: bookkeeping and growth (``core``), banked layers (``layers``), the input-level
forward (``input_level``), artifacts (``artifacts``), persistence (``persist``), the manifest's checks
(``manifest``, no torch) and module sizes known before allocation (``plan``).

Names load on first use (PEP 562), so ``mtpeft.bank.manifest`` (what ``mtpeft bank ls`` reads) imports no torch.
"""
_LAZY = {
    "BankOutput": ".input_level",
    "BankedLinear": ".layers",
    "Group": ".core",
    "ModuleBank": ".core",
    "ModuleRecord": ".core",
    "is_head": ".sites",
    "locked": ".persist",
    "read_manifest": ".persist",
    "remove_saved_module": ".persist",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mtpeft.bank' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["BankOutput", "BankedLinear", "Group", "ModuleBank", "ModuleRecord", "is_head", "locked", "read_manifest",
           "remove_saved_module"]
