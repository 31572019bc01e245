"""The ``roles`` config section: how trainable roles are stored over the frozen base (architecture.md §3).

One section for every world (``roles.mode``, ``roles.rank``, ``roles.alpha``, ``roles.targets``); a world supplies
its own defaults (``World.roles_defaults``: sd3 rank 32 / alpha 64, shapes 16 / 32) and refuses settings that do not
apply to it (``World.check_roles``: toy2d's adapters are residual MLPs, so only ``mode: lora`` and no rank).

This module imports no torch, so resolving a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from fewstep_rl.config import knob

#: LoRA rank and alpha of a backbone built without a ``roles`` section (the sd3 family's defaults).
DEFAULT_RANK = 32
DEFAULT_ALPHA = 64.0


@dataclass
class RolesConfig:
    """The ``roles`` section (``roles.*`` keys)."""

    mode: Literal["lora", "full"] = knob(
        "lora", "lora: zero-initialised adapters on the shared frozen base (peft LoRA; toy2d: residual MLPs); "
        "full: a full copy of the base network per role")
    rank: int | None = knob(None, "LoRA rank r of every role (default: the world's; sd3 32, shapes 16)")
    alpha: float | None = knob(None, "LoRA alpha, scale alpha/r (default: the world's; sd3 64, shapes 32)")
    targets: list[str] | None = knob(None, "module names LoRA adapts (default: the backbone family's attention "
                                           "projections)")
    activation_checkpointing: list[str] = knob(
        [], "trainable roles whose gradient passes recompute each transformer block in backward (activation "
            "checkpointing per role, e.g. [generator, fake_score]; the block is recomputed under the role of its "
            "forward); [] = off")

    def __post_init__(self) -> None:
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if self.targets is not None and not self.targets:
            raise ValueError("targets must name at least one module (or be null for the family's default)")
        if len(set(self.activation_checkpointing)) != len(self.activation_checkpointing):
            raise ValueError(f"activation_checkpointing names a role twice: {self.activation_checkpointing}")

    def check_checkpointed_roles(self, trainable: tuple[str, ...] | list[str], method: str) -> None:
        """Every role in ``activation_checkpointing`` must be one of the method's trainable roles (the only ones with
        gradient passes).

        Raises:
            ValueError: naming the unknown role and the method's trainable roles.
        """
        for role in self.activation_checkpointing:
            if role not in trainable:
                raise ValueError(f"activation_checkpointing: {role!r} is not a trainable role of {method} (its "
                                 f"trainable roles: {', '.join(trainable)})")

    @property
    def lora_rank(self) -> int:
        """``rank``, or :data:`DEFAULT_RANK` when unset."""
        return int(self.rank) if self.rank is not None else DEFAULT_RANK

    @property
    def lora_alpha(self) -> float:
        """``alpha``, or :data:`DEFAULT_ALPHA` when unset."""
        return float(self.alpha) if self.alpha is not None else DEFAULT_ALPHA


#: ``world.<old key>`` → ``roles.<new key>``: the keys the sd3 and shapes worlds had before the ``roles`` section.
LEGACY_WORLD_KEYS = {"roles_mode": "mode", "lora_rank": "rank", "lora_alpha": "alpha", "lora_targets": "targets"}
