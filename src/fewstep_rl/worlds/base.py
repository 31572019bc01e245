"""A world = a backbone (frozen teacher + role adapters) + prompts + default rewards + evaluation.

Worlds register through the ``fewstep_rl.worlds`` entry-point group. ``fewstep-rl fit --world NAME`` builds the
world from its typed ``Config``; methods receive the world and ask it for the backbone, prompts and metrics.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from fewstep_rl.backbones.base import Backbone


class World(ABC):
    """Base class of every world.

    Attributes:
        name: registry name.
        Config: typed config dataclass (``world.*`` keys).
        teacher_guidance: CFG scale the teacher uses by default (toy2d: 1, so targets are exact closed forms).
        sample_kind: ``"points"`` (``.npy`` output) or ``"images"`` (folder of PNGs).
    """

    name: ClassVar[str] = "world"
    Config: ClassVar[type]
    teacher_guidance: float = 1.0
    sample_kind: ClassVar[str] = "points"

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

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
