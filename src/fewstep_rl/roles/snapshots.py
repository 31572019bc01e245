"""Trainable roles and parameter snapshots over a backbone: creation, copies, blending, EMA (methods.md §1.6).

A *role* is a named view of the backbone (architecture.md §3): ``generator``, ``fake_score``, ``surrogate`` are
trainable (peft LoRA on diffusers models, residual MLPs in toy2d, or full copies with ``roles.mode: full``),
zero-initialised so each starts equal to the teacher; ``teacher``/``reference`` is the frozen base with every role
off; ``ema``, ``old`` and ``sampler`` are *snapshots* — roles of the same shape whose parameters are copies of
another role, updated by blending on a schedule.

Everything here works on ``backbone.add_role`` / ``backbone.role_parameters``, so it is the same for every backbone
family and every store.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import torch


class Backbone(Protocol):
    """What this module needs of a backbone (:class:`fewstep_rl.backbones.base.Backbone` has it)."""

    @property
    def roles(self) -> list[str]: ...

    def add_role(self, name: str, trainable: bool = True) -> None: ...

    def role_parameters(self, name: str) -> list[torch.nn.Parameter]: ...


def add_roles(backbone: Backbone, trainable: Iterable[str], snapshots: dict[str, str] | None = None) -> None:
    """Create trainable roles, then snapshot roles initialised as copies of their source role.

    Args:
        backbone: the shared backbone.
        trainable: names of trainable roles (each gets its own zero-output adapter).
        snapshots: ``{snapshot_name: source_role}``, e.g. ``{"ema": "generator"}``.
    """
    for name in trainable:
        backbone.add_role(name, trainable=True)
    for name, source in (snapshots or {}).items():
        backbone.add_role(name, trainable=False)
        copy_role(backbone, name, source)


@torch.no_grad()
def copy_role(backbone: Backbone, dst: str, src: str) -> None:
    """``θ_dst ← θ_src`` parameter by parameter."""
    for d, s in zip(_params(backbone, dst), _params(backbone, src), strict=True):
        d.copy_(s)


@torch.no_grad()
def blend_role(backbone: Backbone, dst: str, src: str, decay: float) -> None:
    """Snapshot blending ``θ_dst ← d·θ_dst + (1−d)·θ_src`` (methods.md §1.6)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"blend decay must lie in [0, 1], got {decay}")
    for d, s in zip(_params(backbone, dst), _params(backbone, src), strict=True):
        d.lerp_(s, 1.0 - decay)


def _params(backbone: Backbone, name: str) -> list[torch.Tensor]:
    reshard(backbone)
    params = backbone.role_parameters(name)
    if not params:
        raise KeyError(f"role {name!r} has no parameters; roles: {backbone.roles}")
    return params


def reshard(backbone: Backbone) -> None:
    """Under FSDP2, put every sharded module of ``backbone`` back in its sharded state first.

    FSDP2 leaves the module used last in a forward (the root in particular) unsharded: its parameters are then
    plain full tensors while the other roles' are ``DTensor`` shards, and a copy/blend between them fails (or
    writes into a gathered copy that the next reshard drops). Resharded, every role is a ``DTensor`` with the same
    placements and the in-place ops act on the local shards. A no-op without FSDP2.
    """
    modules = getattr(backbone, "modules", None)
    if modules is None:
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return
    for m in modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def warmup_decay(n: int, decay: float) -> float:
    """Parameter-EMA decay with warm-up ``d_n = min((1+n)/(10+n), d)`` (methods.md §1.6)."""
    return min((1.0 + n) / (10.0 + n), decay)


def schedule_decay(n: int, d0: float, kappa: float = 0.0, n0: int = 0, d_max: float = 1.0) -> float:
    """Step-dependent snapshot decay ``d(n) = min(d0 + κ (n − n0)_+, d_max)`` (methods.md §1.6, NFT/CRD)."""
    return min(d0 + kappa * max(n - n0, 0), d_max)


@dataclass
class EMA:
    """EMA of a role into a snapshot role.

    Attributes:
        target: snapshot role name (e.g. ``"ema"``).
        source: role it follows (e.g. ``"generator"``).
        decay: ``d`` in ``θ̄ ← d θ̄ + (1−d) θ``; 0 copies.
        every: update every ``every`` calls of :meth:`update`.
        warmup: use the ``min((1+n)/(10+n), d)`` warm-up (parameter-level EMA) instead of a constant decay, with
            ``n`` the source role's optimisation step (not the count of EMA updates), as Flow-GRPO's
            ``EMAModuleWrapper.step(params, optimization_step)``: with ``every = 8`` the warm-up ends after ~8× fewer
            EMA updates than a count of updates would give.
    """

    target: str = "ema"
    source: str = "generator"
    decay: float = 0.99
    every: int = 1
    warmup: bool = False

    def update(self, backbone: Backbone, n: int) -> None:
        """Call after the ``n``-th (0-based) update of the source role."""
        if (n + 1) % self.every:
            return
        d = warmup_decay(n, self.decay) if self.warmup else self.decay
        blend_role(backbone, self.target, self.source, d)
