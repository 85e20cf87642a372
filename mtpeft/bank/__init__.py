"""The bank of task modules: bookkeeping and growth (``core``), banked layers (``layers``), the input-level
forward (``input_level``), artifacts (``artifacts``) and persistence (``persist``)."""
from .core import Group, ModuleBank, ModuleRecord
from .input_level import BankOutput
from .layers import BankedLinear
from .persist import read_manifest, remove_saved_module
from .sites import is_head

__all__ = ["BankOutput", "BankedLinear", "Group", "ModuleBank", "ModuleRecord", "is_head", "read_manifest",
           "remove_saved_module"]
