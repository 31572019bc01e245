"""The backbone contract: one frozen base denoiser plus named, trainable *role adapters* over it.

Flow convention everywhere (methods.md §1.1): ``x_σ = (1-σ)·x0 + σ·ε``, σ ∈ [0, 1], the network predicts the
velocity ``v ≈ ε - x0``. A backbone family implements the adapter mechanics (peft LoRA for diffusers models,
residual MLPs for the analytic toy2d teacher, or full copies); :mod:`fewstep_rl.roles` builds the named roles
(generator, fake_score, surrogate, ema, old, sampler …) on top of these primitives, so methods never see how a
role is stored.

Role names ``"teacher"`` and ``"reference"`` (and ``None``) always mean the frozen base with every adapter off.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

BASE_ROLES = ("teacher", "reference")


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
        self.roles.append(name)
        self.trainable[name] = trainable

    def set_trainable(self, name: str, flag: bool) -> None:
        """Mark role ``name`` trainable (``requires_grad``) or frozen (a snapshot)."""
        self.trainable[name] = flag
        for p in self.role_parameters(name):
            p.requires_grad_(flag)
