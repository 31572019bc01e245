"""``RoleStore``: named roles over one frozen base network (architecture.md §3).

A *role* is a named view of the backbone: ``generator``, ``fake_score``, ``surrogate`` … are trainable, ``ema``,
``old``, ``sampler`` … are snapshots (parameters of the same shape, blended on a schedule by
:mod:`fewstep_rl.roles.snapshots`). Every role starts exactly equal to the base. ``teacher``/``reference`` (and
``None``) always mean the base with every role off. A store owns the role state and nothing else: a backbone family
holds the base network and one store over it, and turns ``activate(role)`` into a prediction.

Stores (:func:`fewstep_rl.roles.build_store` picks one from the ``roles`` section):

* :class:`~fewstep_rl.roles.lora.LoraStore` — one peft LoRA adapter per role inside the shared base;
* :class:`~fewstep_rl.roles.full.FullCopyStore` — one full copy of the base per role;
* :class:`~fewstep_rl.roles.residual.ResidualStore` — zero-initialised additive adapters (toy2d's residual MLPs).

Two ways to make a role permanent (both part of the checkpoint):

* :meth:`RoleStore.merge` folds a role into the base *every* role and the teacher share (the teacher changes).
* :meth:`RoleStore.fold` folds a role into the private base of chosen roles only: a frozen copy of its adapter
  (a *fold*, named ``fold<k>__<role>__<role>…`` after the roles it serves) stays active under those roles, which
  restart from fresh zero-output adapters on top. The teacher and every other role are unchanged (RTDMD's stage
  boundary, methods.md §2). :meth:`RoleStore.reserve_fold` creates a fold's adapter early and empty (all zero: no
  effect), so that the fold itself only copies weights — the way folds work under FSDP2, where no adapter can be
  created after sharding (:mod:`fewstep_rl.roles.shards`).

State dict. The store is a sub-module of its backbone (attribute ``store``): everything it registers itself is role
state. A store that keeps role state *inside* the base (LoRA layers; a full-copy base after a merge) says so with
:meth:`RoleStore.is_base_key`. :meth:`RoleStore.prepare_load` runs before anything loads (the backbone's load
pre-hook) and creates what the incoming state dict names (folds, merge records).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from fewstep_rl.roles.shards import any_sharded

BASE_ROLES = ("teacher", "reference")
_FOLD = re.compile(r"^fold(\d+)__([A-Za-z0-9_]+)$")


def parse_fold(name: str) -> tuple[int, tuple[str, ...]] | None:
    """``(index, member roles)`` of a fold adapter name ``fold<k>__<role>__<role>…``; ``None`` for other names."""
    m = _FOLD.match(name)
    if m is None:
        return None
    return int(m.group(1)), tuple(m.group(2).split("__"))


class RoleStore(nn.Module, ABC):
    """Named roles over one frozen base network (see the module docstring).

    Subclasses implement ``_create``, ``_parameters_of``, ``_reinit``, ``_merge``, ``_fold`` and :meth:`activate`;
    the bookkeeping (names, trainable flags, folds, reset counts, checks) is here.

    Args:
        base: the frozen base network, registered by the backbone that owns it (the store keeps a reference only,
            so the base's state-dict keys stay the backbone's); ``None`` for an analytic base (toy2d).

    Attributes:
        kind: ``"lora"``, ``"full"`` or ``"residual"``.
        roles: role names in creation order.
        active_role: the role the last :meth:`activate` made active (``None``: the bare base).
        trainable: role → trainable (``False``: a snapshot).
        folds: fold adapters in creation order.
    """

    kind: ClassVar[str] = "store"

    def __init__(self, base: nn.Module | None) -> None:
        super().__init__()
        object.__setattr__(self, "_base", base)  # a reference, not a sub-module
        self.roles: list[str] = []
        self.trainable: dict[str, bool] = {}
        self.folds: list[str] = []
        self._resets: dict[str, int] = {}
        self.active_role: str | None = None  # the role of the last :meth:`activate` (activation checkpointing)

    @property
    def base(self) -> nn.Module | None:
        """The frozen base network (``None`` for an analytic base)."""
        return self._base

    # ---------------------------------------------------------------- public API
    def add(self, name: str, trainable: bool = True) -> None:
        """Create role ``name`` equal to the current base (a zero-output adapter, or a full copy)."""
        if name in BASE_ROLES:
            raise ValueError(f"role name {name!r} is reserved for the frozen base")
        if name in self.roles:
            raise ValueError(f"role {name!r} already exists")
        if "__" in name or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"role names are letters, digits and single underscores; got {name!r}")
        self.roles.append(name)
        self.trainable[name] = trainable
        self._resets[name] = 0
        self._create(name, trainable)

    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that make up role ``name`` (its adapter, or its full copy), in a fixed order."""
        self._check_role(name)
        return self._parameters_of(name)

    def reset(self, name: str) -> None:
        """Role ``name`` equal to the base again (a fresh adapter seeded by (role, reset count); or a fresh copy)."""
        self._check_role(name)
        self._resets[name] += 1
        self._reinit(name)

    def merge(self, name: str) -> None:
        """Fold role ``name`` into the base every role shares (the base now equals that role), then reset it.

        Other roles keep their adapters, now on top of the merged base; the teacher/reference *is* the merged base.
        The merge is part of the checkpoint, so a resumed run rebuilds the same base.

        Raises:
            KeyError: for an unknown role.
            ValueError: if the role sits on folds.
        """
        self._check_role(name)
        if self.folds_of(name):
            raise ValueError(f"merge_role: role {name!r} sits on folds {self.folds_of(name)}; merging it is not "
                             "supported")
        self._merge(name)
        self.reset(name)

    def fold(self, name: str, into: Sequence[str] = ()) -> None:
        """Fold role ``name`` into the private base of ``name`` and the roles ``into``; reset them to zero output.

        Afterwards each of those roles computes exactly what ``name`` computed before, with a fresh zero-output
        trainable adapter on top; the teacher and every other role are unchanged. The folded roles must share
        ``name``'s current folds (e.g. a generator and its EMA). Full copies have no adapter to freeze: ``into``
        roles become copies of ``name``.

        A fold reserved for exactly these roles (:meth:`reserve_fold`) that is still empty (every weight zero) is
        filled in place — shard-local copies under FSDP2; otherwise a new fold adapter is created, which is not
        possible once the backbone is sharded (full copies create nothing and fold sharded as they are).

        Raises:
            KeyError: for an unknown role.
            ValueError: if a role in ``into`` sits on different folds than ``name``.
            RuntimeError: under FSDP2 sharding, when a new fold adapter would be needed (no empty reserved one).
        """
        members = self._fold_members(name, into)
        for f in self.folds:
            if parse_fold(f)[1] == members and self._fold_is_empty(f):  # type: ignore[index]
                self._fill_fold(name, members, f)
                return
        self._fold(name, members, f"fold{len(self.folds)}__" + "__".join(members))

    def reserve_fold(self, name: str, into: Sequence[str] = ()) -> str | None:
        """Create now, empty, the fold a later :meth:`fold` of ``name`` into ``into`` will fill; returns its name.

        An empty fold is a frozen adapter whose weights are all zero: it is active under its roles at once but adds
        exactly zero to their outputs (and gradients), so a role computes bit for bit what it computed before. Its
        weights are part of the state dict (zeros until filled). This is how a fold works under FSDP2: the adapter
        exists before ``fully_shard``, and the fold itself is a shard-local copy (:mod:`fewstep_rl.roles.shards`).
        Stores whose folds create nothing (full copies) return ``None``.

        Raises:
            KeyError / ValueError: as :meth:`fold`; RuntimeError once sharded.
        """
        members = self._fold_members(name, into)
        if self._sharded():
            raise RuntimeError("reserve_fold: the backbone is already sharded with FSDP2 (reserve folds before "
                               "fully_shard)")
        fold_name = f"fold{len(self.folds)}__" + "__".join(members)
        return fold_name if self._reserve(fold_name) else None

    @abstractmethod
    def activate(self, role: str | None) -> Any:
        """Make ``role`` (``None``: the bare base) the one the next forward computes; returns what to call.

        ``LoraStore``/``FullCopyStore``: the network to call in place of the base. ``ResidualStore``: the adapters
        whose outputs the role adds to the base's, in order.
        """

    def set_trainable(self, name: str, flag: bool) -> None:
        """Mark role ``name`` trainable (``requires_grad``) or frozen (a snapshot)."""
        self.trainable[name] = flag
        for p in self.role_parameters(name):
            p.requires_grad_(flag)

    def folds_of(self, role: str | None) -> list[str]:
        """The fold adapters active under ``role`` (its private base), in creation order."""
        if role is None or role in BASE_ROLES:
            return []
        return [f for f in self.folds if role in parse_fold(f)[1]]  # type: ignore[index]

    def is_base_key(self, key: str) -> bool:
        """Whether ``key`` of the *base network's* state dict is role state (checkpointed); default: never."""
        return False

    def prepare_load(self, state_dict: dict, prefix: str, base_prefix: str | None) -> None:  # noqa: B027
        """Load pre-hook, before anything loads: create what ``state_dict`` names and this store lacks.

        Args:
            state_dict: the whole incoming state dict (may be edited in place).
            prefix: this store's key prefix in it (``"…store."``).
            base_prefix: the base network's key prefix (``"…transformer."``), or ``None``.
        """

    def networks(self) -> list[nn.Module]:
        """Every network a forward may run: the base and any full copies (for FSDP units and compilation)."""
        return [self.base] if self.base is not None else []

    def wraps_base(self) -> bool:
        """Whether the base network holds role layers (then :meth:`base_state_dict` differs from its state dict)."""
        return False

    def base_state_dict(self) -> dict[str, Tensor]:
        """The base's weights (merges folded in) under the names of the plain model, for export."""
        return self.base.state_dict() if self.base is not None else {}

    def role_state_dict(self, role: str) -> dict[str, Tensor]:
        """The plain base network's state dict with role ``role`` folded in: what a plain model (no adapters) loads
        to compute that role — a merged export. Stores without a base network raise."""
        raise NotImplementedError(f"{type(self).__name__} has no base network to export")

    # ---------------------------------------------------------------- for subclasses
    @abstractmethod
    def _create(self, name: str, trainable: bool) -> None:
        """Storage for the new role ``name`` (already registered), equal to the base."""

    @abstractmethod
    def _parameters_of(self, name: str) -> list[nn.Parameter]:
        """Role ``name``'s parameters (``name`` is known)."""

    @abstractmethod
    def _reinit(self, name: str) -> None:
        """Make role ``name`` equal to the base again (its reset count is already incremented)."""

    @abstractmethod
    def _merge(self, name: str) -> None:
        """Fold role ``name`` into the shared base (it is reset afterwards by :meth:`merge`)."""

    @abstractmethod
    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """Freeze ``name``'s adapter as ``fold_name`` under ``members`` and reset them (see :meth:`fold`)."""

    def _reserve(self, fold_name: str) -> bool:
        """Create the empty (all-zero, frozen) fold adapter ``fold_name`` and register it; ``False``: nothing to
        create (the store's folds are copies)."""
        return False

    def _fold_is_empty(self, fold_name: str) -> bool:
        """Whether every weight of fold ``fold_name`` is zero (a collective under FSDP2)."""
        return False

    def _fill_fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        """Copy ``name``'s adapter into the existing empty fold ``fold_name`` and reset ``members``."""
        raise NotImplementedError(f"{type(self).__name__} has no fold adapters to fill")

    def _check_role(self, name: str) -> None:
        if name not in self.roles:
            raise KeyError(f"unknown role {name!r}; this backbone has roles {self.roles}")

    def _fold_members(self, name: str, into: Sequence[str]) -> tuple[str, ...]:
        if isinstance(into, str):
            into = (into,)
        members = tuple(dict.fromkeys([name, *into]))
        for r in members:
            if r not in self.roles:
                raise KeyError(f"fold_role: unknown role {r!r}; this backbone has roles {self.roles}")
        for r in members:
            if self.folds_of(r) != self.folds_of(name):
                raise ValueError(
                    f"fold_role: role {r!r} sits on folds {self.folds_of(r)} but {name!r} on {self.folds_of(name)}; "
                    "only roles with the same private base can share a fold"
                )
        return members

    def _sharded(self) -> bool:
        """Whether FSDP2 has sharded the role state (some role parameter is a ``DTensor``)."""
        return any(any_sharded(self._parameters_of(r)) for r in self.roles)

    def _refuse_new_fold_if_sharded(self, members: tuple[str, ...]) -> None:
        """For stores whose fold creates an adapter: that is impossible once FSDP2 sharded the backbone."""
        if self._sharded():
            raise RuntimeError(
                f"fold_role: no empty fold reserved for roles {list(members)} and the backbone is sharded with FSDP2 "
                "(a new fold adapter cannot be created after sharding: reserve it before, RoleStore.reserve_fold / "
                "FewStepMethod.planned_folds)")

    def _register_fold(self, fold_name: str) -> None:
        """Record a fold adapter (at fold time or when a checkpoint brings one)."""
        parsed = parse_fold(fold_name)
        if parsed is None:
            raise ValueError(f"not a fold adapter name: {fold_name!r}")
        if fold_name not in self.folds:
            self.folds.append(fold_name)
            self.folds.sort(key=lambda f: parse_fold(f)[0])  # type: ignore[index]
