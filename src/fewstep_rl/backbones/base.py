"""The backbone contract: one frozen base denoiser, text conditioning and decoding, owning a role store.

Flow convention everywhere (methods.md §1.1): ``x_σ = (1-σ)·x0 + σ·ε``, σ ∈ [0, 1], the network predicts the
velocity ``v ≈ ε - x0``. A backbone family implements only the model's inputs and outputs — ``_predict`` (one
forward of the network :meth:`RoleStore.activate` returns), ``encode_prompts``/``null_cond``, ``decode``/``encode``
— and owns a :class:`~fewstep_rl.roles.store.RoleStore` (attribute ``store``) over its base network. Everything
about roles (add, parameters, reset, merge, fold, which keys are checkpointed, what a state dict must create before
it loads) is the store's; the methods here delegate to it, so methods never see how a role is stored.

Role names ``"teacher"`` and ``"reference"`` (and ``None``) always mean the frozen base with every role off.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fewstep_rl.roles.snapshots import reshard
from fewstep_rl.roles.store import BASE_ROLES, RoleStore, parse_fold

__all__ = ["BASE_ROLES", "Backbone", "BackboneLoadError", "parse_fold"]


class BackboneLoadError(ValueError):
    """A backbone directory with a missing or mismatched component; the message names the file."""


class Backbone(nn.Module, ABC):
    """Frozen base denoiser + text conditioning + optional decoder, with named roles in ``store``.

    Subclasses set ``self.store`` in ``__init__`` (after registering their base network) and implement
    ``_predict`` (raw velocity for one role, no guidance) and the prompt encoding. Guidance (CFG against the null
    prompt) is implemented once here.

    Attributes:
        sample_shape: shape of one sample in the space the sampler works in (latents), without batch dim.
        store: the role store (its sub-module key prefix ``store.`` marks role state in state dicts).
    """

    sample_shape: tuple[int, ...]
    store: RoleStore

    def __init__(self) -> None:
        super().__init__()
        self.register_load_state_dict_pre_hook(self._before_load)

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

    def fsdp_units(self) -> Iterator[nn.Module]:
        """Sub-modules to wrap with ``fully_shard`` before the root (FSDP2); the backbone root is wrapped last."""
        return iter(())

    # ---------------------------------------------------------------- roles (delegated to the store)
    @property
    def roles(self) -> list[str]:
        """Role names in creation order."""
        return self.store.roles

    @property
    def trainable(self) -> dict[str, bool]:
        """Role → trainable (``False``: a snapshot)."""
        return self.store.trainable

    @property
    def folds(self) -> list[str]:
        """Fold adapters in creation order (see :meth:`RoleStore.fold`)."""
        return self.store.folds

    def add_role(self, name: str, trainable: bool = True) -> None:
        """Create role ``name`` equal to the current base (:meth:`RoleStore.add`)."""
        self.store.add(name, trainable)

    def role_parameters(self, name: str) -> list[nn.Parameter]:
        """The parameters that make up role ``name`` (its adapter, or its full copy)."""
        return self.store.role_parameters(name)

    def reset_role(self, name: str) -> None:
        """Re-initialise role ``name`` to equal the base again (:meth:`RoleStore.reset`)."""
        reshard(self)
        self.store.reset(name)

    def merge_role(self, name: str) -> None:
        """Fold role ``name`` into the base every role shares, then reset it (:meth:`RoleStore.merge`)."""
        reshard(self)
        self.store.merge(name)

    def fold_role(self, name: str, into: Sequence[str] = ()) -> None:
        """Fold role ``name`` into the private base of ``name`` and ``into`` (:meth:`RoleStore.fold`); under FSDP2
        this fills the fold reserved before sharding (:meth:`reserve_fold`)."""
        reshard(self)
        self.store.fold(name, into)

    def reserve_fold(self, name: str, into: Sequence[str] = ()) -> str | None:
        """Create, empty, the fold a later ``fold_role(name, into)`` fills (:meth:`RoleStore.reserve_fold`); call it
        before FSDP2 sharding."""
        return self.store.reserve_fold(name, into)

    def folds_of(self, role: str | None) -> list[str]:
        """The fold adapters active under ``role`` (its private base), in creation order."""
        return self.store.folds_of(role)

    def set_trainable(self, name: str, flag: bool) -> None:
        """Mark role ``name`` trainable (``requires_grad``) or frozen (a snapshot)."""
        self.store.set_trainable(name, flag)

    def is_role_key(self, key: str) -> bool:
        """Whether state-dict key ``key`` (relative to this module) is role state: the store's own state, or a key
        of the base network the store marks (LoRA layers; a full-copy base after a merge).

        Everything else is frozen base weight and never enters a checkpoint.
        """
        if key.startswith("store."):
            return True
        base = self._base_name()
        return base is not None and key.startswith(base + ".") and self.store.is_base_key(key[len(base) + 1:])

    def upgrade_state_dict(self, state_dict: dict, prefix: str = "") -> dict:
        """Rename, in place, role keys written before roles had their own store (``merged.*``, ``copies.*``,
        ``adapters.*``, ``folded.*``, ``base_merges`` directly under the backbone) to ``store.*``; returns it."""
        owned = set(self.store._modules) | set(self.store._buffers)
        legacy = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0] in owned
                  and k[len(prefix):].split(".", 1)[0] not in self._modules]
        for k in legacy:
            state_dict[prefix + "store." + k[len(prefix):]] = state_dict.pop(k)
        return state_dict

    def _base_name(self) -> str | None:
        """The attribute under which the store's base network is registered here (``"transformer"``)."""
        base = self.store.base
        return next((n for n, m in self.named_children() if m is base), None) if base is not None else None

    def _before_load(self, module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
        """Load pre-hook (runs before any sub-module loads): legacy keys, then the store's :meth:`prepare_load`."""
        self.upgrade_state_dict(state_dict, prefix)
        base = self._base_name()
        self.store.prepare_load(state_dict, prefix + "store.", prefix + base + "." if base else None)
