"""Wiring a group of modules into the backbone: one stack per site, the targeted ``nn.Linear`` layers wrapped
in ``BankedLinear`` on first use, the input- and attention-level stacks at pseudo-sites. ``ModuleBank``
inherits this mixin; it holds no state of its own."""
from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from ..io import MtpeftError
from ..modules.base import ModuleConfig, ModuleType, match_targets
from .layers import BankedLinear


class SiteWiring:
    """Expects ``model``, ``backbone``, ``family``, ``state``, ``input_stacks`` and ``_stash_sites`` on the bank."""

    def _install(self, key: str, mtype: type[ModuleType], config: ModuleConfig) -> list[str]:
        """Create the group's stacks; on failure nothing stays installed."""
        installed: list[str] = []
        try:
            self._install_into(key, mtype, config, installed)
        except BaseException:
            self._uninstall(key, installed)
            raise
        return installed

    def _install_into(self, key: str, mtype: type[ModuleType], config: ModuleConfig, installed: list[str]) -> None:
        if mtype.level == "composite":
            # A composite type (MAM) is several types under one module: each part installs its
            # stacks under the same group key, so one routing weight drives all of them.
            for ptype, pconfig in mtype.parts(config):
                self._install_into(key, ptype, pconfig, installed)
            return
        if mtype.level in ("input", "attention"):
            # One stack for the whole model, at a pseudo-site: "<input>" (prompts: embeddings)
            # or "<attention>" (prefixes: keys and values of every attention layer).
            if any(is_pseudo(x) for x in installed):
                raise MtpeftError(f"module type {mtype.name!r}: a composite type has two input/attention-level parts")
            stack = mtype.make_stack(config, None, self.backbone)
            stack.to(device=self.model.get_input_embeddings().weight.device)
            site = f"<{mtype.level}>"
            object.__setattr__(stack, "state", self.state)
            object.__setattr__(stack, "site", site)
            self.input_stacks[key] = stack
            installed.append(site)
            return
        mods = dict(self.model.named_modules())
        # Sites already wrapped are found by their BankedLinear name (the base lives at .base).
        candidates = [n for n, m in mods.items() if isinstance(m, (nn.Linear, BankedLinear))
                      and not n.endswith(".base") and not is_head(n, self.family)]
        sites = match_targets(candidates, mtype.targets(self.family, config))
        if not sites:
            raise MtpeftError(f"target_modules {mtype.targets(self.family, config)} match no linear layer of "
                              f"this {self.family} backbone; examples of layer names: {candidates[:6]}")
        for site in sites:
            m = self._ensure_wrapped(site)
            if site in installed:
                raise MtpeftError(f"module type {mtype.name!r}: two parts of a composite type act on {site}")
            stack = mtype.make_stack(config, m.base, self.backbone)
            stack.to(device=m.base.weight.device)
            object.__setattr__(stack, "state", self.state)  # stacks may read inputs stashed by other sites
            object.__setattr__(stack, "site", site)
            m.stacks[key] = stack
            installed.append(site)
            for extra in stack.stash_sources(site):
                self._ensure_wrapped(extra)
                self._stash_sites.add(extra)

    def _uninstall(self, key: str, sites: list[str]) -> None:
        mods = dict(self.model.named_modules())
        for site in sites:
            if is_pseudo(site):
                if key in self.input_stacks:
                    del self.input_stacks[key]
            elif key in mods[site].stacks:
                del mods[site].stacks[key]

    def _site_device(self, site: str) -> torch.device:
        if is_pseudo(site):
            return self.model.get_input_embeddings().weight.device
        return self.model.get_submodule(site).weight.device

    def _ensure_wrapped(self, site: str) -> BankedLinear:
        m = self.model.get_submodule(site)
        if not isinstance(m, BankedLinear):
            if not isinstance(m, nn.Linear):
                raise MtpeftError(f"{site} is not a linear layer")
            m = BankedLinear(m, site, self)
            parent, _, child = site.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, m)
        return m

    def release(self) -> None:
        """Give the backbone back as it was: every module removed (merged ones unmerged), every wrapped layer
        unwrapped, so another bank can take it. This bank is empty afterwards."""
        for name in list(reversed(self.names)):
            self.remove(name)
        for site, m in list(self.model.named_modules()):
            if isinstance(m, BankedLinear):
                parent, _, child = site.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, m.base)
        self._stash_sites.clear()
        self.model._mtpeft_bank = False


def group_key(module_type: str, config: ModuleConfig) -> str:
    """The key of the group that modules of this type and config share (their weights stack together): the
    type, then the first 10 hex digits of the sha1 of the config."""
    return f"{module_type}:" + hashlib.sha1(json.dumps(config.to_dict(), sort_keys=True).encode()).hexdigest()[:10]


def is_pseudo(site: str) -> bool:
    """Sites of input- and attention-level stacks ("<input>", "<attention>"), not layer paths."""
    return site.startswith("<")


def is_head(name: str, family: str) -> bool:
    """Output layers a module never targets (the LM head, the pooler)."""
    return name in ("lm_head", "pooler.dense") or name.endswith(".lm_head")
