"""Optimiser settings of a method: one typed sub-config, ``method.optim``, in every method.

Every trainable role (``generator``, ``fake_score``, ``surrogate``, ...) gets its own AdamW optimiser
(:meth:`fewstep_rl.method.FewStepMethod.configure_optimizers`). :class:`OptimConfig` holds what the roles share —
learning rate, schedule, AdamW betas and weight decay, gradient-norm clip — and ``roles`` the per-role overrides
(:class:`RoleOptim`; a field left ``null`` inherits the shared value)::

    method:
      optim:
        lr: 3.0e-4
        adam_betas: [0.0, 0.999]
        roles:
          generator: {lr: 7.5e-5}
          surrogate: {adam_betas: [0.9, 0.999]}

A method declares its own defaults (``optim: OptimConfig = knob(factory=lambda: OptimConfig(...))``), and a config's
``optim`` mapping is merged over the method's default, not over the class defaults below
(:func:`fewstep_rl.config.build`): setting only ``method.optim.lr`` keeps the method's betas, clip and role overrides.
Every ``roles`` key must be one of the method's trainable roles: :func:`check_optim_roles`, called once for every
method by :func:`fewstep_rl.run.resolve`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from fewstep_rl.config import closest, knob


def _check_betas(betas: Sequence[float] | None, name: str) -> None:
    if betas is None:
        return
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(f"{name} takes two numbers in [0, 1) (AdamW's beta1, beta2), got {list(betas)}")


def _check_weight_decay(wd: float | None, name: str) -> None:
    if wd is not None and not 0.0 <= wd < math.inf:
        raise ValueError(f"{name} must be a finite number >= 0, got {wd}")


@dataclass
class RoleOptim:
    """Overrides of :class:`OptimConfig` for one trainable role; ``null`` inherits the shared value."""

    lr: float | None = knob(None, "learning rate of this role (null: optim.lr)")
    adam_betas: list[float] | None = knob(None, "AdamW betas of this role (null: optim.adam_betas)")
    weight_decay: float | None = knob(None, "AdamW weight decay of this role (null: optim.weight_decay)")

    def __post_init__(self) -> None:
        _check_betas(self.adam_betas, "adam_betas")
        _check_weight_decay(self.weight_decay, "weight_decay")


@dataclass
class OptimConfig:
    """AdamW settings shared by a method's trainable roles, with per-role overrides in ``roles``.

    The class defaults serve a plugin method that takes ``knob(factory=OptimConfig)``; every method in ``methods/``
    gives its own.
    """

    lr: float = knob(1e-3, "learning rate of every trainable role (roles.<role>.lr overrides it)")
    lr_schedule: Literal["constant", "cosine"] = knob(
        "constant", "learning-rate schedule: constant, or cosine from lr down to 0 at trainer.max_steps"
    )
    adam_betas: list[float] = knob([0.9, 0.999], "AdamW betas (beta1, beta2), each in [0, 1)")
    weight_decay: float = knob(0.0, "AdamW (decoupled) weight decay")
    grad_clip: float = knob(1.0, "gradient-norm clip of every role (0 = off)")
    roles: dict[str, RoleOptim] = knob(
        help="per-role overrides {lr, adam_betas, weight_decay} keyed by trainable role (generator, fake_score, "
        "surrogate, ...); unset fields inherit the values above",
        factory=dict,
    )

    def __post_init__(self) -> None:
        _check_betas(self.adam_betas, "adam_betas")
        _check_weight_decay(self.weight_decay, "weight_decay")
        if not 0.0 <= self.grad_clip < math.inf:
            raise ValueError(f"grad_clip must be a finite number >= 0 (0 = off), got {self.grad_clip}")

    def role(self, role: str) -> RoleOptim:
        """The overrides of ``role`` (all ``None`` when it has none)."""
        return self.roles.get(role) or RoleOptim()

    def lr_of(self, role: str) -> float:
        """Learning rate of ``role``: ``roles.<role>.lr``, else ``lr``."""
        lr = self.role(role).lr
        return float(self.lr if lr is None else lr)

    def betas_of(self, role: str) -> tuple[float, float]:
        """AdamW betas of ``role``: ``roles.<role>.adam_betas``, else ``adam_betas``."""
        betas = self.role(role).adam_betas
        b1, b2 = self.adam_betas if betas is None else betas
        return float(b1), float(b2)

    def weight_decay_of(self, role: str) -> float:
        """AdamW weight decay of ``role``: ``roles.<role>.weight_decay``, else ``weight_decay``."""
        wd = self.role(role).weight_decay
        return float(self.weight_decay if wd is None else wd)

    def check_roles(self, allowed: Sequence[str], where: str = "optim") -> None:
        """Raise ``ValueError`` (one line) when ``roles`` names a role outside ``allowed`` (the trainable roles)."""
        for name in self.roles:
            if name not in allowed:
                best = closest(name, list(allowed))
                hint = f"; did you mean '{best}'?" if best else ""
                raise ValueError(
                    f"{where}.roles.{name}: not a trainable role of this method{hint} (roles: {', '.join(allowed)})"
                )


def renamed_flat_keys(*roles: str) -> dict[str, str]:
    """``RENAMED`` entries (:func:`fewstep_rl.config.renamed_message`) of the flat optimiser keys a method config had
    before ``optim``: ``lr``, ``lr_schedule``, ``adam_betas``, ``weight_decay``, ``grad_clip`` and ``lr_<role>`` of
    each of ``roles``."""
    flat = {k: f"optim.{k}" for k in ("lr", "lr_schedule", "adam_betas", "weight_decay", "grad_clip")}
    return {**flat, **{f"lr_{r}": f"optim.roles.{r}.lr" for r in roles}}


def check_optim_roles(cfg: object, roles: Sequence[str]) -> None:
    """:meth:`OptimConfig.check_roles` for every ``OptimConfig`` field of the method config ``cfg`` (``optim``, rtdmd's
    ``optim_stage2``), against the method's trainable ``roles``; raises ``ValueError`` naming the field."""
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        value = getattr(cfg, f.name)
        if isinstance(value, OptimConfig):
            value.check_roles(roles, f.name)
