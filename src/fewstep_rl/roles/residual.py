"""``ResidualStore``: zero-initialised additive adapters over an analytic base (toy2d, architecture.md §3).

Role ``r`` predicts ``base(x, σ, c) + Σ merged + Σ folds of r + a_r(x, σ, c)``: an adapter is any module
``a(x, σ, c)`` whose output starts at zero (toy2d's residual MLPs with a zero last layer), so every role starts
exactly equal to the base. A merge appends a frozen copy of the role's adapter to ``merged`` (the base every role
shares); a fold stores a frozen copy under ``folded[fold name]``, active under the fold's member roles (a fold
reserved before FSDP2 sharding is an all-zero adapter there, filled by parameter copies at fold time).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import ClassVar

import torch
from torch import nn

from fewstep_rl.roles.shards import all_zero
from fewstep_rl.roles.store import RoleStore


class ResidualStore(RoleStore):
    """Additive adapters over an analytic base (see the module docstring).

    Args:
        new_adapter: builds an adapter module (any initialisation; :func:`init_adapter` sets it).
        init_adapter: ``(adapter, role, reset count)`` → initialise in place so the adapter outputs zero,
            deterministically in (role, reset count).

    Attributes:
        adapters: role → its adapter.
        merged: frozen adapters folded into the shared base by merges.
        folded: frozen adapters folded into some roles' private bases, keyed by fold name.
    """

    kind: ClassVar[str] = "residual"

    def __init__(self, new_adapter: Callable[[], nn.Module], init_adapter: Callable[[nn.Module, str, int], None]):
        super().__init__(None)
        self.new_adapter, self.init_adapter = new_adapter, init_adapter
        self.adapters = nn.ModuleDict()
        self.merged = nn.ModuleList()
        self.folded = nn.ModuleDict()

    def _create(self, name: str, trainable: bool) -> None:
        self.adapters[name] = self.new_adapter()
        self.init_adapter(self.adapters[name], name, self._resets[name])
        self.adapters[name].requires_grad_(trainable)

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        """Every parameter of the role's adapter."""
        return list(self.adapters[name].parameters())

    def _reinit(self, name: str) -> None:
        self.init_adapter(self.adapters[name], name, self._resets[name])

    def _merge(self, name: str) -> None:
        if self._sharded():
            raise RuntimeError("merge_role is not supported once the backbone is sharded with FSDP2 (a merged adapter "
                               "is new state; fold_role with a reserved fold is)")
        self.merged.append(copy.deepcopy(self.adapters[name]).requires_grad_(False))

    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        self._refuse_new_fold_if_sharded(members)
        self.folded[fold_name] = copy.deepcopy(self.adapters[name]).requires_grad_(False)
        self._register_fold(fold_name)
        for r in members:
            self.reset(r)

    @torch.no_grad()
    def _fill_fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """Parameters of the empty fold ``fold_name`` ← ``name``'s adapter's (shard-local under FSDP2); reset."""
        for d, s in zip(self.folded[fold_name].parameters(), self.adapters[name].parameters(), strict=True):
            d.copy_(s)
        for r in members:
            self.reset(r)

    @torch.no_grad()
    def _reserve(self, fold_name: str) -> bool:
        """An empty fold: a new adapter with every parameter zero (output exactly zero), frozen."""
        adapter = self.new_adapter().requires_grad_(False)
        for p in adapter.parameters():
            p.zero_()
        self.folded[fold_name] = adapter
        self._register_fold(fold_name)
        return True

    def _fold_is_empty(self, fold_name: str) -> bool:
        return all_zero(self.folded[fold_name].parameters())

    def activate(self, role: str | None) -> list[nn.Module]:
        """The adapters whose outputs ``role`` adds to the base, in order: merged, the role's folds, its own."""
        self.active_role = role
        out = list(self.merged)
        if role is not None:
            out += [self.folded[f] for f in self.folds_of(role)]
            out.append(self.adapters[role])
        return out

    def prepare_load(self, state_dict: dict, prefix: str, base_prefix: str | None) -> None:
        """Create as many (frozen) merged and folded adapters as the incoming state dict holds."""
        head = prefix + "merged."
        idx = {int(k[len(head):].split(".", 1)[0]) for k in state_dict if k.startswith(head)}
        while len(self.merged) < (max(idx) + 1 if idx else 0):
            self.merged.append(self.new_adapter().requires_grad_(False))
        head = prefix + "folded."
        for name in sorted({k[len(head):].split(".", 1)[0] for k in state_dict if k.startswith(head)}):
            if name not in self.folded:
                if self._sharded():
                    raise RuntimeError(f"state dict has fold {name!r}, which this FSDP2-sharded backbone lacks (folds "
                                       f"here: {self.folds}; reserve it before sharding)")
                self.folded[name] = self.new_adapter().requires_grad_(False)
                self._register_fold(name)

    def networks(self) -> list[nn.Module]:
        """Each role's adapter, then the merged and folded ones (the analytic base has no network): each is called
        through its own ``forward``, so each is its own FSDP2 unit."""
        return [*self.adapters.values(), *self.merged, *self.folded.values()]
