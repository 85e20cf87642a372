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


from .._lazy import lazy_names

__getattr__, __dir__ = lazy_names(__name__, _LAZY, globals())


__all__ = ["BankOutput", "BankedLinear", "Group", "ModuleBank", "ModuleRecord", "is_head", "locked", "read_manifest",
           "remove_saved_module"]
