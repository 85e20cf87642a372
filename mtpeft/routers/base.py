"""The one interface every router shares.

A router is an ``nn.Module`` that returns the bank's ``Routing`` (weights over modules):

- per example (``per_site = False``): ``route(bank, ctx) -> Routing | None``, once per batch, before the
  forward; the answer serves every site (task-id routing, fixed weights, retrieval, Poly);
- per site (``per_site = True``): ``at_site(site, x, ctx) -> Routing | None``, called by the bank once per
  site per forward with that site's input ``x`` ``[B, T, d]``; the answer serves every group of modules at
  the site, None means "nothing here" (PHATGOOSE, Arrow);
- a per-site router may also rewrite a site's output (``edits_output = True``): the bank then calls
  ``site_output(layer, x, y, ctx) -> y'`` after the routed stacks, ``layer`` the ``BankedLinear`` (its ``site`` and
  ``stacks``), ``y`` its output so far (AdapterFusion: attention over the adapters' individual outputs).

``ctx`` is a ``RouteContext`` (attention mask, task ids where known, texts, the frozen backbone's pooled
embedding on demand). A router names the modules it routes to by name (``module_names``), so it follows the
bank through changes: the bank checks it (``check_bank``) whenever a scope opens, and a router bound to an
older version of the bank rebinds its names to the new ids, or refuses with a message saying what changed.
Routers save and load their own state (``save``/``load``: JSON config plus safetensors, never pickle).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..io import MtpeftError, read_json, read_tensors, write_json, write_tensors
from ..registry import Registry
from ..routing import RouteContext, Routing

ROUTERS: Registry[type[Router]] = Registry("router")
FORMAT = "mtpeft-router"


def register_router(name: str):
    """Class decorator: ``@register_router("task_id")`` on a Router subclass."""

    return ROUTERS.register_class(name)


class Router(nn.Module):
    name: ClassVar[str] = ""
    per_site: ClassVar[bool] = False
    edits_output: ClassVar[bool] = False  # True: the bank calls site_output(layer, x, y, ctx) at every site
    # True: the router's state refers to modules by name only, so any change of the bank that keeps those
    # modules is fine (their ids are looked up again). False: its state was fitted to the bank as a whole
    # (e.g. a selector over every module): once the bank's modules change it must be refitted.
    follows_names: ClassVar[bool] = True

    def __init__(self, module_names: Sequence[str] | None = None):
        super().__init__()
        self.module_names: list[str] | None = list(module_names) if module_names is not None else None
        self.bound_names: list[str] | None = None  # the bank's modules when the router was last bound
        self._bound: tuple[str, int] | None = None  # (bank uid, bank version)
        self._ids: Tensor | None = None

    # ---- the two ways to route (a subclass implements one) -----------------------------------
    def route(self, bank, ctx: RouteContext) -> Routing | None:
        raise MtpeftError(f"router {self.name or type(self).__name__!r} routes per site (at_site), not per example")

    def at_site(self, site: str, x: Tensor, ctx: RouteContext) -> Routing | None:
        raise MtpeftError(f"router {self.name or type(self).__name__!r} routes per example (route), not per site")

    def forward(self, bank, ctx: RouteContext) -> Routing | None:
        return self.route(bank, ctx)

    # ---- following the bank ------------------------------------------------------------------
    def check_bank(self, bank) -> None:
        """Called by the bank when a scope opens: (re)bind to the bank if it changed since the last call."""
        if self._bound == (bank.uid, bank.version):
            return
        if not self.follows_names and self.bound_names is not None and self.bound_names != bank.names:
            raise MtpeftError(
                f"router {self.name!r} was fitted to a bank holding {self.bound_names}; the bank now holds "
                f"{bank.names} (version {bank.version}): refit the router on this bank, or route with one built for it")
        self.bind(bank)
        self.bound_names = list(bank.names)
        self._bound = (bank.uid, bank.version)

    def bind(self, bank) -> None:
        """Look up the ids of ``module_names`` (subclasses extend this to rebuild derived state)."""
        if self.module_names is None:
            self._ids = None
            return
        missing = [n for n in self.module_names if n not in bank]
        if missing:
            raise MtpeftError(f"router {self.name!r} routes to module(s) {missing} that the bank no longer holds "
                              f"(it has {bank.names or 'none'}); refit the router or build one over these modules")
        self._ids = bank.ids(self.module_names)

    def module_ids(self, device=None) -> Tensor:
        """Current bank ids of ``module_names`` (valid after ``check_bank``)."""
        if self._ids is None:
            raise MtpeftError(f"router {self.name!r} is not bound to a bank yet: route through bank.route(router)")
        return self._ids if device is None else self._ids.to(device)

    # ---- state -------------------------------------------------------------------------------
    def get_config(self) -> dict[str, Any]:
        """JSON-safe keyword arguments that rebuild this router (its tensors come from the state dict)."""
        return {"module_names": self.module_names}

    def save(self, path: str | Path) -> None:
        """Write ``router.json`` (name, config, bound modules) and ``router.safetensors`` (its state) to ``path``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        if tensors:
            write_tensors(path / "router.safetensors", tensors, metadata={"router": self.name})
        elif (path / "router.safetensors").exists():
            (path / "router.safetensors").unlink()
        write_json(path / "router.json", {"format": FORMAT, "name": self.name, "config": self.get_config(),
                                          "bound_names": self.bound_names, "tensors": sorted(tensors)})

    @classmethod
    def load(cls, path: str | Path) -> Router:
        """The router saved at ``path`` (any registered type; ``Router.load`` or the subclass). Every field of
        ``router.json`` and every tensor (names, shapes, kinds, finite values) is checked; nothing is cast."""
        from ..checks import check_like, dry_run, header_shapes

        path = Path(path)
        meta = read_json(path / "router.json", what="router config")
        if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("config"), dict) \
                or not isinstance(meta.get("name"), str):
            raise MtpeftError(f"{path / 'router.json'} is not an mtpeft router; save routers with router.save(dir)")
        for key in ("bound_names", "tensors"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise MtpeftError(f"{path / 'router.json'}: '{key}' must be a list of names, got {str(v)[:80]!r}; "
                                  "re-save the router")
        rcls = ROUTERS.get(meta["name"])
        if cls is not Router and not issubclass(rcls, cls):
            raise MtpeftError(f"{path} holds a {meta['name']!r} router, not a {cls.name!r} one")
        want = set(meta.get("tensors") or [])
        f = path / "router.safetensors"
        dry = dry_run(lambda: rcls(**meta["config"]))  # the state's shapes, before anything is allocated
        if dry is not None:
            saved = header_shapes(f, "router state") if want else {}
            if set(dry) != want or any(saved.get(k) != s for k, s in dry.items()):
                raise MtpeftError(f"{path}: router state holds {_shapes(saved)}, router {meta['name']!r} with this "
                                  f"config expects {_shapes(dry)}; re-save the router")
        try:
            router = rcls(**meta["config"])
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
            raise MtpeftError(f"{path / 'router.json'}: config does not fit router {meta['name']!r}: {e}") from e
        names = router.module_names
        if names is not None and not all(isinstance(n, str) for n in names):
            raise MtpeftError(f"{path / 'router.json'}: the router's module names must be strings, got "
                              f"{str(names)[:80]!r}; re-save the router")
        tensors = read_tensors(f, what="router state") if want else {}
        own = router.state_dict()
        if want != set(own):
            raise MtpeftError(f"{path}: router state lists {sorted(want)[:5]}, router {meta['name']!r} expects "
                              f"{sorted(own)[:5]}; re-save the router")
        check_like(tensors, own, f"router state of {path}", f)
        with torch.no_grad():
            router.load_state_dict(tensors)
        router.bound_names = meta.get("bound_names")
        return router


def _shapes(d: dict) -> str:
    return ", ".join(f"{k} {list(v)}" for k, v in sorted(d.items())[:5]) or "no tensors"
