"""Artifacts: named tensors that belong to one module or to one group of the bank.

Gates (PHATGOOSE), prototypes (Arrow), centroids (retrieval), Fisher embeddings, a shared prompt (MPT):
data that routers and phases derive from or train beside a module. The bank stores them, saves them
beside the weights with checksums, removes them with their owner, and never reads them in its forward.
"""
from __future__ import annotations

import re

from torch import Tensor

from ..io import MtpeftError

SCOPES = ("module", "group")
_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:\-]*$")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
        raise MtpeftError(f"artifact name {key!r} is not usable: use letters, digits and _ . : - "
                          "(no slashes, no '..'), e.g. 'gate' or 'arrow.prototype'")
    return key


class ArtifactStore:
    """``(scope, owner) -> {name: tensor}``; the owner is a module name or a group key."""

    def __init__(self):
        self._data: dict[tuple[str, str], dict[str, Tensor]] = {}

    def set(self, scope: str, owner: str, key: str, value: Tensor) -> None:
        if scope not in SCOPES:
            raise MtpeftError(f"artifact scope must be one of {SCOPES}, got {scope!r}")
        if not isinstance(value, Tensor):
            raise MtpeftError(f"artifact {key!r} of {owner!r} must be a tensor, got {type(value).__name__}")
        self._data.setdefault((scope, owner), {})[check_key(key)] = value.detach().clone()

    def get(self, scope: str, owner: str, key: str) -> Tensor:
        try:
            return self._data[(scope, owner)][key]
        except KeyError:
            have = sorted(self._data.get((scope, owner), {}))
            raise MtpeftError(f"{scope} {owner!r} has no artifact {key!r}; it has: {', '.join(have) or '(none)'}"
                              ) from None

    def all(self, scope: str, owner: str) -> dict[str, Tensor]:
        return dict(self._data.get((scope, owner), {}))

    def delete(self, scope: str, owner: str, key: str | None = None) -> bool:
        """Drop one artifact (or every artifact of the owner, ``key=None``); whether anything went."""
        if key is None:
            return self._data.pop((scope, owner), None) is not None
        d = self._data.get((scope, owner))
        if not d or key not in d:
            return False
        del d[key]
        if not d:
            del self._data[(scope, owner)]
        return True

    def owners(self, scope: str) -> list[str]:
        return [o for s, o in self._data if s == scope]


class ArtifactsAPI:
    """The bank's artifact methods (``ModuleBank`` inherits them); expects ``_artifacts``, ``groups``,
    ``index`` and ``_changed`` on the bank."""

    def set_artifact(self, name: str, key: str, value: Tensor) -> None:
        """Store tensor ``value`` as artifact ``key`` of module ``name`` (saved with the bank, removed with it)."""
        self.index(name)
        self._artifacts.set("module", name, key, value)
        self._changed()

    def artifact(self, name: str, key: str) -> Tensor:
        self.index(name)
        return self._artifacts.get("module", name, key)

    def artifacts(self, name: str) -> dict[str, Tensor]:
        """Every artifact of module ``name``."""
        self.index(name)
        return self._artifacts.all("module", name)

    def delete_artifact(self, name: str, key: str) -> bool:
        gone = self._artifacts.delete("module", name, key)
        if gone:
            self._changed()
        return gone

    def set_group_artifact(self, group: str, key: str, value: Tensor) -> None:
        """An artifact of a whole group (e.g. prototypes), by group key (``bank.group_of(name).key``)."""
        self._group(group)
        if isinstance(key, str) and key.startswith("param:"):
            raise MtpeftError(f"artifact name {key!r}: names starting with 'param:' are reserved for a group's own "
                              "parameters (MPT's shared prompt, saved in the same file); pick another name")
        self._artifacts.set("group", group, key, value)
        self._changed()

    def group_artifact(self, group: str, key: str) -> Tensor:
        self._group(group)
        return self._artifacts.get("group", group, key)

    def group_artifacts(self, group: str) -> dict[str, Tensor]:
        self._group(group)
        return self._artifacts.all("group", group)

    def delete_group_artifact(self, group: str, key: str) -> bool:
        gone = self._artifacts.delete("group", group, key)
        if gone:
            self._changed()
        return gone

    def _group(self, key: str):
        if key not in self.groups:
            raise MtpeftError(f"no group {key!r} in the bank; groups: {', '.join(self.groups) or '(none)'} "
                              "(bank.group_of(module_name).key names a module's group)")
        return self.groups[key]
