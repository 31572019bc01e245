"""A world = a backbone (frozen teacher + role store) + prompts + default rewards + evaluation.

Worlds register through the ``fewstep_rl.worlds`` entry-point group. ``fewstep-rl fit --world NAME`` builds the
world from its typed ``Config``; the run's ``roles`` section (:class:`~fewstep_rl.roles.RolesConfig`) is handed to
it as ``roles_cfg`` before the backbone is built. Methods receive the world and ask it for the backbone, prompts
and metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewstep_rl.backbones.base import Backbone
from fewstep_rl.roles.config import RolesConfig


class World(ABC):
    """Base class of every world.

    Attributes:
        name: registry name.
        Config: typed config dataclass (``world.*`` keys).
        teacher_guidance: CFG scale the teacher uses by default (toy2d: 1, so targets are exact closed forms).
        sample_kind: ``"points"`` (``.npy`` output) or ``"images"`` (folder of PNGs).
        roles_defaults: this world's defaults of ``roles.*`` keys (e.g. ``{"rank": 16, "alpha": 32.0}``).
        roles_cfg: the run's ``roles`` section, set by the run assembly (``None``: ``roles_defaults``); read it with
            :meth:`roles_config` when building the backbone.
    """

    name: ClassVar[str] = "world"
    Config: ClassVar[type]
    teacher_guidance: float = 1.0
    sample_kind: ClassVar[str] = "points"
    roles_defaults: ClassVar[dict[str, Any]] = {}
    roles_cfg: RolesConfig | None = None

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @classmethod
    def check_roles(cls, roles: RolesConfig) -> None:
        """Refuse ``roles`` settings that do not apply to this world (``ValueError`` naming the key); default: any."""
        return None

    def roles_config(self) -> RolesConfig:
        """The ``roles`` section the backbone is built with."""
        return self.roles_cfg if self.roles_cfg is not None else RolesConfig(**self.roles_defaults)

    @abstractmethod
    def build_backbone(self) -> Backbone:
        """A fresh backbone with no roles yet (frozen base loaded)."""

    @property
    @abstractmethod
    def train_prompts(self) -> list[str]:
        """Prompts training draws from."""

    @property
    def eval_prompts(self) -> list[str]:
        """Prompts evaluation cycles through (defaults to the training prompts)."""
        return self.train_prompts

    def prompt_meta(self, prompt: str) -> dict:
        """Per-prompt metadata handed to rewards (e.g. GenEval-style object lists)."""
        return {}

    def default_rewards(self) -> list[dict]:
        """Reward specs used when the config names none."""
        return []

    def evaluate(
        self,
        samples: Tensor,
        prompts: Sequence[str],
        rewards: Any = None,
        beta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """World-specific metrics of decoded ``samples`` for ``prompts`` (mean rewards are added by the caller)."""
        return {}

    def save_samples(self, samples: Tensor, prompts: Sequence[str], out: Path) -> None:
        """Write decoded samples: ``.npy`` of shape (N, d) for points, a folder of PNGs for images."""
        import numpy as np

        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        np.save(out, samples.detach().float().cpu().numpy())
