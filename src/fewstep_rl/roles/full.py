"""``FullCopyStore``: one full copy of the base network per role (``roles.mode: full``, architecture.md §3).

A role is a deep copy of the base (so it starts exactly equal to it) in ``copies``; every parameter of the copy is
the role's. A merge copies the role into the base, which from then on is role state (part of the checkpoint,
``base_merges > 0``); a fold copies the role into the other member roles (a full copy has no adapter to freeze, so
no fold is recorded).
"""

from __future__ import annotations

import copy
from typing import ClassVar

import torch
from torch import Tensor, nn

from fewstep_rl.roles.store import RoleStore


class FullCopyStore(RoleStore):
    """Full copies of ``base`` per role (see the module docstring).

    Attributes:
        copies: role → its copy of the base network.
        base_merges: number of merges copied into the base so far (a persistent buffer).
    """

    kind: ClassVar[str] = "full"

    def __init__(self, base: nn.Module) -> None:
        super().__init__(base)
        self.copies = nn.ModuleDict()
        self.register_buffer("base_merges", torch.zeros((), dtype=torch.long))

    def _create(self, name: str, trainable: bool) -> None:
        self.copies[name] = copy.deepcopy(self.base).requires_grad_(trainable)

    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        """Every parameter of the role's copy."""
        return list(self.copies[name].parameters())

    @torch.no_grad()
    def _reinit(self, name: str) -> None:
        for d, s in zip(self.copies[name].parameters(), self.base.parameters(), strict=True):
            d.copy_(s)

    @torch.no_grad()
    def _merge(self, name: str) -> None:
        for d, s in zip(self.base.parameters(), self.copies[name].parameters(), strict=True):
            d.copy_(s)
        self.base_merges += 1

    @torch.no_grad()
    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """Members ← copies of ``name`` (nothing to freeze; ``name`` itself is unchanged)."""
        for r in members:
            if r != name:
                for d, s in zip(self.copies[r].parameters(), self.copies[name].parameters(), strict=True):
                    d.copy_(s)

    def activate(self, role: str | None) -> nn.Module:
        """The role's copy (``None``: the base)."""
        self.active_role = role
        return self.base if role is None else self.copies[role]

    def is_base_key(self, key: str) -> bool:
        """The base is role state once a role was merged into it."""
        return bool(self.base_merges > 0)

    def role_state_dict(self, role: str) -> dict[str, Tensor]:
        """The role's copy's state dict (detached clones)."""
        self._check_role(role)
        return {k: v.detach().clone() for k, v in self.copies[role].state_dict().items()}

    def networks(self) -> list[nn.Module]:
        """The base, then every copy in role order."""
        return [self.base, *self.copies.values()]
