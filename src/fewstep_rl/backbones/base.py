"""The backbone contract: one frozen base denoiser plus named, trainable *role adapters* over it.

Flow convention everywhere (methods.md §1.1): ``x_σ = (1-σ)·x0 + σ·ε``, σ ∈ [0, 1], the network predicts the
velocity ``v ≈ ε - x0``. A backbone family implements the adapter mechanics (peft LoRA for diffusers models,
residual MLPs for the analytic toy2d teacher, or full copies); :mod:`fewstep_rl.roles` builds the named roles
(generator, fake_score, surrogate, ema, old, sampler …) on top of these primitives, so methods never see how a
role is stored.

Role names ``"teacher"`` and ``"reference"`` (and ``None``) always mean the frozen base with every adapter off.

Two ways to make an adapter permanent (both part of the checkpoint):

* :meth:`Backbone.merge_role` folds a role into the base *every* role and the teacher share (the teacher changes).
* :meth:`Backbone.fold_role` folds a role into the private base of chosen roles only: a frozen copy of its adapter
  (a *fold*, named ``fold<k>__<role>__<role>…`` after the roles it serves) stays active under those roles, which
  restart from fresh zero-output adapters on top. The teacher and every other role are unchanged. This is RTDMD's
  "merge the stage-1 adapters into the base and start fresh ones" (methods.md §2) when the generator, the fake score
  and the teacher are separate networks in the paper but roles over one base here.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BASE_ROLES = ("teacher", "reference")
_FOLD = re.compile(r"^fold(\d+)__([A-Za-z0-9_]+)$")


def parse_fold(name: str) -> tuple[int, tuple[str, ...]] | None:
    """``(index, member roles)`` of a fold adapter name ``fold<k>__<role>__<role>…``; ``None`` for other names."""
    m = _FOLD.match(name)
    if m is None:
        return None
    return int(m.group(1)), tuple(m.group(2).split("__"))


class BackboneLoadError(ValueError):
    """A backbone directory with a missing or mismatched component; the message names the file."""


class Backbone(nn.Module, ABC):
    """Frozen base denoiser + text conditioning + optional decoder, with named role adapters.

    Subclasses implement ``_predict`` (raw velocity for one role, no guidance), the adapter primitives and the
    prompt encoding. Guidance (CFG against the null prompt) is implemented once here.

    Attributes:
        sample_shape: shape of one sample in the space the sampler works in (latents), without batch dim.
        roles: names of the adapters created so far, in creation order.
    """

    sample_shape: tuple[int, ...]

    def __init__(self) -> None:
        super().__init__()
        self.roles: list[str] = []
        self.trainable: dict[str, bool] = {}
        self.folds: list[str] = []  # fold adapters in creation order (see fold_role)

    # ---------------------------------------------------------------- prediction
    def velocity(
        self, x: Tensor, sigma: Tensor | float, cond: Any, role: str | None = "generator", guidance: float = 1.0
    ) -> Tensor:
        """Velocity of ``role`` at ``(x, σ)`` given ``cond``; ``guidance > 1`` applies CFG with the null prompt.

        ``v^ω = v(·, ∅) + ω (v(·, c) − v(·, ∅))`` (methods.md §1.1). ``sigma`` is a float or a ``(B,)`` tensor.

        Shapes:
            x: (B, *sample_shape); sigma: () or (B,); returns (B, *sample_shape).
        """
        sigma = self._sigma_batch(sigma, x)
        if role in BASE_ROLES:
            role = None
        elif role is not None and role not in self.roles:
            raise KeyError(f"unknown role {role!r}; this backbone has roles {['teacher', *self.roles]}")
        if guidance == 1.0:
            return self._predict(x, sigma, cond, role)
        null = self.null_cond(x.shape[0])
        both = self._predict(torch.cat([x, x]), torch.cat([sigma, sigma]), self.cat_cond(cond, null), role)
        v_c, v_u = both.chunk(2)
        return v_u + guidance * (v_c - v_u)

    @staticmethod
    def _sigma_batch(sigma: Tensor | float, x: Tensor) -> Tensor:
        if not torch.is_tensor(sigma):
            sigma = torch.tensor(float(sigma), dtype=x.dtype, device=x.device)
        sigma = sigma.to(device=x.device, dtype=x.dtype)
        if sigma.dim() == 0:
            sigma = sigma.expand(x.shape[0])
        return sigma.reshape(x.shape[0])

    @abstractmethod
    def _predict(self, x: Tensor, sigma: Tensor, cond: Any, role: str | None) -> Tensor:
        """Raw velocity of ``role`` (``None`` = frozen base) without guidance."""

    # ---------------------------------------------------------------- conditioning / decoding
    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str]) -> Any:
        """Conditioning for a list of prompts (no grad; frozen encoders)."""

    @abstractmethod
    def null_cond(self, n: int) -> Any:
        """Conditioning of the empty prompt ``""`` for ``n`` samples (cached)."""

    def cat_cond(self, a: Any, b: Any) -> Any:
        """Concatenate two conditionings along the batch (tensors, or tuples/dicts of tensors)."""
        if torch.is_tensor(a):
            return torch.cat([a, b])
        if isinstance(a, dict):
            return {k: self.cat_cond(a[k], b[k]) for k in a}
        if isinstance(a, (tuple, list)):
            return type(a)(self.cat_cond(u, w) for u, w in zip(a, b))
        raise TypeError(f"cannot concatenate conditioning of type {type(a).__name__}")

    def decode(self, x: Tensor) -> Tensor:
        """Differentiable map from sampler space to reward space (images in [0, 1]); identity by default."""
        return x

    def encode(self, images: Tensor) -> Tensor:
        """Inverse of :meth:`decode` (reward space → sampler space); identity by default."""
        return images

    # ---------------------------------------------------------------- adapters (role storage)
    @abstractmethod
    def add_role(self, name: str, trainable: bool = True) -> None:
        """Create adapter ``name`` initialised so that the role equals the current base (zero output)."""

    @abstractmethod
    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that make up role ``name`` (its adapter, or its full copy)."""

    @abstractmethod
    def reset_role(self, name: str) -> None:
        """Re-initialise role ``name`` to equal the base again (fresh zero-output adapter)."""

    @abstractmethod
    def merge_role(self, name: str) -> None:
        """Fold role ``name`` into the base (the base now equals that role), then reset that role to zero output.

        Other roles keep their adapters, now on top of the merged base. After a merge the teacher/reference is the
        *merged* base; methods that need the original teacher keep it as a separate role before merging. The
        merged deltas are part of the checkpoint (see ``is_role_key``), so a resumed run rebuilds the same base.
        """

    def fold_role(self, name: str, into: Sequence[str] = ()) -> None:
        """Fold role ``name`` into the private base of ``name`` and the roles ``into``; reset them to zero output.

        Afterwards each of those roles computes exactly what ``name`` computed before (its base now includes a frozen
        copy of ``name``'s adapter, a *fold*), with a fresh zero-output trainable adapter on top; the teacher and
        every other role are unchanged. The folded roles must share ``name``'s current folds (e.g. a generator and
        its EMA). Full-copy roles have no adapter to freeze: ``into`` roles become copies of ``name``.

        Raises:
            KeyError: for an unknown role.
            ValueError: if a role in ``into`` sits on different folds than ``name``.
        """
        members = self._fold_members(name, into)
        self._fold(name, members, f"fold{len(self.folds)}__" + "__".join(members))

    def _fold(self, name: str, members: tuple[str, ...], fold_name: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} does not support fold_role")

    def folds_of(self, role: str | None) -> list[str]:
        """The fold adapters active under ``role`` (its private base), in creation order."""
        if role is None or role in BASE_ROLES:
            return []
        return [f for f in self.folds if role in parse_fold(f)[1]]  # type: ignore[index]

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
        if any(hasattr(p, "device_mesh") for r in members for p in self.role_parameters(r)):
            raise RuntimeError("fold_role is not supported once the backbone is sharded with FSDP2 (fold before "
                               "sharding, or keep training the adapters — RTDMD: method.merge_at_boundary false)")
        return members

    def _register_fold(self, fold_name: str) -> None:
        """Record a fold adapter created by a family (at fold time or when a checkpoint brings one)."""
        parsed = parse_fold(fold_name)
        if parsed is None:
            raise ValueError(f"not a fold adapter name: {fold_name!r}")
        if fold_name not in self.folds:
            self.folds.append(fold_name)
            self.folds.sort(key=lambda f: parse_fold(f)[0])  # type: ignore[index]

    @abstractmethod
    def is_role_key(self, key: str) -> bool:
        """Whether state-dict key ``key`` (relative to this module) belongs to a role or a merged delta.

        Everything else is frozen base weight and never enters a checkpoint.
        """

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Sub-modules to wrap with ``fully_shard`` before the root (FSDP2); the backbone root is wrapped last."""
        return iter(())

    # ---------------------------------------------------------------- helpers shared by every family
    def _register(self, name: str, trainable: bool) -> None:
        if name in BASE_ROLES:
            raise ValueError(f"role name {name!r} is reserved for the frozen base")
        if name in self.roles:
            raise ValueError(f"role {name!r} already exists")
        if "__" in name or not re.fullmatch(r"[A-Za-z0-9_]+", name):
            raise ValueError(f"role names are letters, digits and single underscores; got {name!r}")
        self.roles.append(name)
        self.trainable[name] = trainable

    def set_trainable(self, name: str, flag: bool) -> None:
        """Mark role ``name`` trainable (``requires_grad``) or frozen (a snapshot)."""
        self.trainable[name] = flag
        for p in self.role_parameters(name):
            p.requires_grad_(flag)
