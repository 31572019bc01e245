"""The ``shapes`` world: the embedded default, a miniature of real text-to-image RL (architecture.md §4).

Prompts describe small compositional scenes (``grammar.py``); the teacher is a tiny diffusers
``SD3Transformer2DModel`` + tiny CLIP text encoder in pixel space (16×16), trained by ``teacher.py`` and shipped in
``assets/teacher`` (diffusers format, fp16); it loads through the ``sd3`` backbone, so trainable roles are peft LoRA
adapters on it (or full copies with ``roles.mode: full``; LoRA rank 16, alpha 32 by default). Rewards: ``gold`` (the exact verifier,
black-box) and ``proxy`` (a small learned differentiable scorer, ``proxy.py``). Evaluation reports gold partial
credit and strict all-correct accuracy, separately for training prompts and for the held-out relational prompts
(never seen by the teacher), plus the proxy score — gold-vs-proxy is where reward hacking shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fewstep_rl.config import knob
from fewstep_rl.worlds import embedded
from fewstep_rl.worlds.base import World
from fewstep_rl.worlds.shapes import grammar, verify

ASSETS = Path(__file__).parent / "assets"


@dataclass
class ShapesConfig:
    """The ``shapes`` world (``world.*`` keys)."""

    path: str | None = knob(None, "teacher directory (diffusers format); default: the weights shipped in the package")
    guidance: float | None = knob(None, "teacher CFG scale (default: the shipped teacher's, 4.0)")
    eval_heldout_frac: float = knob(0.25, "fraction of evaluation prompts drawn from the held-out relational set")

    def __post_init__(self) -> None:
        if not 0.0 <= self.eval_heldout_frac <= 1.0:
            raise ValueError("eval_heldout_frac must lie in [0, 1]")


class ShapesWorld(World):
    """Compositional 16×16 scenes with an exact verifier, a learned proxy and a tiny SD3 teacher."""

    name = "shapes"
    Config = ShapesConfig
    sample_kind = "images"
    roles_defaults = {"rank": 16, "alpha": 32.0}

    def __init__(self, cfg: ShapesConfig | None = None) -> None:
        super().__init__(cfg or ShapesConfig())
        self.dir, meta = embedded.teacher_dir("shapes", self.cfg.path, ASSETS)
        self.teacher_guidance = float(self.cfg.guidance if self.cfg.guidance is not None else meta.get("guidance", 4.0))
        self.shift = float(meta.get("shift", 1.0))
        self._train, self._held = grammar.split_prompts(seed=0)

    def build_backbone(self) -> Any:
        from fewstep_rl.backbones.sd3 import SD3Backbone

        return SD3Backbone.from_pretrained(self.dir, roles=self.roles_config())

    @property
    def train_prompts(self) -> list[str]:
        return list(self._train)

    @property
    def heldout_prompts(self) -> list[str]:
        return list(self._held)

    @property
    def eval_prompts(self) -> list[str]:
        """A fixed interleaving of training and held-out prompts (``eval_heldout_frac`` of them held out)."""
        g = torch.Generator().manual_seed(0)
        train = [self._train[i] for i in torch.randperm(len(self._train), generator=g, device="cpu").tolist()]
        k = round(1 / self.cfg.eval_heldout_frac) if self.cfg.eval_heldout_frac > 0 else 0
        out, ti, hi = [], 0, 0
        for i in range(len(train) + len(self._held)):
            if k and i % k == k - 1 and hi < len(self._held):
                out.append(self._held[hi])
                hi += 1
            elif ti < len(train):
                out.append(train[ti])
                ti += 1
        return out

    def prompt_meta(self, prompt: str) -> dict:
        return grammar.meta(prompt)

    def default_rewards(self) -> list[dict]:
        return [{"name": "proxy"}]

    def evaluate(
        self, samples: Tensor, prompts: Sequence[str], rewards: Any = None, beta: float | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, float]:
        """Gold partial credit and strict accuracy (all, training prompts, held-out prompts)."""
        scores, strict, _ = verify.score_batch(samples, list(prompts))
        return embedded.by_split({"gold": scores, "strict": strict}, prompts, set(self._held))

    def save_samples(self, samples: Tensor, prompts: Sequence[str], out: Path) -> None:
        embedded.save_samples(samples, prompts, out)

    def log_samples(self, samples: Tensor, prompts: Sequence[str], run_dir: Path, step: int) -> None:
        embedded.log_samples(samples, prompts, run_dir, step)
